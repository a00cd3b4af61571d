"""``hessian-spectra density``: the SLQ spectral density, saved after every probe, resumable."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .command import Command, Outcome, fmt
from .options import (
    DTYPE_NAMES,
    MAX_BASIS_MEMORY,
    add_basis_storage,
    basis_placement,
    lanczos_overhead,
    positive_int,
    reorth,
)

__all__ = ["Density", "DensityOptions"]

FIGURE_REFRESH_S = 60.0  # redraw the figures after a probe at most this often (always at the end)


@dataclass(frozen=True)
class DensityOptions:
    """The options of ``density``."""

    steps: int = 16
    """Lanczos steps per probe (= HVPs per probe)."""
    probes: int = 2
    """Number of random probes."""
    reorth: object = "full"
    """``full``, ``none`` or a window size."""
    basis_dtype: str | None = None
    """Storage dtype of the Lanczos vectors (None: the HVP dtype)."""
    basis_dir: str | None = None
    """Folder for the stored Lanczos vectors (None: in memory up to ``max_basis_memory``)."""
    basis_device: str | None = None
    """Device of the stored Lanczos vectors (None: the model's)."""
    max_basis_memory: str = MAX_BASIS_MEMORY
    """Beyond this size in host memory the stored Lanczos vectors go to files."""
    resume: bool = False
    """Continue the run in --out: keep its finished probes (all of them), compute the rest."""
    per_block: bool = False
    """SLQ of each diagonal block H_bb (one per transformer layer, plus the other modules)."""

    def to_dict(self) -> dict:
        d = {
            "steps": self.steps,
            "probes": self.probes,
            "reorth": self.reorth,
            "basis_dtype": self.basis_dtype,
            "basis_dir": self.basis_dir,
            "basis_device": self.basis_device,
            "max_basis_memory": self.max_basis_memory,
        }  # resume is how, not what: not saved
        if self.per_block:
            d["per_block"] = True
        return d


class Density(Command):
    name = "density"
    help = "spectral density by stochastic Lanczos quadrature (SLQ)"
    description = (
        "Spectral density of the Hessian by SLQ. Writes result.json, density.png, "
        "ritz.png and log.txt to --out, after every probe."
    )
    Options = DensityOptions
    resumable = True
    interrupted_hint = "; finished probes are saved in {out}, continue with --resume"

    def add_options(self, p) -> None:
        d = DensityOptions()
        p.add_argument(
            "--steps",
            type=positive_int,
            default=d.steps,
            metavar="M",
            help=f"Lanczos steps per probe = HVPs per probe (default: {d.steps})",
        )
        p.add_argument(
            "--probes",
            type=positive_int,
            default=d.probes,
            metavar="S",
            help=f"number of random probes (default: {d.probes})",
        )
        p.add_argument(
            "--reorth",
            type=reorth,
            default=d.reorth,
            metavar="full|none|INT",
            help="reorthogonalisation: full (keeps M parameter-sized vectors: M x 4 "
            "bytes x parameters, 8.6 GB for the 135M default, in files beyond "
            "--max-basis-memory), none (2 vectors; ghost eigenvalues), or a window "
            "of the last INT vectors (default: full)",
        )
        p.add_argument(
            "--basis-dtype",
            choices=DTYPE_NAMES,
            default=None,
            help="storage dtype of the Lanczos vectors, bfloat16 halves "
            "their memory (default: the HVP dtype)",
        )
        add_basis_storage(p)
        p.add_argument(
            "--per-block",
            action="store_true",
            help="the SLQ density of each diagonal block H_bb instead (one block per "
            "transformer layer, plus embeddings, final norm and head; the "
            "curvature of the loss in that block's parameters alone), drawn on "
            "one figure: blocks x probes x steps HVPs; summary: the extremes "
            "over blocks, the trace sum of the blocks' (= tr H)",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --out: keep its finished probes (all of them, "
            "also beyond --probes), compute the rest",
        )

    def check(self, config, world_size: int) -> None:
        """Refuse ``--per-block`` with ``--resume``."""
        from .errors import CliError

        if config.options.per_block and config.options.resume:
            raise CliError("--per-block runs cannot be resumed yet: drop --resume")

    def run(self, ctx) -> Outcome:
        from .. import slq
        from ..lanczos import LanczosResult

        o, log = ctx.config.options, ctx.log
        if o.per_block:
            return self._run_per_block(ctx)
        runs = []
        if ctx.previous is not None and ctx.previous.get("density"):
            runs = [LanczosResult.from_dict(r) for r in ctx.previous["density"]["runs"]]
        num_probes = max(o.probes, len(runs))  # finished probes are never thrown away
        if runs:
            extra = (
                f" (more than --probes {o.probes}: all are kept and reported)"
                if len(runs) > o.probes
                else ""
            )
            log.info(
                "--resume: keeping %d finished probe(s)%s, computing %d more",
                len(runs),
                extra,
                num_probes - len(runs),
            )
        t_last = t_drawn = time.perf_counter()

        fd_estimates = getattr(ctx.op, "fd_estimates", [])  # HessianOperator with fd
        fd_probes, fd_start = [], len(fd_estimates)

        def on_probe(i, dens):
            nonlocal t_last, t_drawn, fd_start
            s = dens.summary()
            ests = fd_estimates[fd_start:]
            fd_start = len(fd_estimates)
            if ests:  # fd: the estimate along the probe's first vector, the step used, the worst
                fd_probes.append(
                    {
                        "probe": i,
                        "eps": ests[0].eps,
                        "rel_error_estimate": ests[0].rel_error,
                        "max_rel_error_estimate": max(e.rel_error for e in ests),
                    }
                )
                s = {**s, "fd_probes": list(fd_probes)}
            ctx.publish(dens.to_dict(), s)
            now = time.perf_counter()
            log.info(
                "probe %d/%d done in %.1f s: lambda_max %.5g, lambda_min %.5g, trace %.5g",
                i + 1,
                num_probes,
                now - t_last,
                s["lambda_max"],
                s["lambda_min"],
                s["trace"],
            )
            if ctx.rank0 and now - t_drawn > FIGURE_REFRESH_S and i + 1 < num_probes:
                ctx.draw()  # live preview, rate-limited
                t_drawn = time.perf_counter()
            t_last = time.perf_counter()

        log.info(
            "SLQ: %d probe(s) x %d Lanczos steps (reorth %s, basis %s, method %s)",
            num_probes,
            o.steps,
            o.reorth,
            o.basis_dtype or "HVP dtype",
            ctx.config.method,
        )
        dens = slq(
            ctx.op,
            o.steps,
            num_probes,
            seed=ctx.config.seed,
            reorth=o.reorth,
            basis_dtype=o.basis_dtype,
            runs=runs,
            on_probe=on_probe,
            basis_dir=_placement(ctx, ctx.op, o.steps),
            basis_device=o.basis_device,
            progress=not ctx.config.quiet,
        )
        summary = {**dens.summary(), **lanczos_overhead([r.to_dict() for r in dens.runs])}
        if fd_probes:
            summary["fd_probes"] = fd_probes
        return Outcome(dens.to_dict(), summary)

    def _run_per_block(self, ctx) -> Outcome:
        from .. import slq
        from ..per_block import BlockOperator, resolve_blocks

        o, log = ctx.config.options, ctx.log
        groups = resolve_blocks(ctx.op.param_names)
        log.info(
            "per-block SLQ: %d block(s) x %d probe(s) x up to %d steps",
            len(groups),
            o.probes,
            o.steps,
        )
        blocks = {}
        for k, (name, names) in enumerate(groups.items()):
            blk = BlockOperator(ctx.op, names)
            dens = slq(
                blk,
                min(o.steps, blk.num_params),
                o.probes,
                seed=ctx.config.seed,
                reorth=o.reorth,
                basis_dtype=o.basis_dtype,
                basis_dir=_placement(ctx, blk, min(o.steps, blk.num_params)),
                basis_device=o.basis_device,
                progress=not ctx.config.quiet,
            )
            dens.config.update(block=name, params=list(blk.param_names))
            blocks[name] = dens
            s = dens.summary()
            log.info(
                "block %d/%d %s (%d parameters): lambda_max %.5g, lambda_min %.5g",
                k + 1,
                len(groups),
                name,
                blk.num_params,
                s["lambda_max"],
                s["lambda_min"],
            )
            ctx.publish(*_per_block_outcome(blocks))
        return Outcome(*_per_block_outcome(blocks))

    def figures(self, result: dict, out):
        """density.png and ritz.png; for ``--per-block``, every block's density on one figure."""
        d = result.get("density") or {}
        curv = result.get("config", {}).get("curvature", "hessian")
        names = {"hessian": "Hessian", "ggn": "Gauss-Newton (GGN)", "ef": "empirical Fisher"}
        if not d.get("per_block"):
            if curv == "hessian" or not d.get("runs"):
                return super().figures(result, out)
            from ..plots import plot_density, plot_ritz

            s = result.get("summary") or {}
            title = (
                f"{names.get(curv, curv)} spectral density (SLQ): "
                f"λ_max={s.get('lambda_max', float('nan')):.4g}, "
                f"λ_min={s.get('lambda_min', float('nan')):.4g}, "
                f"trace={s.get('trace', float('nan')):.4g}"
            )
            return [
                plot_density(result, out / "density.png", title=title),
                plot_ritz(result, out / "ritz.png"),
            ]
        from ..plots import plot_density

        blocks = list(d["per_block"])
        parts = [{"density": d["per_block"][n]} for n in blocks]
        title = (
            f"per-block spectral densities of the {names.get(curv, curv)} "
            "(SLQ of each diagonal block)"
        )
        return [plot_density(parts, out / "density.png", labels=blocks, title=title)]

    def tables(self, result):
        """One line per block of a ``--per-block`` run (else none)."""
        blocks = (result.summary or {}).get("blocks")
        if not blocks:
            return None
        w = max(len(k) for k in blocks)
        lines = [
            f"{'block':<{w}}  {'params':>10}  {'lambda_min':>12}  {'lambda_max':>12}  {'trace':>12}"
        ]
        for k, b in blocks.items():
            lines.append(
                f"{k:<{w}}  {b['num_params']:>10,}  {b['lambda_min']:>12.5g}  "
                f"{b['lambda_max']:>12.5g}  {b['trace']:>12.5g}"
            )
        return "\n".join(lines)

    def summary_rows(self, result):
        s = result.summary
        rows = [("lambda_max", fmt(s.get("lambda_max"))), ("lambda_min", fmt(s.get("lambda_min")))]
        se = s.get("trace_std_error")
        pm = f" ± {se:.3g}" if se is not None and math.isfinite(se) else ""
        rows.append(("trace", fmt(s.get("trace")) + pm))
        if s.get("negative_mass_threshold") is not None:
            rows.append(
                (
                    "negative_mass",
                    (
                        f"{fmt(s.get('negative_mass'), '.3g')} (mass of nodes "
                        f"< -{s['negative_mass_threshold']:.3g})"
                    ),
                )
            )
        rows.append(
            (
                "below zero",
                (
                    f"{fmt(s.get('negative_mass_below_zero'), '.4f')} (mass of "
                    "nodes < 0, including the near-zero bulk)"
                ),
            )
        )
        if s.get("num_ghosts"):
            rows.append(
                (
                    "ghosts",
                    (
                        f"{s['num_ghosts']} spurious copies of converged Ritz values "
                        "(no full reorthogonalisation: FSHP Thm 4.1)"
                    ),
                )
            )
        if s.get("lanczos_overhead_percent") is not None:
            rows.append(
                (
                    "Lanczos overhead",
                    (
                        f"{s['lanczos_overhead_percent']:.1f}% of the HVP "
                        "time (dots, updates, reorthogonalisation)"
                    ),
                )
            )
        n = s.get("num_probes")
        if n is not None and n > result.config.get("probes", n):
            rows.append(
                (
                    "probes",
                    (f"{n} (kept every finished probe; --probes asked {result.config['probes']})"),
                )
            )
        return rows


def _per_block_outcome(blocks: dict) -> tuple[dict, dict]:
    """(estimate, summary) of a per-block run: every block's density; the extremes over blocks,
    the sum of their traces (tr H = Σ_b tr H_bb) and the dimension-weighted negative masses
    (those of the block-diagonal matrix diag(H_bb)).
    """
    sums = {k: d.summary() for k, d in blocks.items()}
    n = {k: d.num_params for k, d in blocks.items()}
    total = sum(n.values())
    summary = {
        "lambda_max": max(s["lambda_max"] for s in sums.values()),
        "lambda_min": min(s["lambda_min"] for s in sums.values()),
        "trace": sum(d.trace() for d in blocks.values()),
        "negative_mass": sum(n[k] * sums[k]["negative_mass"] for k in blocks) / total,
        "negative_mass_below_zero": sum(n[k] * sums[k]["negative_mass_below_zero"] for k in blocks)
        / total,
        "num_blocks": len(blocks),
        "blocks": {
            k: {
                "num_params": n[k],
                "lambda_max": sums[k]["lambda_max"],
                "lambda_min": sums[k]["lambda_min"],
                "trace": blocks[k].trace(),
            }
            for k in blocks
        },
    }
    estimate = {"per_block": {k: d.to_dict() for k, d in blocks.items()}}
    return estimate, summary


def _placement(ctx, op, steps: int) -> str | None:
    """Where the Lanczos vectors of ``op``'s runs go (:func:`.options.basis_placement`)."""
    from .._checks import parse_dtype

    o = ctx.config.options
    r = o.reorth
    capacity = steps if r == "full" else 0 if r in ("none", 0) else max(int(r), 2)
    dtype = parse_dtype(o.basis_dtype, "basis_dtype") or op.vector_dtype
    return basis_placement(ctx, op.params, capacity, dtype)
