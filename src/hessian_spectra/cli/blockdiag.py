"""``hessian-spectra blockdiag``: the block-diagonal test, one block per transformer layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .command import Command, Outcome, fmt
from .errors import CliError
from .options import positive_int

__all__ = ["BlockDiag", "BlockDiagOptions"]


@dataclass(frozen=True)
class BlockDiagOptions:
    """The options of ``blockdiag``."""

    probes: int = 1
    """Number of random probes (each costs blocks + 1 HVPs)."""

    def to_dict(self) -> dict:
        return asdict(self)


class BlockDiag(Command):
    name = "blockdiag"
    help = "block-diagonal test: Hv against H v_b, one block per transformer layer"
    description = (
        "Block-diagonal hypothesis test (FSHP §6): for a unit Gaussian probe v and "
        "each block b (one per transformer layer, the other parameters grouped by "
        "module), compares (Hv)_b with (H v_b)_b: rel_error, cosine, abs_error. Costs "
        "probes x (blocks + 1) HVPs. Writes result.json, blockdiag.png and log.txt."
    )
    Options = BlockDiagOptions

    def add_options(self, p) -> None:
        d = BlockDiagOptions()
        p.add_argument(
            "--probes",
            type=positive_int,
            default=d.probes,
            metavar="S",
            help=f"number of random probes (default: {d.probes})",
        )

    def run(self, ctx) -> Outcome:
        from .. import block_diagonal_test
        from ..blockdiag import default_blocks

        probes = ctx.config.options.probes
        groups = default_blocks(ctx.op.param_names)
        ctx.log.info(
            "block-diagonal test: %d block(s), %d probe(s) = %d HVPs (method %s)",
            len(groups),
            probes,
            probes * (len(groups) + 1),
            ctx.config.method,
        )
        if len(groups) < 2:
            raise CliError(
                f"the block-diagonal test needs at least two blocks; the parameters "
                f"form one ({next(iter(groups), '?')}): analyse more parameters "
                "(--params)"
            )
        rep = block_diagonal_test(ctx.op, groups, num_probes=probes, seed=ctx.config.seed)
        s = rep.summary()
        summary = {"num_blocks": s["num_blocks"], "num_probes": probes}
        for k in ("rel_error", "cosine", "abs_error"):
            summary[f"{k}_mean"], summary[f"{k}_std"] = s[k]["mean"], s[k]["std"]
        return Outcome(rep.to_dict(), summary)

    def tables(self, result) -> str:
        """One line per block (and probe): parameters, rel_error, cosine, abs_error."""
        rows = result.estimate["blocks"]
        w = max([len("block")] + [len(r["block"]) for r in rows])

        def g(x):
            return "n/a" if x is None else f"{x:.4g}"

        lines = [
            (
                f"{'block':<{w}}  {'probe':>5}  {'params':>12}  {'rel_error':>10}  "
                f"{'cosine':>10}  {'abs_error':>10}"
            )
        ]
        lines += [
            f"{r['block']:<{w}}  {r['probe']:>5}  {r['num_params']:>12,}  "
            f"{g(r['rel_error']):>10}  {g(r['cosine']):>10}  {g(r['abs_error']):>10}"
            for r in rows
        ]
        return "\n".join(lines)

    def summary_rows(self, result):
        s = result.summary
        rows = [("blocks", f"{s['num_blocks']} x {s['num_probes']} probe(s)")]
        rows += [
            (k, f"{fmt(s[k + '_mean'], '.4g')} ± {fmt(s[k + '_std'], '.3g')}")
            for k in ("rel_error", "cosine", "abs_error")
        ]
        return rows
