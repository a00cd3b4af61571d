"""``hessian-spectra influence``: influence scores of the data's batches on a query loss.

Sign convention (``hessian_spectra.influence``): I(z, q) = −∇L_q^T (H + λI)^{-1} ∇l_z;
negative = helpful (up-weighting z lowers the query loss), positive = harmful. A run whose CG
solve did not converge (negative curvature met, or the iteration limit) ends with status
``not_converged`` and exit status 3: its scores are not the ones asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .command import Command, Outcome, fmt
from .errors import CliError
from .options import nonnegative_float, positive_float, positive_int

__all__ = ["Influence", "InfluenceOptions", "extremes"]


@dataclass(frozen=True)
class InfluenceOptions:
    """The options of ``influence``."""

    query_data: str | None = None
    """Query data path (None: the first batch of the data)."""
    damping: float = 0.01
    """λ ≥ 0 added to H."""
    cg_tol: float = 1e-4
    """CG stops at ||r|| <= cg_tol ||b||."""
    cg_max_iter: int = 50
    """At most this many CG iterations (= HVPs)."""

    def to_dict(self) -> dict:
        return asdict(self)


def extremes(scores) -> dict:
    """The most helpful (most negative score) and most harmful (most positive) candidates;
    None where no score has that sign.

    >>> extremes([-0.5, -0.1])
    {'most_helpful': 0, 'most_harmful': None, 'score_min': -0.5, 'score_max': -0.1}
    """
    scores = [float(x) for x in scores]
    lo = min(range(len(scores)), key=scores.__getitem__)
    hi = max(range(len(scores)), key=scores.__getitem__)
    return {
        "most_helpful": lo if scores[lo] < 0 else None,
        "most_harmful": hi if scores[hi] > 0 else None,
        "score_min": scores[lo],
        "score_max": scores[hi],
    }


class Influence(Command):
    name = "influence"
    help = "influence scores of the --data batches on a query loss"
    description = (
        "Influence functions (Koh & Liang): solves (H + damping I) s = grad L_query "
        "by CG and scores each batch z of --data (the training batches, also those "
        "of H) by -s . grad l_z: negative = helpful (up-weighting z lowers the query "
        "loss), positive = harmful. One process only. Writes result.json and log.txt. "
        "Exit status 3 (status not_converged) when CG does not converge."
    )
    Options = InfluenceOptions

    def add_options(self, p) -> None:
        d = InfluenceOptions()
        p.add_argument(
            "--query-data",
            default=None,
            metavar="PATH",
            help="query data, same formats and data options (--seq-len, "
            "--batch-size, --num-batches, ...) as --data; the query loss is the "
            "average over all its batches (default: the first batch of --data; "
            "a factory model always uses its first batch)",
        )
        p.add_argument(
            "--damping",
            type=nonnegative_float,
            default=d.damping,
            metavar="LAMBDA",
            help=f"damping λ ≥ 0 added to H (default: {d.damping}); raise it above "
            "-λ_min when CG reports negative curvature",
        )
        p.add_argument(
            "--cg-tol",
            type=positive_float,
            default=d.cg_tol,
            metavar="TOL",
            help=f"CG stops at ||r|| <= TOL ||b|| (default: {d.cg_tol:g})",
        )
        p.add_argument(
            "--cg-max-iter",
            type=positive_int,
            default=d.cg_max_iter,
            metavar="N",
            help=f"at most N CG iterations = HVPs (default: {d.cg_max_iter})",
        )

    def check(self, config, world_size) -> None:
        if world_size > 1:
            raise CliError("influence runs in one process only (not under torchrun)")

    def _query(self, ctx):
        """(query batches, source): --query-data read like --data, else the first batch."""
        o = ctx.config.options
        if o.query_data is None:
            return [next(iter(ctx.op.batches))], "first batch of the data"
        tok = getattr(ctx.problem.loaded, "tokenizer", None)
        if tok is None:
            raise CliError(
                "--query-data needs a text model (Hugging Face / folder / .gguf); a "
                "factory model's query is its first batch"
            )
        from ..data import make_batches

        return make_batches(tok, ctx.config.data_config(path=o.query_data)), str(o.query_data)

    def run(self, ctx) -> Outcome:
        from ..influence import influence

        o = ctx.config.options
        query, source = self._query(ctx)
        cands = list(ctx.op.batches)
        ctx.log.info(
            "influence: query %s (%d batch(es)), %d candidate batch(es), damping %g, "
            "CG tol %g, at most %d iterations",
            source,
            len(query),
            len(cands),
            o.damping,
            o.cg_tol,
            o.cg_max_iter,
        )
        res = influence(
            ctx.op,
            query,
            cands,
            damping=o.damping,
            tol=o.cg_tol,
            max_iter=o.cg_max_iter,
            progress=not ctx.config.quiet,
        )
        cg = res.cg
        rel = cg.relative_residual if cg.residual_norms else None
        summary = {
            "query_loss": res.query_loss,
            "cg_iterations": cg.iterations,
            "cg_converged": cg.converged,
            "cg_negative_curvature": cg.negative_curvature,
            "cg_relative_residual": rel,
            "damping": o.damping,
            "num_candidates": int(res.scores.size),
            **extremes(res.scores),
        }
        estimate = {**res.to_dict(), "query": {"source": source, "num_batches": len(query)}}
        if cg.converged:
            return Outcome(estimate, summary)
        why = (
            "CG met negative curvature: raise --damping above -lambda_min"
            if cg.negative_curvature
            else f"CG did not reach --cg-tol {o.cg_tol:g} in {cg.iterations} iterations: raise "
            "--cg-max-iter or --cg-tol"
        )
        return Outcome(
            estimate,
            summary,
            status="not_converged",
            problem=f"the scores are not the influence asked for ({why})",
        )

    def summary_rows(self, result):
        s = result.summary
        cg = ("converged" if s["cg_converged"] else "NOT converged") + (
            ", negative curvature" if s["cg_negative_curvature"] else ""
        )

        def pick(key, score_key, sign):
            i = s.get(key)
            return (
                f"none (no {sign} score)"
                if i is None
                else f"batch {i} (score {fmt(s[score_key], '.4g')})"
            )

        return [
            ("query loss", fmt(s["query_loss"])),
            (
                "CG",
                (
                    f"{s['cg_iterations']} iteration(s), {cg}, relative residual "
                    f"{fmt(s['cg_relative_residual'], '.3g')}"
                ),
            ),
            ("damping", fmt(s["damping"], "g")),
            ("most helpful", pick("most_helpful", "score_min", "negative")),
            ("most harmful", pick("most_harmful", "score_max", "positive")),
        ]
