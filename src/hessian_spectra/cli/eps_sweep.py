"""``hessian-spectra eps-sweep``: the finite-difference HVP error against the step eps."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .command import Command, Outcome, fmt
from .errors import CliError
from .options import positive_float

__all__ = ["EpsSweep", "EpsSweepOptions"]

# 1e-5 ... 1e0, two points per decade
DEFAULT_EPS_VALUES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1e0)


@dataclass(frozen=True)
class EpsSweepOptions:
    """The options of ``eps-sweep``."""

    eps_values: tuple = DEFAULT_EPS_VALUES
    """The fd steps to try."""
    reference: str = "exact"
    """Reference HVP: ``exact`` (double backward) or ``richardson``."""

    def to_dict(self) -> dict:
        return {"eps_values": list(self.eps_values), "reference": self.reference}


class EpsSweep(Command):
    name = "eps-sweep"
    help = "finite-difference HVP error against the step eps"
    description = (
        "Relative error of the central finite-difference HVP along one unit "
        "Rademacher probe (from --seed) at each step in --eps-values, against the "
        "exact HVP (double backward) or a Richardson estimate, with FSHP Thm 3.1's "
        "error model a eps² + b/eps fitted to it (predicted best eps, slopes). Always "
        "uses method fd for the swept HVPs (--method and --eps are ignored). Writes "
        "result.json, eps_sweep.png and log.txt."
    )
    Options = EpsSweepOptions

    def add_options(self, p) -> None:
        p.add_argument(
            "--eps-values",
            type=positive_float,
            nargs="+",
            default=None,
            metavar="E",
            help="fd steps to try (default: 1e-5 ... 1e0, two per decade)",
        )
        p.add_argument(
            "--reference",
            choices=["exact", "richardson"],
            default=None,
            help="reference HVP: exact (double backward; one process only) or "
            "richardson ((4 H_(eps/2) v - H_eps v) / 3, 2 fd HVPs per eps) "
            "(default: exact in one process, richardson under torchrun)",
        )

    def options_from(self, ns, world_size):
        ref = ns.reference or ("richardson" if world_size > 1 else "exact")
        if ref == "exact" and world_size > 1:
            raise CliError(
                "--reference exact needs double backward, unavailable on a sharded "
                "model: use --reference richardson under torchrun"
            )
        values = tuple(ns.eps_values) if ns.eps_values else DEFAULT_EPS_VALUES
        return EpsSweepOptions(eps_values=values, reference=ref)

    def resolve_method(self, method, eps):
        return "fd", None  # the swept HVPs are fd whatever --method says

    def run(self, ctx) -> Outcome:
        from ..fd_step import fit_error_model
        from ..vectors import unit_probe

        o, op, seed = ctx.config.options, ctx.op, ctx.config.seed
        v = unit_probe(op, seed)  # the direction eps_sweep uses by default
        op.matvec(v)  # the default product: its step (possibly redone) and error estimate
        est = op.last_fd_error_estimate
        default_eps = est.eps if est is not None else op.eps_for(v)
        ctx.log.info(
            "eps sweep: %d step(s) from %.3g to %.3g against the %s reference (default step %.3g)",
            len(o.eps_values),
            min(o.eps_values),
            max(o.eps_values),
            o.reference,
            default_eps,
        )
        rows = op.eps_sweep(list(o.eps_values), v, seed=seed, reference=o.reference)
        estimate = {
            "reference": o.reference,
            "seed": seed,
            "default_eps": default_eps,
            "rows": [dataclasses.asdict(r) for r in rows],
        }
        finite = [r for r in rows if math.isfinite(r.rel_error)]
        best = min(finite, key=lambda r: r.rel_error) if finite else None
        try:  # FSHP Thm 3.1: error ≈ a eps² + b / eps
            fit = fit_error_model([r.eps for r in rows], [r.rel_error for r in rows]).to_dict()
        except ValueError as e:
            ctx.log.warning("no Thm 3.1 fit: %s", e)
            fit = None
        estimate["fit"] = fit
        summary = {
            "reference": o.reference,
            "default_eps": default_eps,
            "default_rel_error_estimate": est.rel_error if est is not None else None,
            "best_eps": best.eps if best else None,
            "best_rel_error": best.rel_error if best else None,
            "num_eps": len(rows),
            "fit_best_eps": fit["eps_best_predicted"] if fit else None,
            "fit_slope_large": fit["slope_large"] if fit else None,
            "fit_slope_small": fit["slope_small"] if fit else None,
        }
        return Outcome(estimate, summary)

    def tables(self, result) -> str:
        return "\n".join(
            [f"{'eps':>10}  {'rel_error':>10}  {'abs_error':>10}"]
            + [
                f"{r['eps']:>10.3g}  {fmt(r['rel_error'], '>10.3g')}  "
                f"{fmt(r['abs_error'], '>10.3g')}"
                for r in result.estimate["rows"]
            ]
        )

    def summary_rows(self, result):
        s = result.summary
        rows = [
            ("reference", s["reference"]),
            (
                "default eps",
                (
                    f"{fmt(s['default_eps'], '.3g')} (estimated rel_error "
                    f"{fmt(s.get('default_rel_error_estimate'), '.2g')})"
                ),
            ),
            (
                "best eps",
                (f"{fmt(s['best_eps'], '.3g')} (rel_error {fmt(s['best_rel_error'], '.3g')})"),
            ),
        ]
        if s.get("fit_best_eps") is not None:
            rows.append(
                (
                    "Thm 3.1 fit",
                    (
                        f"a eps² + b/eps: best eps {fmt(s['fit_best_eps'], '.3g')}"
                        f", slopes {fmt(s.get('fit_slope_large'), '.2f')} "
                        f"(large eps, theory 2) and "
                        f"{fmt(s.get('fit_slope_small'), '.2f')} (small eps, -1)"
                    ),
                )
            )
        return rows
