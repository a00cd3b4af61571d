"""The finite-difference step, its error model and the measurement of its error.

The central difference ``H_ε v = (∇L(θ+εv) − ∇L(θ−εv)) / 2ε`` (FSHP eq. 1). For a unit
direction ``u`` and a step ``s`` FSHP Thm 3.1 (App. A) splits its error into

    ||H_s u − H u||  ≈  a_u s²  +  b / s                                                  (1)

- truncation ``a_u s²``, with ``a_u = ||∇(D³L[u,u,u])|| / 6`` (the Taylor series of the two
  gradients: the even terms cancel, the cubic one survives);
- rounding ``b / s``: each gradient carries an absolute floating-point error of norm ``~ b``
  that the subtraction does not cancel, and the perturbed parameters θ ± su are themselves
  rounded. Thm 3.1 writes ``b ~ ε_mach ||∇L||``; we *measure* ``b`` instead, because at a
  minimum ``||∇L||`` goes to zero while the rounding of a backward pass does not.

(1) is smallest at ``s* = (b / 2a_u)^{1/3}``, where the error is ``1.5 b / s*`` (Thm 3.1's
``O(ε_mach^{2/3})``); within a factor 3 of that minimum for any ``s`` in ``[0.23, 2.9]·s*``.

**Calibration** (:func:`calibrate`, once per operator, 8–12 extra gradient passes). Along a
seeded unit Rademacher probe ``u₀``: a Richardson pair ``h(S), h(2S)`` at a step ``S`` where
truncation dominates gives ``a₀ = ||h(2S) − h(S)|| / 3S²`` (``h(2S) − h(S) = 3a₀S²·t`` with
``t`` the unit truncation direction); a product at a step ``σ = S/64`` where rounding dominates
gives ``b = σ ||h(σ) − R||`` with ``R = (4h(S) − h(2S))/3`` the Richardson extrapolation.
``S`` starts at ``ε_mach^{1/3} / κ(u₀)`` and grows ×8 until truncation dominates there
(``s₀* < S/2``); ``σ`` shrinks if rounding did not dominate (``s₀* < 4σ``). ``s₀*`` and the
steps of redone products (below) are snapped to powers of √2 (:func:`snap`): ``b`` and the
curvature change are measured through rounding noise that differs with the world size, and
without snapping an FSDP run and a one-process run would take slightly different steps.

**The step along any direction** ``v``: ``ε(v) = c(ρ(v)) / κ(v)`` with

    κ(v) = max_i ||v_i|| / ||θ_i||   over the parameter tensors i with θ_i ≠ 0,
    ρ(v) = Σ_i p_i² / u_i,  p_i = ||v_i||² / ||v||²,  u_i = n_i / P   (:func:`concentration`),
    c(ρ) = c₀^{1−w} · c_K^w,  w = min(1, log ρ / log ρ(q))     (c₀ for ρ ≤ 1),
    c₀   = s₀* · κ(u₀),  c_K = s_K* · κ(q)     (calibrated; uncalibrated: c = 0.1·ε_mach^{1/3}),

where ``q = Hu₀/||Hu₀||`` (the Richardson ``R`` normalised) is the Krylov successor of the
probe and ``s_K*`` the best step along it, estimated from the even part of one product at
``c₀/κ(q)`` (below; 2 passes, after ``∇L(θ)`` is sampled). ``ρ`` says how unevenly ``v``
spreads over the tensors: 1 for a Rademacher probe (its share of each tensor is the tensor's
share of the entries), ``P/n_i`` for a direction on tensor i alone. No tensor moves by more
than the fraction ``c`` of its norm. Why two constants: Lanczos vectors after the first lie
in ``span{u₀, Hu₀, H²u₀, ...}`` and, like ``q``, concentrate on the sharp tensors, and along
them the best constant ``s*·κ(v)`` is far below the random probe's: on SmolLM2-135M (2 × 128
tokens) ``c₀`` put the step 7.6–28× over the estimated best along all 15 Lanczos vectors after
the first (each redone: 2 more passes), ``c_K = 0.087 c₀``, and with ``c(ρ)`` (``ρ(q)`` =
1.2e3, the vectors' 1.6e3–3.0e4) all 16 steps were within 0.66–2.45× of the best and none was
redone; on tiny float32 transformers (``ρ(q)`` = 6–22) 12 Lanczos steps redo 0–6 products
instead of 5–10, the extreme Ritz values as close to exact products' (``tests/test_fd_step.py``).
No ratio of norms in place of κ did this (the best constants of Lanczos vectors over the
probe's varied 4–15× with any of them); the geometric mean ``(c₀·c_K)^½`` for every vector
did on the tiny models but left SmolLM2's 2.2–8.3× over the best. Why per tensor: Lanczos
vectors after the first concentrate on a few sharp tensors (on SmolLM2-135M the layer-0
RMSNorm weights), and the best step along them is ~100× smaller than along a random probe; the
global rule ``c ||θ|| / ||v||`` had relative error ≈ 1 on the second and third Lanczos vectors
there. Why calibrated: the fixed ``c = 0.1·ε_mach^{1/3}`` was 10–17× below the best step
along random probes of 2.5k–4.5k-parameter MLP, CNN and transformer models in float32, with
5–20× the best error (``benchmarks/fd_step.py``). Calibrated, the step along random probes is
the best of a sweep.

**The error estimate of every product, and a second look at its step.** The operator computes
``∇L(θ)`` (one gradient pass, once) and reads, after each of the two passes of a product, the
even part of its gradient pair ``∇L(θ+su) + ∇L(θ−su) − 2∇L(θ) = s² ∇(D²L[u,u]) + O(s⁴)``.
Its norm is read from a fixed sample of the entries (:class:`~hessian_spectra.hvp.FDBuffers`:
every entry of a tensor of up to 4096, every 31st of a larger one, weighted by numel /
samples), so neither ``∇L(θ)`` nor ``∇L(θ+su)`` is kept whole: about 2/31 of a vector in
all, no parameter-sized temporary (the whole pair would need two vectors beside the
snapshot); the sample's norm is within 6% of the whole one on a float64 MLP whose two
weights give 100 sampled entries (``tests/test_hvp.py``), far inside (2)'s spread below.
With ``D = ||∇(D²L[u,u])||`` and one length scale ℓ on which the loss changes along ``u``
(``||Hu|| ~ ||∇L||/ℓ``, ``D ~ ||Hu||/ℓ``, ``||∇D³L|| ~ ||Hu||/ℓ²``):

    a_u ≈ D² / (6 ||Hu||)                                                                (2)

measured against ``||∇(D³L[u,u,u])||/6`` on 21 directions (random probes, top eigenvectors,
Lanczos vectors) of six float64 models: ratio 0.2–2.1. The estimate ``a_u s² + b/s`` costs no
gradient. The step ``c / κ(v)`` is chosen before the product, so it can be wrong where κ does
not see the curvature change (the top eigenvector of a tiny transformer: 66× the best error
with κ alone). When (2) puts the step outside ``[0.3, 2.5]·s*_u`` (estimated error > ~2.2× the
best), the product is redone once at ``s*_u = (b / 2a_u)^{1/3}`` (2 more passes; counted in
``op.stats["fd_retries"]``). (Carrying the last product's ratio ``s*/(c/κ)`` over to the
next a-priori step cut the redone Lanczos products of a tiny float32 transformer from 10 to 3
of 12, but made a product depend on the ones before it: a resumed Lanczos run no longer
reproduced the uninterrupted one, so the step stays a function of ``v`` and the calibrated
constants; the concentration rule above does it within that.) Without ``∇L(θ)``
(:func:`FDModel.estimate` with ``d2=None``) the scale model ``a_u = a₀ (||Hu|| / ||Hu₀||)²``
is used.

**The four-point stencil** ``(8(g(s) − g(−s)) − (g(2s) − g(−2s))) / 12s`` (``stencil=
"four-point"``, 4 gradients a product) has error ``a4_u s⁴ + 1.34 b / s`` (the ``s²`` term
cancels; ``1.34 = (8²+8²+1+1)^½/12 / (2^½/2)`` for independent gradient errors). Its
calibration adds a four-point Richardson pair ``a4₀ = ||h4(2S) − h4(S)|| / 15S⁴`` (8 more
passes); its step is ``c4 / κ(v)`` with ``c4 = κ(u₀) (1.34 b / 4a4₀)^{1/5}``, and ``a4_u ≈
D⁴ / 30||Hu||³`` by (2)'s length scale (redone outside ``[0.4, 1.8]·s*_u``). The central
stencil stays the default: half the passes, and its error (1–5e-5 along random probes and
Lanczos vectors of the issue-sized fp32 models) gives their top eigenvalues to 3.5e-6, 1.8e-6
and 1.6e-5 (CNN) in 40 Lanczos steps; the four-point stencil gives 4e-8, 5e-6 and 1.4e-6 at
1.6–1.8× the time (``benchmarks/fd_step.py``): use it where top eigenvalues must be right to
1e-5.

:func:`fd_error` and :func:`eps_sweep` measure the error of ``H_ε v`` against an exact HVP or a
Richardson extrapolation; :func:`fit_error_model` fits (1) to a measured sweep.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from .vectors import Vector, check_vector, norm, tensor_norms, unit_probe

__all__ = [
    "STENCILS",
    "ErrorFit",
    "FDAccuracyError",
    "FDError",
    "FDEstimate",
    "FDModel",
    "calibrate",
    "check_eps",
    "compute_dtype",
    "concentration",
    "default_eps_scale",
    "eps_sweep",
    "fd_error",
    "fd_step",
    "fit_error_model",
    "perturbation_rounding",
    "perturbation_scale",
    "snap",
]

STENCILS = ("central", "four-point")
# (offset in steps, weight) and the divisor of Σ w g(θ + offset·s·v) / (divisor · s)
_STENCIL_POINTS = {
    "central": (((1.0, 1.0), (-1.0, -1.0)), 2.0),
    "four-point": (((1.0, 8.0), (-1.0, -8.0), (2.0, -1.0), (-2.0, 1.0)), 12.0),
}
# rounding of the four-point stencil relative to the central one's b/s, for independent
# gradient errors: (8² + 8² + 1 + 1)^½ / 12 against 2^½ / 2
_FOUR_POINT_ROUNDING = (130**0.5 / 12) / (2**0.5 / 2)


class FDAccuracyError(ValueError):
    """The estimated error of an fd product exceeds the operator's ``max_fd_error``."""


def snap(step: float) -> float:
    """``step`` rounded to the nearest power of √2 (finite, positive ``step``; else as is).

    The measured ``b`` and curvature change carry rounding noise that differs with the order
    of summation (world size, kernels); snapping the steps made from them keeps runs at
    different world sizes on the same steps. A snapped step is within 2^¼ of the model's best,
    where (1) is within 1.04× of its minimum.

    >>> snap(0.25), round(snap(0.3), 6), snap(1e-3) == 2.0 ** -10
    (0.25, 0.353553, True)
    """
    if not (math.isfinite(step) and step > 0):
        return step
    return 2.0 ** (round(2 * math.log2(step)) / 2)


def check_stencil(stencil: str) -> str:
    """``stencil`` if it is one of :data:`STENCILS`, else a ``ValueError``.

    >>> check_stencil("central")
    'central'
    """
    if stencil not in STENCILS:
        raise ValueError(f"stencil must be one of {STENCILS}, got {stencil!r}")
    return stencil


def stencil_points(stencil: str):
    """``((offset, weight), ...), divisor`` of ``stencil``: ``H_s v = Σ w ∇L(θ + offset·s·v) /
    (divisor · s)``.

    >>> stencil_points("central")
    (((1.0, 1.0), (-1.0, -1.0)), 2.0)
    """
    return _STENCIL_POINTS[check_stencil(stencil)]


def default_eps_scale(dtype: torch.dtype) -> float:
    """The uncalibrated relative step ``c = 0.1 · ε_mach(dtype)^{1/3}`` (module docstring).

    >>> round(default_eps_scale(torch.float32), 6)
    0.000492
    """
    return 0.1 * torch.finfo(dtype).eps ** (1.0 / 3.0)


def check_eps(eps, what: str = "eps") -> float:
    """``eps`` as a float, or a ``ValueError`` unless it is a positive finite number.

    >>> check_eps(1e-3)
    0.001
    """
    if (
        isinstance(eps, bool)
        or not isinstance(eps, (int, float))
        or not (math.isfinite(eps) and eps > 0)
    ):
        raise ValueError(
            f"{what} must be a positive finite number or None (the default step), got {eps!r}: "
            f"the fd step moves the parameters to θ ± {what}·v"
        )
    return float(eps)


def perturbation_scale(
    v: Vector, theta_norms: list[float], norms: list[float] | None = None
) -> float:
    """``κ(v) = max_i ||v_i|| / ||θ_i||`` over the nonzero tensors (``||v||`` if ``v`` lives
    only on zero tensors; 0 for a zero ``v``); ``norms``: ``tensor_norms(v)`` if already known.

    >>> perturbation_scale([torch.ones(4), torch.ones(1)], [4.0, 0.0])
    0.5
    """
    norms = tensor_norms(v) if norms is None else norms
    ratios = [a / b for a, b in zip(norms, theta_norms) if b > 0]
    s = max(ratios, default=0.0)
    return s if s > 0 else math.sqrt(sum(x * x for x in norms))


def concentration(norms: list[float], sizes: list[int]) -> float:
    """How unevenly a direction spreads over the tensors: ``Σ_i p_i² / u_i`` with ``p_i =
    ||v_i||² / ||v||²`` its share on tensor i and ``u_i = n_i / P`` the tensor's share of the
    entries. 1 for a random (Rademacher) probe, near 1 for a Gaussian one, ``P / n_i`` for a
    direction on tensor i alone (module docstring); 1 for a zero direction.

    >>> concentration([1.0, 1.0], [1, 1]), concentration([1.0, 0.0], [1, 3])
    (1.0, 4.0)
    """
    tot = sum(x * x for x in norms)
    P = sum(sizes)
    if not (tot > 0 and P > 0):
        return 1.0
    return sum((x * x / tot) ** 2 / (n / P) for x, n in zip(norms, sizes) if n > 0)


def fd_step(
    v: Vector, theta_norms: list[float], dtype: torch.dtype, scale: float | None = None
) -> float:
    """The step along ``v``: ``scale / κ(v)`` (module docstring), with ``theta_norms`` the global
    norms of the parameter tensors and ``scale`` the calibrated constant (default: the
    uncalibrated ``default_eps_scale(dtype)``). A zero ``v`` gets 0 (its product is 0).

    >>> fd_step([torch.ones(4)], [2.0], torch.float64) == default_eps_scale(torch.float64)
    True
    """
    k = perturbation_scale(v, theta_norms)
    if k == 0:
        return 0.0
    c = default_eps_scale(dtype) if scale is None else scale
    return c / k


def compute_dtype(model: torch.nn.Module, param_dtype: torch.dtype) -> torch.dtype:
    """The lowest precision the parameters are *computed* in: ``param_dtype``, or an FSDP2
    ``MixedPrecisionPolicy(param_dtype=...)`` of any of the model's modules if lower. (A step
    applied in float32 but below the resolution of that dtype vanishes in the cast.) Autocast
    inside ``loss_fn`` is not visible here; the calibration measures its effect.

    >>> compute_dtype(torch.nn.Linear(2, 2), torch.float32)
    torch.float32
    """
    low = param_dtype
    for m in model.modules():
        get = getattr(m, "_get_fsdp_state", None)
        if get is None:
            continue
        try:
            pd = get()._mp_policy.param_dtype
        except Exception:  # noqa: BLE001  # private FSDP2 state; absent in other versions
            pd = None
        if pd is not None and torch.finfo(pd).bits < torch.finfo(low).bits:
            low = pd
    return low


def perturbation_rounding(params, v: Vector, eps: float, dtype: torch.dtype | None = None) -> float:
    """The relative part of the perturbation lost to rounding: ``||fl(θ+εv) − fl(θ−εv) − 2εv||
    / ||2εv||`` with ``fl`` rounding to ``dtype`` (default: each parameter's own). Near 1: the
    step is below the parameters' resolution and the fd product is mostly noise. O(P) vector
    work, no gradient.

    >>> p = [torch.full((4,), 256.0, dtype=torch.bfloat16)]
    >>> perturbation_rounding(p, [torch.full((4,), 0.5)], 0.5)  # 256 ± 0.25 rounds to 256
    1.0
    """
    from . import distributed as _dist

    num = []
    den = []
    for p, t in zip(params, v):
        x = _dist.local(p).detach().double()
        d = eps * t.double()
        dt = dtype or p.dtype
        applied = (x + d).to(dt).double() - (x - d).to(dt).double()
        num.append(applied - 2 * d)
        den.append(2 * d)
    dn = norm(den)
    return norm(num) / dn if dn > 0 else 0.0


@dataclass(frozen=True)
class FDEstimate:
    """The error model's estimate for one fd product: ``eps`` the step used (along ``v`` as
    given), ``rel_error`` = ``abs_error / ||Hv||``, and its two parts (absolute, for ``v``).
    """

    eps: float
    rel_error: float
    abs_error: float
    truncation: float
    rounding: float

    def to_dict(self) -> dict:
        """The fields as a dict (for ``result.json``)."""
        return asdict(self)


@dataclass(frozen=True)
class FDModel:
    """Thm 3.1's error model (1) of an operator's fd products, calibrated on one unit probe
    (module docstring): ``a0``/``b`` the truncation and rounding coefficients along ``u₀``,
    ``hu0`` = ``||Hu₀||``, ``kappa0`` = κ(u₀), ``step0`` the best step along ``u₀`` for
    ``stencil`` and ``scale`` = ``step0 · kappa0`` (the constant ``c₀`` of the step rule);
    ``scale_krylov`` = ``c_K``, the best constant ``s*·κ`` along the Krylov direction
    ``Hu₀/||Hu₀||``, and ``conc_krylov`` its :func:`concentration` (``None`` where not
    measured: the step is then ``scale / κ(v)`` for every ``v``); :meth:`constant` is ``c`` for
    a direction; ``a4`` the four-point truncation coefficient (``None`` for the central
    stencil); ``gradients``: passes spent.

    >>> m = FDModel(a0=1.0, b=2e-6, hu0=1.0, kappa0=1.0, step0=0.01, scale=0.01,
    ...             stencil="central", gradients=6)
    >>> e = m.estimate(1.0, 0.01, 1.0)
    >>> round(e.truncation, 8), round(e.rounding, 8)
    (0.0001, 0.0002)
    """

    a0: float
    b: float
    hu0: float
    kappa0: float
    step0: float
    scale: float
    stencil: str
    gradients: int
    a4: float | None = None
    scale_krylov: float | None = None
    conc_krylov: float | None = None

    def constant(self, conc: float = 1.0) -> float:
        """The constant ``c`` of the step rule for a direction of concentration ``conc``
        (:func:`concentration`): ``scale`` for a random-like one (1), ``scale_krylov`` from
        the concentration of the Krylov direction on, geometric in between.

        >>> m = FDModel(a0=1.0, b=2e-6, hu0=1.0, kappa0=1.0, step0=0.01, scale=0.01,
        ...             stencil="central", gradients=8, scale_krylov=0.001, conc_krylov=100.0)
        >>> round(m.constant(1.0), 6), round(m.constant(10.0), 6), round(m.constant(1e3), 6)
        (0.01, 0.003162, 0.001)
        """
        ck, qk = self.scale_krylov, self.conc_krylov
        if ck is None or qk is None or not qk > 1 or not conc > 1:
            return self.scale
        w = min(1.0, math.log(conc) / math.log(qk))
        return self.scale ** (1 - w) * ck**w

    def step(self, v: Vector, theta_norms: list[float], sizes: list[int] | None = None) -> float:
        """The step along ``v``: ``constant(concentration(v)) / κ(v)``; ``sizes``: the global
        numbers of entries of the tensors (default: those of ``v``, unsharded).
        """
        norms = tensor_norms(v)
        sizes = [t.numel() for t in v] if sizes is None else sizes
        k = perturbation_scale(v, theta_norms, norms=norms)
        return self.constant(concentration(norms, sizes)) / k if k > 0 else 0.0

    def truncation_coefficient(
        self, v_norm: float, eps: float, hv_norm: float, d2: float | None = None
    ) -> float:
        """``a_u`` (central) or ``a4_u`` (four-point) along ``u = v/||v||``: from the even part
        ``d2`` of the product's gradient pair where given (``D = d2 / s²`` estimates
        ``||∇D²L[u,u]||``; ``a_u = D² / 6||Hu||``, ``a4_u = D⁴ / 30||Hu||³``), else from the
        calibration by the scale model (module docstring).
        """
        s = eps * v_norm
        hu = hv_norm / v_norm
        four = self.stencil == "four-point" and self.a4 is not None
        if d2 is not None and hu > 0 and s > 0:
            D = d2 / s**2
            return D**4 / (30 * hu**3) if four else D**2 / (6 * hu)
        r = hu / self.hu0 if self.hu0 > 0 else 1.0
        return self.a4 * r**3 if four else self.a0 * r**2

    def best_eps(self, v_norm: float, eps: float, hv_norm: float, d2: float | None = None) -> float:
        """The step along ``v`` that minimises the estimated error (``inf`` without truncation),
        from a product at ``eps`` (:meth:`truncation_coefficient`).
        """
        a = self.truncation_coefficient(v_norm, eps, hv_norm, d2)
        if a <= 0 or v_norm == 0:
            return math.inf
        if self.stencil == "four-point" and self.a4 is not None:
            return snap((_FOUR_POINT_ROUNDING * self.b / (4 * a)) ** 0.2) / v_norm
        return snap((self.b / (2 * a)) ** (1 / 3)) / v_norm

    def estimate(
        self, v_norm: float, eps: float, hv_norm: float, d2: float | None = None
    ) -> FDEstimate:
        """The estimated error of a product ``H_eps v`` with ``||v|| = v_norm`` whose result has
        norm ``hv_norm`` (and even part ``d2``): (1) at ``s = eps·||v||``.
        """
        if v_norm == 0 or eps == 0:
            return FDEstimate(eps, 0.0, 0.0, 0.0, 0.0)
        s = eps * v_norm
        a = self.truncation_coefficient(v_norm, eps, hv_norm, d2)
        if self.stencil == "four-point" and self.a4 is not None:
            trunc = a * s**4
            rnd = _FOUR_POINT_ROUNDING * self.b / s
        else:
            trunc = a * s**2
            rnd = self.b / s
        ab = (trunc + rnd) * v_norm
        rel = ab / hv_norm if hv_norm > 0 else math.inf
        return FDEstimate(eps, rel, ab, trunc * v_norm, rnd * v_norm)

    def to_dict(self) -> dict:
        """The fields as a dict (for ``result.json``)."""
        return asdict(self)


def calibrate(op, seed: int = 0, stencil: str = "central", krylov: bool = True) -> FDModel:
    """Measure ``a₀`` and ``b`` of (1) along the unit probe ``unit_probe(op, seed)`` with central
    products (module docstring): typically 6–10 gradient passes, at most 26; the four-point
    stencil adds ``a4₀`` (8–24 passes). ``krylov`` (and ``op.fd_buffers`` holding the sample of
    ``∇L(θ)``): one more product (2 passes; 4 four-point) along ``Hu₀/||Hu₀||``, whose even
    part gives the best constant there (``FDModel.scale_krylov``, module docstring).

    >>> import hessian_spectra as hs
    >>> from hessian_spectra.testing import make_problem
    >>> m = calibrate(hs.HessianOperator(*make_problem("mlp")))
    >>> 1e-7 < m.step0 < 1e-3 and m.gradients >= 6
    True
    """
    from . import distributed as _dist
    from .hvp import hvp_fd
    from .vectors import _dot64

    obj = op.objective
    obj.first_use()
    u = unit_probe(op, seed, dtype=op.vector_dtype)
    th = obj.theta_norms()
    k0 = perturbation_scale(u, th)
    cdt = compute_dtype(obj.model, obj.param_dtype)
    big = 10.0 * default_eps_scale(cdt) / k0  # ε_mach^{1/3} / κ
    cap = 0.25 / k0  # no tensor moves by more than a quarter of its norm
    grads = 0

    bufs = getattr(op, "fd_buffers", None)  # the operator's snapshot, reused

    def prod(s):
        nonlocal grads
        grads += 2
        return hvp_fd(obj, u, s, buffers=bufs)

    def diffnorm(x, y, cx=1.0, cy=1.0):
        # ``norm([cx·a − cy·b ...])`` to the bit, one tensor's difference at a time (no
        # vector-sized temporary: calibration holds few vectors, the demo's fd peak)
        s = None
        for a, b in zip(x, y):
            if a.numel():
                d = cx * a - cy * b
                t = _dot64(d, d)
                s = t if s is None else s + t
        if s is None:
            s = torch.zeros((), dtype=torch.float64, device=x[0].device if x else "cpu")
        return float(_dist.sum_over_shards(torch.stack([s]))[0]) ** 0.5

    S = min(big, cap / 2)
    sigma = S / 64
    hs = prod(sigma)
    for _ in range(4):
        R = None  # this round's products replace it
        h1, h2 = prod(S), prod(2 * S)
        a = diffnorm(h2, h1) / (3 * S**2)
        R = h1  # (4·h1 − h2) / 3 in place: the Richardson extrapolation
        for x, y in zip(h1, h2):
            x.mul_(4).sub_(y).div_(3)
        h1 = h2 = None
        b = sigma * diffnorm(hs, R)
        best = (b / (2 * a)) ** (1 / 3) if a > 0 else cap
        if best < 4 * sigma and sigma > best / 1e3:
            sigma = best / 64
            hs = prod(sigma)
            b = sigma * diffnorm(hs, R)
            best = (b / (2 * a)) ** (1 / 3) if a > 0 else cap
        if best < S / 2 or 2 * S >= cap:
            break
        S = min(8 * S, cap / 2)
    best = min(best, cap)
    hu0 = norm(R)
    a4 = None
    if check_stencil(stencil) == "four-point":
        S4 = min(4 * best, cap / 2)
        for _ in range(3):
            g1 = hvp_fd(obj, u, S4, "four-point", buffers=bufs)
            g2 = hvp_fd(obj, u, 2 * S4, "four-point", buffers=bufs)
            grads += 8
            a4 = diffnorm(g2, g1) / (15 * S4**4)
            rb = _FOUR_POINT_ROUNDING * b
            best = (rb / (4 * a4)) ** 0.2 if a4 > 0 else cap
            if best < S4 / 2 or 2 * S4 >= cap:
                break
            S4 = min(4 * S4, cap / 2)
        best = min(best, cap)
    best = snap(best)
    model = FDModel(
        a0=a,
        b=b,
        hu0=hu0,
        kappa0=k0,
        step0=best,
        scale=best * k0,
        stencil=stencil,
        gradients=grads,
        a4=a4,
    )
    if not (krylov and bufs is not None and bufs.has_gradient and hu0 > 0):
        return model
    # the Krylov leg: Lanczos vectors after the first lie in span{u₀, Hu₀, H²u₀, ...}, and
    # along them the best constant s*·κ is below the random probe's (module docstring)
    hs = u = None
    q = R  # R / ||R|| in place: R is not needed again
    for t in q:
        t.div_(hu0)
    kq = perturbation_scale(q, th)
    e = model.scale / kq
    info: dict = {}
    hq = hvp_fd(obj, q, e, stencil, None, info, buffers=bufs)
    grads += len(stencil_points(stencil)[0])
    sq = min(model.best_eps(1.0, e, norm(hq), info.get("d2")), 0.25 / kq)
    if not (math.isfinite(sq) and sq > 0):
        return replace(model, gradients=grads)
    sizes = [p.numel() for p in obj.params]  # global sizes (DTensor.numel() is global)
    return replace(
        model,
        scale_krylov=sq * kq,
        conc_krylov=concentration(tensor_norms(q), sizes),
        gradients=grads,
    )


@dataclass(frozen=True)
class FDError:
    """Measured error of one finite-difference HVP along one direction.

    rel_error = ||H_ε v − ref|| / ||ref||, with ref the exact HVP (``reference="exact"``) or
    the Richardson extrapolation (4 H_{ε/2} v − H_ε v) / 3 (``reference="richardson"``).
    """

    eps: float
    rel_error: float
    abs_error: float
    ref_norm: float
    reference: str


def _compare(h: Vector, ref: Vector, eps: float, reference: str) -> FDError:
    diff = [a - b for a, b in zip(h, ref)]
    rn, dn = norm(ref), norm(diff)
    return FDError(
        eps=eps,
        rel_error=dn / rn if rn > 0 else float("inf"),
        abs_error=dn,
        ref_norm=rn,
        reference=reference,
    )


def _check_reference(reference: str) -> None:
    if reference not in ("exact", "richardson"):
        raise ValueError(f"reference must be 'exact' or 'richardson', got {reference!r}")


def fd_error(op, v: Vector, eps: float | None = None, reference: str = "exact") -> FDError:
    """The error of ``op``'s fd product along ``v`` at step ``eps`` (default: the operator's own
    product, ``op.matvec(v, method="fd")``, at the step it chose) against an exact HVP
    (``op.matvec(v, method="exact")``) or a Richardson estimate (two fd
    products, no exact HVP needed).

    >>> import hessian_spectra as hs
    >>> from hessian_spectra.testing import make_problem
    >>> op = hs.HessianOperator(*make_problem("mlp"))
    >>> fd_error(op, hs.unit_probe(op)).rel_error < 1e-8
    True
    """
    _check_reference(reference)
    v = check_vector(v, op.params, "v")
    if norm(v) == 0:
        raise ValueError(
            "v is the zero vector: the fd error along it is undefined; pass a "
            "nonzero direction (e.g. hessian_spectra.unit_probe(op))"
        )
    if eps is not None:
        e = check_eps(eps)
        h = op.matvec(v, method="fd", eps=e)
    else:
        h = op.matvec(v, method="fd")
        est = getattr(op, "last_fd_error_estimate", None)
        e = est.eps if est is not None else op.eps_for(v)
    if reference == "exact":
        ref = op.matvec(v, method="exact")
    else:
        h2 = op.matvec(v, method="fd", eps=e / 2)
        ref = [(4 * b - a) / 3 for a, b in zip(h, h2)]
    return _compare(h, ref, e, reference)


def eps_sweep(
    op, eps_values, v: Vector | None = None, *, seed: int = 0, reference: str = "exact"
) -> list[FDError]:
    """:func:`fd_error` at each step in ``eps_values`` along one direction (default: a unit
    Rademacher probe from ``seed``); with ``reference="exact"`` the exact HVP is computed once.

    >>> import hessian_spectra as hs
    >>> from hessian_spectra.testing import make_problem
    >>> op = hs.HessianOperator(*make_problem("mlp"))
    >>> [r.eps for r in eps_sweep(op, [1e-3, 1e-6])]
    [0.001, 1e-06]
    """
    _check_reference(reference)
    if v is None:
        v = unit_probe(op, seed, dtype=op.vector_dtype)
    v = check_vector(v, op.params, "v")
    eps_values = [float(e) for e in eps_values]
    if not eps_values or any(not (e > 0 and math.isfinite(e)) for e in eps_values):
        raise ValueError(f"eps_values must be positive finite numbers, got {eps_values}")
    if reference == "richardson":
        return [fd_error(op, v, eps=e, reference=reference) for e in eps_values]
    ref = op.matvec(v, method="exact")
    return [_compare(op.matvec(v, method="fd", eps=e), ref, e, reference) for e in eps_values]


@dataclass(frozen=True)
class ErrorFit:
    """Thm 3.1 fitted to a measured sweep: ``error(ε) ≈ a ε² + b / ε`` (:func:`fit_error_model`).

    ``eps_best_predicted = (b / 2a)^{1/3}`` and ``error_best_predicted`` its error;
    ``eps_best_measured`` / ``error_best_measured`` the sweep's best point; ``slope_large`` /
    ``slope_small`` the log-log slopes measured (least squares) on the points above 3× / below
    1/3 of the predicted best step (Thm 3.1: 2 and −1; None with fewer than 2 such points).
    Points with error ≥ 0.5 (no significant digit) are left out of the fit and the slopes.
    """

    a: float
    b: float
    eps_best_predicted: float
    error_best_predicted: float
    eps_best_measured: float
    error_best_measured: float
    slope_large: float | None
    slope_small: float | None
    points_used: int

    def to_dict(self) -> dict:
        """The fields as a dict (for ``result.json``)."""
        return asdict(self)


def _slope(xs, ys):
    if len(xs) < 2:
        return None
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx if sxx > 0 else None


def fit_error_model(eps_values, errors) -> ErrorFit:
    """Fit ``a ε² + b / ε`` (``a, b ≥ 0``) to measured errors by least squares on the relative
    residuals ``(a ε² + b/ε − e) / e``, over the points with ``0 < e < 0.5``.

    >>> eps = [10.0 ** k for k in range(-6, 0)]
    >>> f = fit_error_model(eps, [3 * e**2 + 1e-9 / e for e in eps])
    >>> round(f.a, 6), round(f.b * 1e9, 6), round(f.slope_large, 2)
    (3.0, 1.0, 2.0)
    """
    import numpy as np
    from scipy.optimize import nnls

    eps_values = [float(e) for e in eps_values]
    errors = [float(e) for e in errors]
    if len(eps_values) != len(errors) or not eps_values:
        raise ValueError(
            f"eps_values and errors must be non-empty and of equal length, got "
            f"{len(eps_values)} and {len(errors)}"
        )
    pts = [(x, e) for x, e in zip(eps_values, errors) if x > 0 and 0 < e < 0.5]
    if len(pts) < 2:
        raise ValueError(
            f"need at least 2 points with 0 < error < 0.5 to fit a ε² + b/ε, got {len(pts)}: "
            "sweep a wider range of eps"
        )
    x = np.array([p[0] for p in pts])
    e = np.array([p[1] for p in pts])
    A = np.stack([x**2 / e, 1.0 / (x * e)], axis=1)
    (a, b), _ = nnls(A, np.ones_like(e))
    if a > 0 and b > 0:
        best = (b / (2 * a)) ** (1 / 3)
        ebest = a * best**2 + b / best
    else:
        best, ebest = math.nan, math.nan
    k = int(np.argmin(errors))
    ref = best if math.isfinite(best) else eps_values[k]
    large = [(p, q) for p, q in pts if p > 3 * ref]
    small = [(p, q) for p, q in pts if p < ref / 3]
    return ErrorFit(
        a=float(a),
        b=float(b),
        eps_best_predicted=float(best),
        error_best_predicted=float(ebest),
        eps_best_measured=eps_values[k],
        error_best_measured=errors[k],
        slope_large=_slope(*zip(*large)) if len(large) >= 2 else None,
        slope_small=_slope(*zip(*small)) if len(small) >= 2 else None,
        points_used=len(pts),
    )
