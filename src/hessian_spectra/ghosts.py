"""Ghosts of Lanczos without reorthogonalisation (Paige 1971; FSHP Thm 4.1), from ``T`` alone.

In floating point, once a Ritz value has converged the Lanczos vectors lose orthogonality in
its direction and the recurrence finds it again: a spurious copy ("ghost"). Two diagnostics
that need only the tridiagonal ``T`` (``alpha``, ``beta``), never the basis:

- :func:`ghost_indices`: the Cullum–Willoughby test (Cullum & Willoughby 1985, §4.5). The
  eigenvalues of ``T`` are grouped into clusters of numerically equal values (within ``tol``);
  in a cluster of ``c`` copies, ``c − 1`` are ghosts (one is kept: the one of largest weight).
  A simple eigenvalue of ``T`` that is also an eigenvalue of ``T̂`` (``T`` without its first row
  and column), within ``tol``, is spurious too: its eigenvector has a ~zero first component, so
  it carries no weight of the starting vector (a ghost that has not yet converged).
  Default ``tol = m · ε · ||T||₁`` for the clusters (copies of a converged value agree to
  ~``m ε ||T||``) and ``tol / m = ε · ||T||₁`` for the match with ``T̂`` (a looser one matches
  bulk Ritz values of little weight: on a float32 matrix with a clustered bulk it flagged 8
  of 80 Ritz values of a full-reorth run; this one flags none), with ``ε`` the machine epsilon
  of the dtype the recurrence ran in (``LanczosResult.vector_dtype``, the operator's; not the
  storage dtype of a bf16 basis: alpha and beta are computed in the operator's precision). A
  ghost of an fd operator whose copies differ by more than ``tol`` (the fd error) is found
  only by the second test, if at all.
- :func:`orthogonality_loss`: the ω-recurrence (Paige 1971, Simon 1984): an estimate of
  ``max_k<j |q_j · q_k|`` at every step from ``alpha`` and ``beta``, with rounding noise of
  size ``ε`` (the vectors' dtype) injected at every step and reset to ``ε`` for the vectors a
  step reorthogonalised against (``reorth``: all, the last ``r``, or none). Ghosts appear once
  it reaches ~``sqrt(ε)`` (semi-orthogonality lost). Like Simon's, it is pessimistic: on
  the tests' matrices it crosses ``sqrt(ε)`` within a few steps of the true loss and then runs
  up to ~10^5 above it, never far below (``tests/test_ghosts.py``). It models rounding only:
  a finite-difference HVP's own error is larger and makes orthogonality fail sooner, so for
  ``fd`` it can be low.

>>> import numpy as np
>>> ghost_indices([1.0, 2.0, 3.0], [0.5, 0.5]).tolist()  # distinct, all with weight: no ghosts
[]
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

__all__ = ["default_tol", "ghost_indices", "orthogonality_loss", "unit_roundoff"]


def unit_roundoff(dtype_name: str | None) -> float:
    """Machine epsilon of a dtype named as in ``result.config["basis_dtype"]`` (float64 if
    None or unknown).

    >>> unit_roundoff("float32") == 2.0 ** -23
    True
    """
    dt = getattr(torch, str(dtype_name), None) if dtype_name else None
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        dt = torch.float64
    return float(torch.finfo(dt).eps)


def default_tol(alpha, beta, eps: float = 2.0**-52) -> float:
    """``m · eps · ||T||₁``: the tolerance of :func:`ghost_indices` by default.

    >>> default_tol([1.0, 1.0], [1.0], eps=0.5)
    2.0
    """
    a = np.abs(np.asarray(alpha, dtype=np.float64))
    b = np.abs(np.asarray(beta, dtype=np.float64))
    if a.size == 0:
        return 0.0
    col = a.copy()
    col[:-1] += b
    col[1:] += b
    return float(a.size * eps * max(float(col.max()), np.finfo(np.float64).tiny))


def _eigvals(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    if alpha.size == 0:
        return np.zeros(0)
    if alpha.size == 1:
        return alpha.copy()
    return eigh_tridiagonal(alpha, beta, eigvals_only=True)


def ghost_indices(
    alpha, beta, tol: float | None = None, eps: float = 2.0**-52, *, full_reorth: bool = False
) -> np.ndarray:
    """Indices (into the ascending eigenvalues of ``T``) of the spurious Ritz values: the
    Cullum–Willoughby test (module docstring): clusters within ``tol`` (default
    :func:`default_tol` with ``eps``), matches with ``T̂`` within ``tol / m``.

    ``full_reorth=True`` (a run with full reorthogonalisation) applies the cluster test only:
    there the basis stays orthogonal, so a simple eigenvalue of ``T`` matching one of ``T̂`` is
    a genuine Ritz value whose eigenvector carries ~no weight of the starting vector (on
    SmolLM2-135M the outliers weigh 1e-9 to 1e-7 of a probe), not a ghost.

    >>> import numpy as np
    >>> # T of an exact Lanczos run on diag(1, 2, 3) from (1, 1, 1)/√3: no ghosts
    >>> a, b = [2.0, 2.0, 2.0], [np.sqrt(2 / 3), np.sqrt(1 / 3)]
    >>> ghost_indices(a, b).tolist()
    []
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    m = alpha.size
    if m < 2:
        return np.zeros(0, dtype=np.int64)
    if tol is None:
        tol = default_tol(alpha, beta, eps)
    vals, vecs = eigh_tridiagonal(alpha, beta)
    weights = vecs[0, :] ** 2
    hat = _eigvals(alpha[1:], beta[1:])
    ghosts = []
    i = 0
    while i < m:  # clusters of numerically equal eigenvalues (ascending, chained within tol)
        j = i + 1
        while j < m and vals[j] - vals[j - 1] <= tol:
            j += 1
        if j - i > 1:  # c copies: keep the one of largest weight
            keep = i + int(np.argmax(weights[i:j]))
            ghosts.extend(k for k in range(i, j) if k != keep)
        elif not full_reorth and hat.size and np.min(np.abs(hat - vals[i])) <= tol / m:
            ghosts.append(i)  # simple, and an eigenvalue of T̂: no weight, spurious
        i = j
    return np.asarray(ghosts, dtype=np.int64)


def orthogonality_loss(alpha, beta, eps: float = 2.0**-52, window: int | None = 0) -> np.ndarray:
    """The ω-recurrence estimate of ``max_{k<j} |q_j · q_k|`` for ``j = 0 .. m−1`` (module
    docstring); ``window``: 0 without reorthogonalisation, ``r`` for the last ``r`` vectors,
    None for full.

    >>> w = orthogonality_loss([1.0, 2.0, 3.0], [1.0, 1.0], eps=1e-16, window=None)
    >>> bool(np.all(w <= 1e-15))
    True
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    m = alpha.size
    out = np.zeros(m)
    if m < 2:
        return out
    # rows of the symmetric estimate ω(j, k) ≈ q_j·q_k, k ≤ j: prev = row j−1, cur = row j
    prev = np.array([1.0])
    cur = np.array([eps, 1.0])
    out[1] = eps
    for j in range(1, m - 1):
        # β_j+1 ω(j+1,k) = β_k+1 ω(j,k+1) + (α_k − α_j) ω(j,k) + β_k ω(j,k−1) − β_j ω(j−1,k)
        b = beta[j]
        if b <= 0:
            break
        k = np.arange(j)  # k = 0..j−1 (ω(j+1, j) is the local level, set below)
        up = beta[k] * cur[k + 1]
        mid = (alpha[k] - alpha[j]) * cur[k]
        low = np.where(k > 0, beta[np.maximum(k - 1, 0)] * cur[np.maximum(k - 1, 0)], 0.0)
        back = beta[j - 1] * prev[k]
        new = (up + mid + low - back) / b
        noise = eps * (beta[k] + b) * 0.3 / b  # rounding of the step, grows with |ω|
        new = new + np.where(new >= 0, noise, -noise)
        if window is None:
            new[:] = eps
        elif window > 0:
            lo = max(j + 2 - window, 0)  # step j+1 reorthogonalised against q_lo .. q_j
            new[lo:] = eps
        nxt = np.empty(j + 2)
        nxt[:j] = new
        nxt[j] = eps  # ω(j+1, j): local orthogonality of the three-term recurrence
        nxt[j + 1] = 1.0
        prev, cur = cur, nxt
        out[j + 1] = float(np.max(np.abs(nxt[: j + 1])))
        if not math.isfinite(out[j + 1]) or out[j + 1] >= 1.0:
            out[j + 1 :] = 1.0  # orthogonality fully lost: |q_j·q_k| cannot exceed 1
            break
    return out
