"""``hessian-spectra eigs``: the largest and smallest eigenvalues (Lanczos, full reorth)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .command import Command, Outcome, fmt
from .errors import CliError
from .options import (
    DTYPE_NAMES,
    MAX_BASIS_MEMORY,
    add_basis_storage,
    basis_placement,
    lanczos_overhead,
    positive_int,
)

__all__ = ["Eigs", "EigsOptions"]


@dataclass(frozen=True)
class EigsOptions:
    """The options of ``eigs``."""

    k: int = 3
    """How many eigenvalues at each end."""
    steps: int = 16
    """Lanczos steps (= HVPs)."""
    basis_dtype: str | None = None
    """Storage dtype of the Lanczos vectors (None: the HVP dtype)."""
    basis_dir: str | None = None
    """Folder for the stored Lanczos vectors (None: in memory up to ``max_basis_memory``)."""
    basis_device: str | None = None
    """Device of the stored Lanczos vectors (None: the model's)."""
    max_basis_memory: str = MAX_BASIS_MEMORY
    """Beyond this size in host memory the stored Lanczos vectors go to files."""

    def to_dict(self) -> dict:
        return asdict(self)


class Eigs(Command):
    name = "eigs"
    help = "top and bottom k eigenvalues (Lanczos with full reorthogonalisation)"
    description = (
        "Largest and smallest algebraic Hessian eigenvalues by Lanczos with full "
        "reorthogonalisation, with residual bounds."
    )
    Options = EigsOptions

    def add_options(self, p) -> None:
        d = EigsOptions()
        p.add_argument(
            "-k",
            "--k",
            type=positive_int,
            default=d.k,
            help=f"how many at each end (default: {d.k})",
        )
        p.add_argument(
            "--steps",
            type=positive_int,
            default=d.steps,
            metavar="M",
            help=f"Lanczos steps = HVPs (default: {d.steps}; more for accuracy)",
        )
        p.add_argument(
            "--basis-dtype",
            choices=DTYPE_NAMES,
            default=None,
            help="storage dtype of the Lanczos vectors (default: the HVP dtype)",
        )
        add_basis_storage(p)

    def run(self, ctx) -> Outcome:
        from .. import top_eigenvalues
        from .._checks import parse_dtype

        o = ctx.config.options
        steps = min(o.steps, ctx.op.num_params)
        if o.k > steps:
            raise CliError(f"-k {o.k} needs at least as many --steps (got {steps})")
        ctx.log.info(
            "Lanczos (full reorth): %d steps for the %d largest and smallest eigenvalues",
            steps,
            o.k,
        )
        res = top_eigenvalues(
            ctx.op,
            o.k,
            num_steps=steps,
            seed=ctx.config.seed,
            basis_dtype=o.basis_dtype,
            basis_dir=basis_placement(
                ctx,
                ctx.op.params,
                steps,
                parse_dtype(o.basis_dtype, "basis_dtype") or ctx.op.vector_dtype,
            ),
            basis_device=o.basis_device,
            progress=not ctx.config.quiet,
        )
        summary = {
            "lambda_max": float(res.eigenvalues[0]),
            "lambda_min": float(res.smallest[0]),
            "largest": res.eigenvalues.tolist(),
            "smallest": res.smallest.tolist(),
            "residual_lambda_max": float(res.residuals[0]),
            "residual_lambda_min": float(res.residuals_smallest[0]),
            "num_ghosts": int(res.run.num_ghosts),
            **lanczos_overhead([res.run.to_dict()]),
        }
        return Outcome(res.to_dict(), summary)

    def summary_rows(self, result):
        s = result.summary
        return [
            ("lambda_max", fmt(s.get("lambda_max"))),
            ("lambda_min", fmt(s.get("lambda_min"))),
            ("largest", ", ".join(f"{x:.5g}" for x in s["largest"])),
            ("smallest", ", ".join(f"{x:.5g}" for x in s["smallest"])),
        ]
