"""Conjugate gradients for inverse-HVPs: solve ``(H + damping·I) x = b``.

Hestenes–Stiefel CG from ``x_0 = 0`` (or ``x0``), stopping at iteration k when

    ||r_k|| ≤ max(tol · ||b||, atol),        r_k = b − (H + damping I) x_k,

the rule of ``scipy.sparse.linalg.cg`` (``rtol=tol``), so both give the same iterates at the
same ``max_iter``. A Hessian need not be positive definite: when a search direction has
``p^T (H + damping I) p ≤ 0`` CG stops there, returns the last iterate and reports
``negative_curvature=True`` (raise ``damping`` above −λ_min to make the system definite).
All scalars are float64 and every dot product is global, so this runs unchanged under FSDP.

:func:`auto_damping` chooses a damping from a short Lanczos run (the rule is in its docstring):
enough to make ``H + λI`` positive definite on an indefinite Hessian, and a floor that bounds the
condition number when ``H`` is (nearly) positive semi-definite.

>>> import torch
>>> from hessian_spectra import DenseOperator
>>> H = DenseOperator(torch.diag(torch.tensor([-2.0, 1.0, 3.0, 10.0], dtype=torch.float64)))
>>> choice = auto_damping(H)
>>> round(choice.value, 9), choice.term  # 1.5 · |λ_min|
(3.0, 'curvature')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._checks import check_positive_int
from .linop import as_operator
from .vectors import Vector, axpy, check_vector, clone, dot, zeros_like

__all__ = ["CGInfo", "DampingChoice", "auto_damping", "cg_solve"]


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
        damping: the shift λ ≥ 0 (Levenberg–Marquardt / influence-function damping);
            :func:`auto_damping` chooses one that makes ``H + λI`` positive definite.
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


@dataclass
class DampingChoice:
    """The damping :func:`auto_damping` chose, and the Lanczos estimates it came from.

    Fields:
        value: the damping λ.
        term: which term of the rule set it: ``"curvature"`` (−λ_min) or ``"floor"`` (‖H‖).
        lambda_min / lambda_max: the smallest and largest Ritz values θ_min, θ_max.
        residual_min / residual_max: their residual bounds ``|β_m s_{m,i}|``.
        num_steps: the Lanczos steps (= matvecs) it took.
        margin / rel_floor: the rule's constants.
    """

    value: float
    term: str
    lambda_min: float
    lambda_max: float
    residual_min: float
    residual_max: float
    num_steps: int
    margin: float
    rel_floor: float

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields and the rule in words."""
        return {
            "rule": "max((1 + margin) * max(0, -(lambda_min - residual_min)), "
            "rel_floor * max(|lambda_min|, |lambda_max|))",
            **{k: getattr(self, k) for k in self.__dataclass_fields__},
        }


def auto_damping(
    op,
    *,
    num_steps: int = 20,
    margin: float = 0.5,
    rel_floor: float = 0.01,
    reorth="none",
    seed: int = 0,
    progress: bool = False,
) -> DampingChoice:
    """A damping λ that makes ``H + λI`` positive definite and reasonably conditioned.

    One Lanczos run of ``num_steps`` steps (at most the dimension) gives the extreme Ritz
    values θ_min ≤ θ_max and the residual bound r_min of θ_min; then

        λ = max((1 + margin) · max(0, −(θ_min − r_min)),  rel_floor · max(|θ_min|, |θ_max|)).

    The first term shifts the most negative curvature found to ``margin · |θ_min − r_min|``
    above 0. Ritz values lie inside the spectrum (θ_min ≥ λ_min), so a short run can miss some
    negative curvature: ``θ_min − r_min`` and the margin guard against that, and ``H + λI`` is
    positive definite whenever ``(1 + margin) |θ_min − r_min| > |λ_min|``. Where it is not, CG
    still reports ``negative_curvature`` (raise ``num_steps`` or pass a larger damping). The
    floor bounds the condition number of ``H + λI`` by about
    ``(1 + rel_floor)(1 + margin) / (rel_floor · margin)`` (≈ 300 at the defaults) when the
    estimates are right, so CG converges in a predictable number of steps; on a
    positive-definite ``H`` only the floor applies (condition number ≤ ``1 + 1/rel_floor``).

    By default the run does not reorthogonalise (``reorth="none"``: three vectors in memory,
    not ``num_steps``; on a 135M model that is 1.6 GB instead of 11 GB at 20 steps): loss of
    orthogonality only adds ghost copies of converged Ritz values, which leave the extremes
    where they are (finite-precision Ritz values stay inside the spectrum, Paige 1971).

    Args:
        op: the operator (anything ``as_operator`` takes).
        num_steps: Lanczos steps (matvecs); capped at the dimension.
        margin: relative margin over the negative curvature found (> 0).
        rel_floor: the floor as a fraction of the spectral radius estimate (≥ 0).
        reorth: the Lanczos run's reorthogonalisation (``"none"``, ``"full"`` or a window).
        seed: the Lanczos start vector's seed.
        progress: a progress bar over the Lanczos steps.

    Returns:
        a :class:`DampingChoice`.
    """
    import warnings

    from .lanczos import GhostWarning, lanczos

    op = as_operator(op)
    num_steps = check_positive_int("num_steps", num_steps)
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a finite number > 0, got {margin}")
    if not (math.isfinite(rel_floor) and rel_floor >= 0):
        raise ValueError(f"rel_floor must be a finite number ≥ 0, got {rel_floor}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GhostWarning)  # ghosts do not move the extremes
        run = lanczos(
            op, min(num_steps, op.num_params), seed=seed, reorth=reorth, progress=progress
        )
    theta, res = run.ritz_values, run.residual_bounds()
    lo, hi = float(theta[0]), float(theta[-1])
    r_lo, r_hi = float(res[0]), float(res[-1])
    curvature = (1.0 + margin) * max(0.0, -(lo - r_lo))
    floor = rel_floor * max(abs(lo), abs(hi))
    return DampingChoice(
        value=max(curvature, floor),
        term="curvature" if curvature >= floor else "floor",
        lambda_min=lo,
        lambda_max=hi,
        residual_min=r_lo,
        residual_max=r_hi,
        num_steps=int(run.num_steps),
        margin=float(margin),
        rel_floor=float(rel_floor),
    )
