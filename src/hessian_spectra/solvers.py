"""Conjugate gradients for inverse-HVPs: solve ``(H + damping·I) x = b``.

Hestenes–Stiefel CG from ``x_0 = 0`` (or ``x0``), stopping at iteration k when

    ||r_k|| ≤ max(tol · ||b||, atol),        r_k = b − (H + damping I) x_k,

the rule of ``scipy.sparse.linalg.cg`` (``rtol=tol``), so both give the same iterates at the
same ``max_iter``. A Hessian need not be positive definite: when a search direction has
``p^T (H + damping I) p ≤ 0`` CG stops there, returns the last iterate and reports
``negative_curvature=True`` (raise ``damping`` above −λ_min to make the system definite).
All scalars are float64 and every dot product is global, so this runs unchanged under FSDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .linop import as_operator
from .vectors import Vector, axpy, check_vector, clone, dot, zeros_like

__all__ = ["CGInfo", "cg_solve"]


@dataclass
class CGInfo:
    """What CG did: iterations, residual norms (``||r_0||`` first), convergence, negative
    curvature.
    """

    iterations: int
    residual_norms: list[float] = field(default_factory=list)
    converged: bool = False
    negative_curvature: bool = False
    curvature: float | None = None  # p^T A p at the direction where negative curvature was met

    @property
    def relative_residual(self) -> float:
        """``||r_k|| / ||r_0||`` of the last iterate (0 for a zero right-hand side).

        >>> CGInfo(iterations=2, residual_norms=[2.0, 1.0, 0.5]).relative_residual
        0.25
        """
        r = self.residual_norms
        return float(r[-1] / r[0]) if r and r[0] > 0 else 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        return {
            "iterations": self.iterations,
            "residual_norms": list(self.residual_norms),
            "converged": self.converged,
            "negative_curvature": self.negative_curvature,
            "curvature": self.curvature,
        }


def cg_solve(
    op,
    b: Vector,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    x0: Vector | None = None,
    callback=None,
) -> tuple[Vector, CGInfo]:
    """Solve ``(H + damping I) x = b`` by conjugate gradients (module docstring).

    Args:
        op: a ``HessianOperator``, anything with ``matvec``/``params``, or a square matrix.
        b: right-hand side, laid out like ``op.params``.
        damping: the shift λ ≥ 0 (Levenberg–Marquardt / influence-function damping).
        tol, atol: relative and absolute residual tolerances.
        max_iter: at most this many matvecs.
        x0: starting guess (default zeros).
        callback: ``callback(k, x, residual_norm)`` after each iteration.

    Returns:
        ``(x, info)``.
    """
    op = as_operator(op)
    b = check_vector(b, op.params, "b")
    if damping < 0:
        raise ValueError(f"damping must be ≥ 0, got {damping}")
    if not (tol >= 0 and atol >= 0):
        raise ValueError("tol and atol must be ≥ 0")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    dt = op.vector_dtype

    def A(v):
        out = [t.to(dt) for t in op.matvec(v)]
        if damping:
            axpy(damping, v, out)
        return out

    b = [t.to(dt) for t in b]
    if x0 is None:
        x = zeros_like(b)
        r = clone(b)
    else:
        x = clone(check_vector(x0, op.params, "x0"), dtype=dt)
        r = clone(b)
        axpy(-1.0, A(x), r)
    bnorm = dot(b, b) ** 0.5
    target = max(tol * bnorm, atol)
    rr = dot(r, r)
    info = CGInfo(iterations=0, residual_norms=[rr**0.5])
    if rr**0.5 <= target:
        info.converged = True
        return x, info
    p = clone(r)
    for k in range(1, max_iter + 1):
        Ap = A(p)
        pAp = dot(p, Ap)
        if pAp <= 0:
            info.negative_curvature, info.curvature = True, pAp
            break
        a = rr / pAp
        axpy(a, p, x)
        axpy(-a, Ap, r)
        rr_new = dot(r, r)
        info.iterations = k
        info.residual_norms.append(rr_new**0.5)
        if callback is not None:
            callback(k, x, rr_new**0.5)
        if rr_new**0.5 <= target:
            info.converged = True
            break
        beta = rr_new / rr
        rr = rr_new
        p = [t.mul_(beta) for t in p]
        axpy(1.0, r, p)
    return x, info
