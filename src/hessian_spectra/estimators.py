"""Extreme eigenvalues (Lanczos with full reorthogonalisation) and Hutchinson's trace.

>>> import torch
>>> from hessian_spectra import DenseOperator
>>> op = DenseOperator(torch.diag(torch.tensor([-2.0, 1.0, 3.0, 5.0], dtype=torch.float64)))
>>> top_eigenvalues(op, 1, num_steps=4).eigenvalues.round(12).tolist()
[5.0]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._checks import check_positive_int, std_error
from ._progress import progress_bar
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
        """Same as ``eigenvalues``: the ``k`` largest, descending."""
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
        """A JSON-ready dict: ``largest``, ``smallest``, their residual bounds and the run."""
        return {
            "largest": self.eigenvalues.tolist(),
            "smallest": self.smallest.tolist(),
            "residuals": self.residuals.tolist(),
            "residuals_smallest": self.residuals_smallest.tolist(),
            "run": self.run.to_dict(),
        }


def top_eigenvalues(
    op,
    k: int,
    *,
    num_steps: int | None = None,
    seed: int = 0,
    return_vectors: bool = False,
    basis_dtype=None,
    basis_dir=None,
    basis_device=None,
    progress: bool = False,
) -> EigResult:
    """The ``k`` largest and ``k`` smallest algebraic eigenvalues of ``op`` by Lanczos.

    One run of ``num_steps`` steps (default ``min(P, max(3k, 2k + 20))``) with full
    reorthogonalisation, so converged Ritz values have no ghost copies. Extreme eigenvalues
    converge first; check ``residuals`` for how far each has. ``basis_dtype``, ``basis_dir``
    and ``basis_device`` say how the Lanczos vectors are kept, as in ``lanczos``.

    >>> import torch
    >>> from hessian_spectra import DenseOperator
    >>> eigs = torch.cat([torch.linspace(0, 1, 98), torch.tensor([50.0, 100.0])]).double()
    >>> res = top_eigenvalues(DenseOperator(torch.diag(eigs)), 2, seed=0)  # 24 steps
    >>> res.eigenvalues.round(9).tolist(), bool(res.residuals.max() < 1e-9)
    ([100.0, 50.0], True)
    """
    op = as_operator(op)
    k = check_positive_int("k", k)
    if k > op.num_params:
        raise ValueError(f"k={k} exceeds the operator's dimension {op.num_params}")
    m = num_steps if num_steps is not None else min(op.num_params, max(3 * k, 2 * k + 20))
    run = lanczos(
        op,
        m,
        seed=seed,
        reorth="full",
        basis_dtype=basis_dtype,
        basis_dir=basis_dir,
        basis_device=basis_device,
        return_basis=return_vectors,
        progress=progress,
    )
    kk = min(k, run.num_steps)
    vals, res = run.ritz_values, run.residual_bounds()
    hi = np.arange(run.num_steps - 1, run.num_steps - 1 - kk, -1)
    lo = np.arange(kk)
    out = EigResult(
        eigenvalues=vals[hi],
        smallest=vals[lo],
        residuals=res[hi],
        residuals_smallest=res[lo],
        run=run,
    )
    if return_vectors:
        out.vectors = run.ritz_vectors(hi)
        out.vectors_smallest = run.ritz_vectors(lo)
        run.basis = None
    return out


class TraceEstimate(tuple):
    """``(estimate, std_error)`` of Hutchinson's estimator; ``.samples`` holds each probe's
    ``z^T H z``.

    >>> est, se = TraceEstimate(4.0, 0.5, [3.5, 4.5])
    >>> est, se
    (4.0, 0.5)
    """

    def __new__(cls, estimate: float, std_error: float, samples):
        obj = super().__new__(cls, (float(estimate), float(std_error)))
        obj.samples = np.asarray(samples, dtype=np.float64)
        return obj

    @property
    def estimate(self) -> float:
        """The mean of the samples."""
        return self[0]

    @property
    def std_error(self) -> float:
        """The standard error of the mean (nan for one probe)."""
        return self[1]


def trace(op, num_probes: int, *, seed: int = 0, progress: bool = False) -> TraceEstimate:
    """Hutchinson's estimate of tr(H) with Rademacher probes: ``mean_s z_s^T H z_s``.

    Probe ``s`` is ``random_probe(op, seed + s)``. The standard error is the sample standard
    deviation over ``sqrt(num_probes)`` (nan for one probe).

    >>> import torch
    >>> from hessian_spectra import DenseOperator
    >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    >>> est, se = trace(op, 4)  # z^T H z = tr(H) for every ±1 probe of a diagonal H
    >>> est, se
    (6.0, 0.0)
    """
    op = as_operator(op)
    num_probes = check_positive_int("num_probes", num_probes)
    samples = []
    with progress_bar(progress, total=num_probes, desc="Hutchinson probes", unit="probe") as bar:
        for s in range(num_probes):
            z = random_probe(op, seed + s, kind="rademacher", dtype=op.vector_dtype)
            samples.append(dot(z, op.matvec(z)))
            if bar is not None:
                bar.update(1)
    x = np.asarray(samples)
    return TraceEstimate(float(x.mean()), std_error(x), x)
