"""``hessian-spectra influence``: influence scores of the data's examples on a query loss.

Sign convention (``hessian_spectra.influence``): I(z, q) = −∇L_q^T (H + λI)^{-1} ∇l_z;
negative = helpful (up-weighting z lowers the query loss), positive = harmful. One score per
example (row) of the data by default, ``--per-batch`` for one per batch; ``--damping auto``
(the default) chooses λ from a short Lanczos run (``solvers.auto_damping``). A run whose CG
solve did not converge (negative curvature met, or the iteration limit) ends with status
``not_converged`` and exit status 3: its scores are not the ones asked for.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from .command import Command, Outcome, fmt
from .errors import CliError
from .options import nonnegative_float, positive_float, positive_int

__all__ = ["Influence", "InfluenceOptions", "damping_value", "extremes", "snippet", "top_list"]

SNIPPET_CHARS = 60  # characters of decoded text kept per example in result.json


@dataclass(frozen=True)
class InfluenceOptions:
    """The options of ``influence``."""

    query_data: str | None = None
    """Query data path (None: the first batch of the data)."""
    damping: float | str = "auto"
    """λ ≥ 0 added to H, or "auto" (``solvers.auto_damping``)."""
    damping_steps: int = 20
    """Lanczos steps (HVPs) for ``damping="auto"``."""
    per_batch: bool = False
    """One score per batch instead of one per example."""
    top_k: int = 10
    """How many most helpful / most harmful examples to list and draw."""
    cg_tol: float = 1e-4
    """CG stops at ||r|| <= cg_tol ||b||."""
    cg_max_iter: int = 50
    """At most this many CG iterations (= HVPs)."""

    def to_dict(self) -> dict:
        return asdict(self)


def damping_value(s: str):
    """``"auto"`` or a finite number ≥ 0.

    >>> damping_value("auto"), damping_value("0.5")
    ('auto', 0.5)
    """
    if s.strip().lower() == "auto":
        return "auto"
    try:
        return nonnegative_float(s)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or 'auto' (the default)") from None


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


def top_list(res, idx, snippets=None) -> list[dict]:
    """Rows ``{index, batch, row, score, snippet}`` for the score indices ``idx`` of an
    ``InfluenceResult`` (``row`` None for per-batch scores, ``snippet`` None without text).
    """
    return [
        {
            "index": i,
            "batch": int(res.batch_index[i]),
            "row": None if res.row_index is None else int(res.row_index[i]),
            "score": float(res.scores[i]),
            "snippet": snippets[i] if snippets else None,
        }
        for i in idx
    ]


def snippet(tokenizer, batch, row: int, max_chars: int = SNIPPET_CHARS) -> str | None:
    """The start of row ``row``'s text (its attended tokens decoded, whitespace collapsed, at
    most ``max_chars`` characters), or None where the batch holds no ``input_ids``.
    """
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    if not hasattr(ids, "ndim") or ids.ndim != 2:
        return None
    toks = ids[row]
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is not None:
        toks = toks[mask[row].bool()]
    text = " ".join(tokenizer.decode(toks[: 4 * max_chars].tolist()).split())
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


class Influence(Command):
    name = "influence"
    help = "influence of each --data example on a query loss (one score per sequence)"
    description = (
        "Influence functions (Koh & Liang): solves (H + damping I) s = grad L_query "
        "by CG and scores each example z (each row = sequence of each batch) of "
        "--data (the training data, also that of H) by -s . grad l_z: negative = "
        "helpful (up-weighting z lowers the query loss), positive = harmful. One "
        "gradient per example; --per-batch scores whole batches. --damping auto "
        "(the default) estimates lambda_min and lambda_max with --damping-steps "
        "Lanczos steps and takes max(1.5 (-lambda_min), 0.01 |lambda|_max) so that "
        "H + damping I is positive definite. One process only. Writes result.json "
        "(scores with their batch, row and text), influence.png (score histogram, "
        "top helpful and harmful examples) and log.txt. Exit status 3 (status "
        "not_converged) when CG does not converge."
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
            type=damping_value,
            default=d.damping,
            metavar="LAMBDA|auto",
            help="damping λ ≥ 0 added to H, or 'auto' (default): "
            "max(1.5·(−λ_min), 0.01·|λ|_max) from a short Lanczos run, so that "
            "H + λI is positive definite; a number is used as given",
        )
        p.add_argument(
            "--damping-steps",
            type=positive_int,
            default=d.damping_steps,
            metavar="N",
            help=f"Lanczos steps (HVPs) that estimate λ_min and λ_max for --damping auto "
            f"(default: {d.damping_steps})",
        )
        p.add_argument(
            "--per-batch",
            action="store_true",
            help="one score per batch (the gradient of its loss) instead of one per example",
        )
        p.add_argument(
            "--top-k",
            type=positive_int,
            default=d.top_k,
            metavar="K",
            help=f"list and draw the K most helpful and most harmful (default: {d.top_k})",
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
            "influence: query %s (%d batch(es)), %d candidate batch(es) scored per %s, damping "
            "%s, CG tol %g, at most %d iterations",
            source,
            len(query),
            len(cands),
            "batch" if o.per_batch else "example",
            o.damping if o.damping == "auto" else f"{o.damping:g}",
            o.cg_tol,
            o.cg_max_iter,
        )
        res = influence(
            ctx.op,
            query,
            cands,
            per_example=not o.per_batch,
            damping=o.damping,
            damping_steps=o.damping_steps,
            tol=o.cg_tol,
            max_iter=o.cg_max_iter,
            progress=not ctx.config.quiet,
        )
        c = res.damping_choice
        if c is not None:
            ctx.log.info(
                "damping auto: %g (%s term) from %d Lanczos steps: lambda_min ≈ %g, "
                "lambda_max ≈ %g",
                c.value,
                c.term,
                c.num_steps,
                c.lambda_min,
                c.lambda_max,
            )
        tok = getattr(getattr(ctx.problem, "loaded", None), "tokenizer", None)
        snippets = None
        if tok is not None and res.row_index is not None:
            snippets = [snippet(tok, cands[b], r) for b, r in zip(res.batch_index, res.row_index)]
        cg = res.cg
        rel = cg.relative_residual if cg.residual_norms else None
        summary = {
            "query_loss": res.query_loss,
            "cg_iterations": cg.iterations,
            "cg_converged": cg.converged,
            "cg_negative_curvature": cg.negative_curvature,
            "cg_relative_residual": rel,
            "damping": res.damping,
            "damping_auto": c is not None,
            "damping_lambda_min": None if c is None else c.lambda_min,
            "damping_lambda_max": None if c is None else c.lambda_max,
            "per_example": res.per_example,
            "num_candidates": len(cands),
            "num_scores": int(res.scores.size),
            **extremes(res.scores),
            "top_helpful": top_list(res, res.most_helpful(o.top_k), snippets),
            "top_harmful": top_list(res, res.most_harmful(o.top_k), snippets),
        }
        estimate = {
            **res.to_dict(),
            "snippets": snippets,
            "query": {"source": source, "num_batches": len(query)},
        }
        if cg.converged:
            return Outcome(estimate, summary)
        if cg.negative_curvature and c is not None:
            why = (
                f"CG met negative curvature at the auto damping {c.value:.3g}: the "
                f"{c.num_steps}-step Lanczos estimate of lambda_min ({c.lambda_min:.3g}) missed "
                "some; raise --damping-steps or give a larger --damping"
            )
        elif cg.negative_curvature:
            why = "CG met negative curvature: raise --damping above -lambda_min, or use auto"
        else:
            why = (
                f"CG did not reach --cg-tol {o.cg_tol:g} in {cg.iterations} iterations: raise "
                "--cg-max-iter or --cg-tol"
            )
        return Outcome(
            estimate,
            summary,
            status="not_converged",
            problem=f"the scores are not the influence asked for ({why})",
        )

    def tables(self, result) -> str:
        """The most helpful and most harmful examples: score, batch, row, text."""
        s = result.summary
        lines = []
        for key, name, sign in (
            (
                "top_helpful",
                "most helpful (negative: up-weighting lowers the query loss)",
                "negative",
            ),
            (
                "top_harmful",
                "most harmful (positive: up-weighting raises the query loss)",
                "positive",
            ),
        ):
            lines.append(name)
            rows = s.get(key) or []
            if not rows:
                lines.append(f"  none (no {sign} score)")
                continue
            text = any(r["snippet"] for r in rows)
            lines.append(f"  {'#':>3}  {'score':>11}  {'batch':>5}  {'row':>4}" + "  text" * text)
            lines += [
                f"  {n:>3}  {r['score']:>11.4g}  {r['batch']:>5}  "
                f"{'-' if r['row'] is None else r['row']:>4}"
                + (f"  {r['snippet'] or ''}" if text else "")
                for n, r in enumerate(rows, 1)
            ]
        return "\n".join(lines)

    def summary_rows(self, result):
        s = result.summary
        cg = ("converged" if s["cg_converged"] else "NOT converged") + (
            ", negative curvature" if s["cg_negative_curvature"] else ""
        )
        damping = fmt(s["damping"], ".4g") + (
            f" (auto from Lanczos: λ_min ≈ {fmt(s['damping_lambda_min'], '.4g')}, "
            f"λ_max ≈ {fmt(s['damping_lambda_max'], '.4g')})"
            if s.get("damping_auto")
            else " (given)"
        )

        def pick(key, score_key, sign):
            i = s.get(key)
            if i is None:
                return f"none (no {sign} score)"
            top = (s.get("top_helpful" if sign == "negative" else "top_harmful") or [{}])[0]
            row = f" row {top['row']}" if top.get("row") is not None else ""
            return f"batch {top.get('batch', i)}{row} (score {fmt(s[score_key], '.4g')})"

        unit = "example" if s.get("per_example") else "batch"
        return [
            ("query loss", fmt(s["query_loss"])),
            (
                "CG",
                (
                    f"{s['cg_iterations']} iteration(s), {cg}, relative residual "
                    f"{fmt(s['cg_relative_residual'], '.3g')}"
                ),
            ),
            ("damping", damping),
            ("scores", f"{s['num_scores']} (one per {unit}; {s['num_candidates']} batch(es))"),
            ("most helpful", pick("most_helpful", "score_min", "negative")),
            ("most harmful", pick("most_harmful", "score_max", "positive")),
        ]
