"""``hessian-spectra blockdiag``: the block-diagonal test (FSHP §6), one block per transformer
layer; embeddings, final norm and head measured as extra rows outside the layer statistics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .command import Command, Outcome, fmt
from .errors import CliError
from .options import positive_int

__all__ = ["BlockDiag", "BlockDiagOptions"]

_METRICS = (
    ("abs_error", "||H_block v − Hv||"),
    ("rel_error", "relative error"),
    ("cosine", "cosine similarity"),
)


@dataclass(frozen=True)
class BlockDiagOptions:
    """The options of ``blockdiag``."""

    probes: int = 1
    """Number of random probes (each costs blocks + 1 HVPs); the statistics pool them."""

    def to_dict(self) -> dict:
        return asdict(self)


class BlockDiag(Command):
    name = "blockdiag"
    help = "block-diagonal test: Hv against H v_b, one block per transformer layer"
    description = (
        "Block-diagonal hypothesis test (FSHP §6): for a unit Gaussian probe v and each "
        "block b, compares (Hv)_b with (H v_b)_b: abs_error ||(H_block v − Hv)_b||, "
        "rel_error, cosine. The blocks are the transformer layers (…layers.N, …h.N, "
        "…blocks.N); embeddings, final norm and head are measured too, as extra rows "
        "grouped by module, but left out of the statistics (a model without transformer "
        "layers uses its module blocks as the layers). The summary is FSHP Table 6's: "
        "mean ± std over layers and probes, pooled, and the number of layer blocks. Costs "
        "probes x (blocks + extras + 1) HVPs. Writes result.json, blockdiag.png (per "
        "layer, mean ± std over probes) and log.txt."
    )
    Options = BlockDiagOptions

    def add_options(self, p) -> None:
        d = BlockDiagOptions()
        p.add_argument(
            "--probes",
            type=positive_int,
            default=d.probes,
            metavar="S",
            help=(
                f"number of random probes, pooled with the layers in the statistics "
                f"(default: {d.probes})"
            ),
        )

    def run(self, ctx) -> Outcome:
        from .. import block_diagonal_test
        from ..blockdiag import layer_blocks

        probes = ctx.config.options.probes
        layers, extras = layer_blocks(ctx.op.param_names)
        if not layers:
            layers, extras = extras, {}
            ctx.log.info("no transformer layers found: the module blocks are the layers")
        n = len(layers) + len(extras)
        ctx.log.info(
            "block-diagonal test: %d layer block(s) + %d extra, %d probe(s) = %d HVPs (method %s)",
            len(layers),
            len(extras),
            probes,
            probes * (n + 1),
            ctx.config.method,
        )
        if n < 2:
            raise CliError(
                f"the block-diagonal test needs at least two blocks; the parameters "
                f"form one ({next(iter(layers), '?')}): analyse more parameters "
                "(--params)"
            )
        rep = block_diagonal_test(ctx.op, num_probes=probes, seed=ctx.config.seed)
        s = rep.summary()
        summary = {
            "num_blocks": s["num_blocks"],
            "num_probes": s["num_probes"],
            "num_extra_blocks": s["num_extra_blocks"],
            "num_undefined": s["num_undefined"],
        }
        for k, _ in _METRICS:
            summary[f"{k}_mean"], summary[f"{k}_std"] = s[k]["mean"], s[k]["std"]
        return Outcome(rep.to_dict(), summary)

    def tables(self, result) -> str:
        """One line per block, mean ± std over probes: layer blocks in order, then extras."""
        rows = result.estimate.get("per_block") or []
        w = max([len("block")] + [len(r["block"]) for r in rows])

        def g(m):
            return "n/a" if m["mean"] is None else f"{m['mean']:.4g} ± {fmt(m['std'], '.2g')}"

        lines = [
            (
                f"{'block':<{w}}  {'layer':>5}  {'params':>12}  {'abs_error':>19}  "
                f"{'rel_error':>19}  {'cosine':>19}"
            )
        ]
        lines += [
            f"{r['block']:<{w}}  {'extra' if r['kind'] == 'extra' else r['layer']:>5}  "
            f"{r['num_params']:>12,}  {g(r['abs_error']):>19}  {g(r['rel_error']):>19}  "
            f"{g(r['cosine']):>19}"
            for r in rows
        ]
        return "\n".join(lines)

    def summary_rows(self, result):
        s = result.summary
        extra = s.get("num_extra_blocks") or 0
        found = ((result.estimate or {}).get("config") or {}).get("layers_found", True)
        rows = [
            (
                "blocks",
                f"{s['num_blocks']} layer(s)"
                + (f" (+{extra} extra, not in the statistics)" if extra else "")
                + ("" if found else " (no transformer layers: one per module)"),
            ),
            ("probes", str(s["num_probes"])),
        ]
        rows += [
            (f"{label} (layers)", f"{fmt(s[k + '_mean'], '.4g')} ± {fmt(s[k + '_std'], '.3g')}")
            for k, label in _METRICS
        ]
        if s.get("num_undefined"):
            rows.append(
                (
                    "undefined",
                    f"{s['num_undefined']} layer row(s) with (Hv)_b = 0: no rel_error/cosine, "
                    "left out of their means",
                )
            )
        return rows
