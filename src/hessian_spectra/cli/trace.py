"""``hessian-spectra trace``: Hutchinson's estimate of tr(H) with Rademacher probes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .command import Command, Outcome, fmt
from .options import positive_int

__all__ = ["Trace", "TraceOptions"]


@dataclass(frozen=True)
class TraceOptions:
    """The options of ``trace``."""

    probes: int = 10
    """Number of Rademacher probes (= HVPs)."""

    def to_dict(self) -> dict:
        return asdict(self)


class Trace(Command):
    name = "trace"
    help = "Hutchinson estimate of tr(H) with Rademacher probes"
    description = ("Hutchinson's estimate of the Hessian trace, mean of z^T H z over Rademacher "
                   "probes z.")
    Options = TraceOptions

    def add_options(self, p) -> None:
        d = TraceOptions()
        p.add_argument("--probes", type=positive_int, default=d.probes, metavar="S",
                       help=f"number of probes = HVPs (default: {d.probes})")

    def run(self, ctx) -> Outcome:
        from .. import trace

        ctx.log.info("Hutchinson: %d Rademacher probe(s)", ctx.config.options.probes)
        est = trace(ctx.op, ctx.config.options.probes, seed=ctx.config.seed,
                    progress=not ctx.config.quiet)
        estimate = {"estimate": est.estimate, "std_error": est.std_error,
                    "samples": est.samples.tolist()}
        return Outcome(estimate, {"trace": est.estimate, "trace_std_error": est.std_error})

    def summary_rows(self, result):
        s = result.summary
        se = s.get("trace_std_error")
        pm = f" ± {se:.3g}" if se is not None and math.isfinite(se) else ""
        return [("trace", fmt(s.get("trace")) + pm)]
