"""``hessian-spectra density``: the SLQ spectral density, saved after every probe, resumable."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .command import Command, Outcome, fmt
from .options import DTYPE_NAMES, positive_int, reorth

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
    resume: bool = False
    """Continue the run in --out: keep its finished probes (all of them), compute the rest."""

    def to_dict(self) -> dict:
        return {"steps": self.steps, "probes": self.probes, "reorth": self.reorth,
                "basis_dtype": self.basis_dtype}  # resume is how, not what: not saved


class Density(Command):
    name = "density"
    help = "spectral density by stochastic Lanczos quadrature (SLQ)"
    description = ("Spectral density of the Hessian by SLQ. Writes result.json, density.png, "
                   "ritz.png and log.txt to --out, after every probe.")
    Options = DensityOptions
    resumable = True
    interrupted_hint = "; finished probes are saved in {out}, continue with --resume"

    def add_options(self, p) -> None:
        d = DensityOptions()
        p.add_argument("--steps", type=positive_int, default=d.steps, metavar="M",
                       help=f"Lanczos steps per probe = HVPs per probe (default: {d.steps})")
        p.add_argument("--probes", type=positive_int, default=d.probes, metavar="S",
                       help=f"number of random probes (default: {d.probes})")
        p.add_argument("--reorth", type=reorth, default=d.reorth, metavar="full|none|INT",
                       help="reorthogonalisation: full (keeps M parameter-sized vectors: M x 4 "
                            "bytes x parameters, 8.6 GB for the 135M default), none (2 vectors; "
                            "ghost eigenvalues), or a window of the last INT vectors "
                            "(default: full)")
        p.add_argument("--basis-dtype", choices=DTYPE_NAMES,
                       default=None, help="storage dtype of the Lanczos vectors, bfloat16 halves "
                                          "their memory (default: the HVP dtype)")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --out: keep its finished probes (all of them, "
                            "also beyond --probes), compute the rest")

    def run(self, ctx) -> Outcome:
        from .. import slq
        from ..lanczos import LanczosResult

        o, log = ctx.config.options, ctx.log
        runs = []
        if ctx.previous is not None and ctx.previous.get("density"):
            runs = [LanczosResult.from_dict(r) for r in ctx.previous["density"]["runs"]]
        num_probes = max(o.probes, len(runs))  # finished probes are never thrown away
        if runs:
            extra = (f" (more than --probes {o.probes}: all are kept and reported)"
                     if len(runs) > o.probes else "")
            log.info("--resume: keeping %d finished probe(s)%s, computing %d more", len(runs),
                     extra, num_probes - len(runs))
        t_last = t_drawn = time.perf_counter()

        def on_probe(i, dens):
            nonlocal t_last, t_drawn
            s = dens.summary()
            ctx.publish(dens.to_dict(), s)
            now = time.perf_counter()
            log.info("probe %d/%d done in %.1f s: lambda_max %.5g, lambda_min %.5g, trace %.5g",
                     i + 1, num_probes, now - t_last, s["lambda_max"], s["lambda_min"], s["trace"])
            if ctx.rank0 and now - t_drawn > FIGURE_REFRESH_S and i + 1 < num_probes:
                ctx.draw()  # live preview, rate-limited
                t_drawn = time.perf_counter()
            t_last = time.perf_counter()

        log.info("SLQ: %d probe(s) x %d Lanczos steps (reorth %s, basis %s, method %s)",
                 num_probes, o.steps, o.reorth, o.basis_dtype or "HVP dtype", ctx.config.method)
        dens = slq(ctx.op, o.steps, num_probes, seed=ctx.config.seed, reorth=o.reorth,
                   basis_dtype=o.basis_dtype, runs=runs, on_probe=on_probe,
                   progress=not ctx.config.quiet)
        return Outcome(dens.to_dict(), dens.summary())

    def summary_rows(self, result):
        s = result.summary
        rows = [("lambda_max", fmt(s.get("lambda_max"))), ("lambda_min", fmt(s.get("lambda_min")))]
        se = s.get("trace_std_error")
        pm = f" ± {se:.3g}" if se is not None and math.isfinite(se) else ""
        rows.append(("trace", fmt(s.get("trace")) + pm))
        if s.get("negative_mass_threshold") is not None:
            rows.append(("negative_mass", (f"{fmt(s.get('negative_mass'), '.3g')} (mass of nodes "
                                          f"< -{s['negative_mass_threshold']:.3g})")))
        rows.append(("below zero", (f"{fmt(s.get('negative_mass_below_zero'), '.4f')} (mass of "
                                   "nodes < 0, including the near-zero bulk)")))
        n = s.get("num_probes")
        if n is not None and n > result.config.get("probes", n):
            rows.append(("probes", (f"{n} (kept every finished probe; --probes asked "
                                   f"{result.config['probes']})")))
        return rows
