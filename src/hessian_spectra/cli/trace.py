"""``hessian-spectra trace``: a stochastic estimate of tr(H) (XTrace, Hutch++ or Hutchinson)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .command import Command, Outcome, fmt
from .options import positive_int

__all__ = ["Trace", "TraceOptions"]

TRACE_METHODS = ("xtrace", "hutch++", "hutchinson")


@dataclass(frozen=True)
class TraceOptions:
    """The options of ``trace``."""

    probes: int = 10
    """Number of operator products (HVPs) to spend, whatever the estimator."""
    trace_method: str = "xtrace"
    """The estimator: ``xtrace`` (default), ``hutch++`` or ``hutchinson``."""

    def __post_init__(self):
        if self.trace_method not in TRACE_METHODS:
            raise ValueError(
                f"trace_method must be one of {TRACE_METHODS}, got {self.trace_method!r}"
            )

    def to_dict(self) -> dict:
        """The options as saved in result.json's config."""
        return asdict(self)


class Trace(Command):
    """The ``trace`` command."""

    name = "trace"
    help = "estimate of tr(H) from --probes HVPs (XTrace, Hutch++ or Hutchinson)"
    description = (
        "A stochastic estimate of the trace of the Hessian (or of --curvature) from "
        "--probes products, with its standard error: XTrace (default; deflates the "
        "largest eigenvalues, every probe used twice), Hutch++ or Hutchinson (mean "
        "of z^T H z over Rademacher probes z)."
    )
    Options = TraceOptions

    def add_options(self, p) -> None:
        """``--probes`` and ``--trace-method``."""
        d = TraceOptions()
        p.add_argument(
            "--probes",
            type=positive_int,
            default=d.probes,
            metavar="S",
            help=f"number of HVPs to spend (default: {d.probes}); xtrace uses "
            "S/2 probes, hutch++ S/3 to deflate (with S < 2, resp. < 3: "
            "Hutchinson's estimate)",
        )
        p.add_argument(
            "--trace-method",
            choices=TRACE_METHODS,
            default=d.trace_method,
            help="estimator (default: xtrace: the smallest error at equal HVPs in "
            "16 of 21 measured cases; hutchinson is best on a flat spectrum)",
        )

    def run(self, ctx) -> Outcome:
        """``hs.trace`` on the run's operator; the estimate is ``TraceEstimate.to_dict()``."""
        from .. import trace

        o = ctx.config.options
        ctx.log.info("trace (%s): %d HVP(s)", o.trace_method, o.probes)
        est = trace(
            ctx.op,
            o.probes,
            method=o.trace_method,
            seed=ctx.config.seed,
            progress=not ctx.config.quiet,
        )
        return Outcome(est.to_dict(), {"trace": est.estimate, "trace_std_error": est.std_error})

    def summary_rows(self, result):
        """The trace ± its standard error."""
        s = result.summary
        se = s.get("trace_std_error")
        pm = f" ± {se:.3g}" if se is not None and math.isfinite(se) else ""
        return [("trace", fmt(s.get("trace")) + pm)]
