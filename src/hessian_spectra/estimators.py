"""Extreme eigenvalues (Lanczos with full reorthogonalisation) and Hutchinson's trace."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .lanczos import LanczosResult, lanczos
from .linop import as_operator
from .vectors import Vector, dot, random_probe

__all__ = ["EigResult", "TraceEstimate", "top_eigenvalues", "trace"]


@dataclass
class EigResult:
    """Extreme Ritz values of one Lanczos run.

    Fields:
        eigenvalues: the ``k`` largest *algebraic* eigenvalue estimates, descending
            (also what ``np.asarray(result)``, ``len`` and indexing give).
        smallest: the ``k`` smallest algebraic estimates, ascending (the most negative curvature).
        residuals / residuals_smallest: ``|beta_m s_{m,i}|`` bounds on ||H y − θ y|| for each.
        vectors / vectors_smallest: Ritz vectors (unit norm) when ``return_vectors=True``.
        run: the Lanczos run they come from.
    """

    eigenvalues: np.ndarray
    smallest: np.ndarray
    residuals: np.ndarray
    residuals_smallest: np.ndarray
    run: LanczosResult = field(repr=False)
    vectors: list[Vector] | None = field(default=None, repr=False)
    vectors_smallest: list[Vector] | None = field(default=None, repr=False)

    @property
    def largest(self) -> np.ndarray:
        return self.eigenvalues

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.eigenvalues, dtype=dtype)

    def __len__(self):
        return len(self.eigenvalues)

    def __getitem__(self, i):
        return self.eigenvalues[i]

    def __iter__(self):
        return iter(self.eigenvalues)

    def to_dict(self) -> dict:
        return {
            "largest": self.eigenvalues.tolist(),
            "smallest": self.smallest.tolist(),
            "residuals": self.residuals.tolist(),
            "residuals_smallest": self.residuals_smallest.tolist(),
            "run": self.run.to_dict(),
        }


def top_eigenvalues(op, k: int, *, num_steps: int | None = None, seed: int = 0, return_vectors: bool = False,
                    basis_dtype=None, progress: bool = False) -> EigResult:
    """The ``k`` largest and ``k`` smallest algebraic eigenvalues of ``op`` by Lanczos.

    One run of ``num_steps`` steps (default ``min(P, max(3k, 2k + 20))``) with full
    reorthogonalisation, so converged Ritz values have no ghost copies. Extreme eigenvalues
    converge first; check ``residuals`` for how far each has.
    """
    op = as_operator(op)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > op.num_params:
        raise ValueError(f"k={k} exceeds the operator's dimension {op.num_params}")
    m = num_steps if num_steps is not None else min(op.num_params, max(3 * k, 2 * k + 20))
    run = lanczos(op, m, seed=seed, reorth="full", basis_dtype=basis_dtype, return_basis=return_vectors,
                  progress=progress)
    kk = min(k, run.num_steps)
    vals, res = run.ritz_values, run.residual_bounds()
    hi = np.arange(run.num_steps - 1, run.num_steps - 1 - kk, -1)
    lo = np.arange(kk)
    out = EigResult(eigenvalues=vals[hi], smallest=vals[lo], residuals=res[hi], residuals_smallest=res[lo], run=run)
    if return_vectors:
        out.vectors = run.ritz_vectors(hi)
        out.vectors_smallest = run.ritz_vectors(lo)
        run.basis = None
    return out


class TraceEstimate(tuple):
    """``(estimate, std_error)`` of Hutchinson's estimator; ``.samples`` holds each probe's ``z^T H z``."""

    def __new__(cls, estimate: float, std_error: float, samples):
        obj = super().__new__(cls, (float(estimate), float(std_error)))
        obj.samples = np.asarray(samples, dtype=np.float64)
        return obj

    @property
    def estimate(self) -> float:
        return self[0]

    @property
    def std_error(self) -> float:
        return self[1]


def trace(op, num_probes: int, *, seed: int = 0, progress: bool = False) -> TraceEstimate:
    """Hutchinson's estimate of tr(H) with Rademacher probes: ``mean_s z_s^T H z_s``.

    Probe ``s`` is ``random_probe(op, seed + s)``. The standard error is the sample standard
    deviation over ``sqrt(num_probes)`` (nan for one probe).
    """
    op = as_operator(op)
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    it = range(num_probes)
    if progress:
        from tqdm.auto import tqdm

        from . import distributed as _dist

        if _dist.is_rank0():
            it = tqdm(it, desc="Hutchinson probes", unit="probe")
    samples = []
    for s in it:
        z = random_probe(op, seed + s, kind="rademacher", dtype=op.vector_dtype)
        samples.append(dot(z, op.matvec(z)))
    x = np.asarray(samples)
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return TraceEstimate(float(x.mean()), se, x)
