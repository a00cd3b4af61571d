"""The Hessian of a training objective as a linear operator on parameter-space vectors.

``HessianOperator`` applies ``H = ∇²L(θ)`` of the objective ``L`` (:mod:`.objective`:
``Σ_b w_b l_b / Σ_b w_b``, or ``Σ_b w_b l_b`` with ``reduction="sum"``) to vectors laid out
like ``op.params``, by one of three backends (:mod:`.hvp`): ``"fd"`` (central finite
differences of gradients, shard-local under FSDP2; the step, chosen from FSHP Thm 3.1's error
model calibrated once per operator, and the error estimate of every product are in
:mod:`.fd_step`), ``"exact"``
(double backward) or ``"jvp"`` (forward-over-reverse; falls back to ``"exact"`` with a warning
where PyTorch cannot do it). It meets the operator contract :class:`~.linop.Operator`.

>>> import torch
>>> import hessian_spectra as hs
>>> from hessian_spectra.testing import dense_hessian, flatten, make_problem, unflatten
>>> model, loss_fn, batches = make_problem("mlp")
>>> op = hs.HessianOperator(model, loss_fn, batches, method="exact")
>>> v = torch.ones(op.num_params, dtype=torch.float64)
>>> H = dense_hessian(model, loss_fn, batches)
>>> bool(torch.allclose(flatten(op @ unflatten(v, op.params)), H @ v, atol=1e-12))
True
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from . import distributed as _dist
from . import fd_step as _fd
from ._opbase import ObjectiveOperator
from .fd_step import (
    FDAccuracyError,
    FDError,
    FDEstimate,
    FDModel,
    check_eps,
    check_stencil,
    compute_dtype,
    default_eps_scale,
)
from .hvp import FDBuffers, JvpUnsupported, hvp_exact, hvp_fd, hvp_jvp
from .objective import Objective, any_rank
from .vectors import Vector, check_vector

__all__ = [
    "METHODS",
    "FDAccuracyError",
    "FDError",
    "FDEstimate",
    "HessianOperator",
    "default_eps_scale",
]

METHODS = ("fd", "exact", "jvp")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _sharded_method_error(method: str) -> NotImplementedError:
    return NotImplementedError(
        f"method={method!r} is not available on an FSDP2-sharded model: FSDP2 does not support "
        "double backward or forward AD through its hooks (PyTorch issue 172543). Use "
        "method='fd' (shard-local finite differences), or run unsharded."
    )


def _norms(v: Vector) -> list[float]:
    """Global norm of each tensor of ``v`` by ``torch._foreach_norm`` (one kernel call, one
    all-reduce): the fd step and estimate need ~1e-7 relative, not float64 sums. NaN/inf
    entries make their tensor's norm non-finite.
    """
    if not v:
        return []
    sq = torch.stack(torch._foreach_norm(v)).to(torch.float64).square()
    return _dist.sum_over_shards(sq).sqrt().tolist()


def _norm(v: Vector) -> float:
    """Global norm of ``v`` (:func:`_norms`)."""
    return math.sqrt(sum(x * x for x in _norms(v)))


class HessianOperator(ObjectiveOperator):
    """The Hessian of a dataset-averaged (or summed) loss as a linear operator.

    Args:
        model: a ``torch.nn.Module``, plain or sharded with FSDP2 ``fully_shard``.
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss tensor, or
            ``(loss, weight)`` with ``weight`` e.g. the number of examples or target tokens.
            Batches of different sizes need a weight (or ``reduction="sum"`` with a summed
            loss): without one every batch counts the same, and that is refused.
        batches: a re-iterable of batches (list, DataLoader without shuffling). Every matvec is a
            full pass: ``Σ_b w_b H_b v / Σ_b w_b``.
        method: ``"fd"``, ``"exact"`` or ``"jvp"`` (module docstring).
        eps: the fd step: the parameters are moved to ``θ ± eps·v``. ``None`` (default): the
            step of :mod:`hessian_spectra.fd_step`, ``c / max_i(||v_i|| / ||θ_i||)`` with ``c``
            chosen on first use by FSHP Thm 3.1's error model, measured along one unit probe
            (see ``fd_calibration``). A fixed ``eps`` needs no calibration and gets none
            (exactly two gradient passes per product, no error estimate) unless
            ``max_fd_error`` is set or :meth:`calibrate_fd` is called.
        params: a subset of parameters (names or tensors); default all with ``requires_grad``.
        reduction: ``"mean"`` (default): ``L = Σ_b w_b l_b / Σ_b w_b``; ``"sum"``:
            ``L = Σ_b w_b l_b`` (e.g. a risk summed over examples, ``loss_fn`` returning sums).
        train_mode: analyse the training-mode objective (batch-norm batch statistics). Default
            False: eval mode. Either way modules' modes and buffers are restored after each call;
            randomness (dropout) is refused by ``check_determinism``.
        check_determinism: on first use, check that two passes see the same first batch and two
            evaluations of its loss agree; raise if not (dropout, shuffling).
        allow_low_precision_fd: run ``method="fd"`` in bf16/fp16 (parameters, or an FSDP2
            ``MixedPrecisionPolicy(param_dtype=...)``) whatever its error, with a warning.
            Without it (or ``max_fd_error``) fd in 16-bit compute raises: see ``max_fd_error``.
        max_fd_error: refuse (:class:`~hessian_spectra.fd_step.FDAccuracyError`, a
            ``ValueError``, with the estimated figure) any fd product at the default step whose
            estimated relative error exceeds this, starting with the calibration probe. The
            way to run fd in 16-bit compute when the measured error is acceptable.
        stencil: ``"central"`` (default; 2 gradient passes per product) or ``"four-point"``
            (truncation O(ε⁴), 4 passes; :mod:`hessian_spectra.fd_step`).
        fd_calibration: measure the error model on first use (default): about 13 gradient
            passes once (none with a fixed ``eps``), ``∇L(θ)`` kept at the entries the even
            part samples (about 1/31 of a vector; :class:`~hessian_spectra.hvp.FDBuffers`),
            in exchange for the step, an error estimate per product
            (``op.last_fd_error_estimate``) and a second product at the estimated best step
            where the first one's step was > 2.5× off (``op.stats["fd_retries"]``).
            ``False``: the uncalibrated step ``0.1·ε_mach^{1/3} / max_i(||v_i|| / ||θ_i||)``,
            exactly two gradient passes per product and no estimates. Either way fd products
            keep one copy of the parameters (the restore snapshot) between products.
        progress: show a progress bar over batches for each pass (rank 0 only).
    """

    # an fd product at the a-priori step e is redone at the estimated best step s* when e is
    # outside [lo, hi]·s* (estimated error > ~2.2× the best; .fd_step module docstring)
    FD_REDO_BAND = {"central": (0.3, 2.5), "four-point": (0.4, 1.8)}

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn,
        batches,
        method: str = "fd",
        eps: float | None = None,
        params=None,
        *,
        reduction: str = "mean",
        train_mode: bool = False,
        check_determinism: bool = True,
        allow_low_precision_fd: bool = False,
        max_fd_error: float | None = None,
        stencil: str = "central",
        fd_calibration: bool = True,
        progress: bool = False,
    ):
        _check_method(method)
        if eps is not None:
            eps = check_eps(eps)
        if max_fd_error is not None:
            max_fd_error = check_eps(max_fd_error, "max_fd_error")
        self.stencil = check_stencil(stencil)
        self.max_fd_error = max_fd_error
        self.fd_calibration = bool(fd_calibration)
        if max_fd_error is not None and not self.fd_calibration:
            raise ValueError(
                "max_fd_error needs the error model: leave fd_calibration=True (the default)"
            )
        self.objective = Objective(
            model,
            loss_fn,
            batches,
            params,
            reduction=reduction,
            train_mode=train_mode,
            check_determinism=check_determinism,
            progress=progress,
        )
        obj = self.objective
        self.method = method
        self.eps = eps
        self._jvp_fallback = False
        if obj.sharded and method != "fd":
            raise _sharded_method_error(method)
        self.compute_dtype = compute_dtype(obj.model, obj.param_dtype)
        low = torch.finfo(self.compute_dtype).bits < 32
        what = (
            f"{obj.param_dtype} parameters"
            if self.compute_dtype == obj.param_dtype
            else f"FSDP2 MixedPrecisionPolicy(param_dtype={self.compute_dtype})"
        )
        if method == "fd" and low and max_fd_error is None and not allow_low_precision_fd:
            raise ValueError(
                f"method='fd' with {what}: in 16-bit compute a step below the parameters' "
                "resolution vanishes or turns into rounding noise (SmolLM2-135M: error ≥ 1 for "
                "eps ≤ 3, 0.14-0.27 at best). Load the model in float32, use method='exact', "
                "pass max_fd_error "
                "(e.g. 0.05) to run when the error measured on first use is below it, or "
                "allow_low_precision_fd=True to run whatever it is."
            )
        if method == "fd" and low and max_fd_error is None:
            warnings.warn(
                f"finite-difference HVPs with {what} may be dominated by rounding error; "
                "op.last_fd_error_estimate says how much (prefer float32)",
                stacklevel=2,
            )
        self.fd_model: FDModel | None = None
        self.last_fd_error_estimate: FDEstimate | None = None
        self.fd_estimates: list[FDEstimate] = []  # one per fd product, in order
        self.stats = {
            "matvecs": 0,
            "matvec_seconds": 0.0,
            "gradients": 0,
            "gradient_seconds": 0.0,
            "fd_calibration_gradients": 0,
            "fd_max_rel_error_estimate": 0.0,
            "fd_retries": 0,
        }
        self.fd_buffers = FDBuffers()  # snapshot and even-part samples, reused by fd products

    # the objective's facts (params, num_params, vector_dtype, ...): ObjectiveOperator
    loss_fn = property(lambda self: self.objective.loss_fn, doc="The loss function.")

    @property
    def effective_method(self) -> str:
        """The backend products actually use: ``method``, or ``"exact"`` after a jvp fallback."""
        return "exact" if self.method == "jvp" and self._jvp_fallback else self.method

    def __repr__(self):
        return (
            f"HessianOperator(method={self.method!r}, num_params={self.num_params}, "
            f"tensors={len(self.params)}, eps={self.eps}, reduction={self.reduction!r}, "
            f"train_mode={self.train_mode})"
        )

    # ------------------------------------------------------------------ products
    def matvec(self, v: Vector, *, method: str | None = None, eps: float | None = None) -> Vector:
        """``H v`` (a new vector, ``self.vector_dtype``); ``method``/``eps`` override the
        operator's for this call (``eps`` must be a positive finite number).
        """
        v = check_vector(v, self.params, "v")
        method = method or self.method
        _check_method(method)
        if eps is not None:
            eps = check_eps(eps)
        if self.sharded and method != "fd":
            raise _sharded_method_error(method)
        obj = self.objective
        obj.first_use()
        t0 = time.perf_counter()
        if method == "fd":
            hv, finite = self._fd_product(v, eps)
            if not finite:
                obj.check_finite(hv)
        elif method == "jvp" and not self._jvp_fallback:
            try:
                hv = hvp_jvp(obj, v)
            except JvpUnsupported as e:
                warnings.warn(
                    f"method='jvp' is not available for this model and loss: {e} Falling back to "
                    "method='exact' (double backward, the same Hessian) for this operator.",
                    stacklevel=2,
                )
                self._jvp_fallback = True
                hv = hvp_exact(obj, v)
            obj.check_finite(hv)
        else:
            hv = hvp_exact(obj, v)
            obj.check_finite(hv)
        self.stats["matvecs"] += 1
        self.stats["matvec_seconds"] += time.perf_counter() - t0
        return hv

    def _fd_product(self, v: Vector, eps: float | None) -> tuple[Vector, bool]:
        """One fd product (and its estimate, and its redo where the step was far off); returns
        ``(hv, finite)`` with ``finite`` read off ``||hv||`` (float64 sums: any NaN/inf entry
        makes it non-finite; a non-finite one is checked entry by entry by the caller).
        """
        obj = self.objective
        checked = eps is None and self.max_fd_error is not None
        key = self.fd_buffers.revalidate(obj)  # the parameters' values unchanged: caches hold
        th = obj.theta_norms(key)
        vnorms = _norms(v)  # one pass over v: ||v|| and κ(v)
        vn = math.sqrt(sum(x * x for x in vnorms))
        kappa = _fd.perturbation_scale(v, th, norms=vnorms)
        if not self.fd_calibration or eps is not None or self.eps is not None:
            e = eps if eps is not None else self.eps
            if e is None:  # uncalibrated: fd_step's default rule, from the norms above
                e = _fd.default_eps_scale(self.compute_dtype) / kappa if kappa > 0 else 0.0
            # a fixed operator eps needs no step: no calibration (~13 passes) unless
            # max_fd_error asks for the check or calibrate_fd() was called
            fixed = self.eps is not None and self.max_fd_error is None and self.fd_model is None
            if not self.fd_calibration or e == 0 or fixed:
                hv = hvp_fd(obj, v, e, self.stencil, buffers=self.fd_buffers)
                return hv, math.isfinite(_norm(hv))
        if self.fd_model is None:  # its products moved the version counters on
            self.calibrate_fd()
            key = obj.theta_key()
        fm = self.fd_model
        if any_rank(self.fd_buffers.g0_key != key):
            # the parameters changed in place since ∇L(θ) was sampled: the even part needs
            # the gradient at the new θ (one pass; the calibrated model is kept)
            self._sample_gradient()
            self.stats["fd_calibration_gradients"] += 1
        auto = eps is None and self.eps is None
        if auto:  # the step from v and the calibrated constants alone: products are repeatable
            sizes = self.fd_buffers.sizes
            e = fm.constant(_fd.concentration(vnorms, sizes)) / kappa if kappa > 0 else 0.0
        else:
            e = eps if eps is not None else self.eps
        if e == 0:
            return obj.zeros(), True
        info: dict = {}
        bufs = self.fd_buffers
        hv = hvp_fd(obj, v, e, self.stencil, None, info, buffers=bufs)
        hn = _norm(hv)
        if auto and math.isfinite(hn):
            # the error model's best step along v from the product's even part: redo it there
            # when the estimate at e is over ~2.2× the best one (module docstring of .fd_step)
            best = fm.best_eps(vn, e, hn, info.get("d2"))
            # no tensor moves by more than a quarter of its norm (as in calibrate)
            best = min(best, 0.25 / kappa)
            lo, hi = self.FD_REDO_BAND[self.stencil]
            if math.isfinite(best) and not lo * best <= e <= hi * best:
                e, info = best, {}
                hv = hvp_fd(obj, v, e, self.stencil, None, info, buffers=bufs)
                hn = _norm(hv)
                self.stats["fd_retries"] += 1
        est = fm.estimate(vn, e, hn, info.get("d2"))
        self.last_fd_error_estimate = est
        self.fd_estimates.append(est)
        if eps is None and math.isfinite(est.rel_error):  # products at the default step
            self.stats["fd_max_rel_error_estimate"] = max(
                self.stats["fd_max_rel_error_estimate"], est.rel_error
            )
        if checked and est.rel_error > self.max_fd_error:
            raise self._accuracy_error(est, "this product")
        return hv, math.isfinite(hn)

    # ------------------------------------------------------------------ the fd step
    def eps_for(self, v: Vector) -> float:
        """The fd step used for direction ``v``: ``self.eps``, or ``c / max_i(||v_i|| /
        ||θ_i||)`` with ``c`` from the calibrated error model (:mod:`hessian_spectra.fd_step`;
        the first call calibrates it).
        """
        if self.eps is not None:
            return self.eps
        if not self.fd_calibration:
            return _fd.fd_step(v, self.objective.theta_norms(), self.compute_dtype)
        sizes = [p.numel() for p in self.params]
        return self.calibrate_fd().step(v, self.objective.theta_norms(), sizes)

    def calibrate_fd(self, seed: int = 0) -> FDModel:
        """The operator's fd error model (:class:`~hessian_spectra.fd_step.FDModel`), measured
        on the first call along ``unit_probe(self, seed)`` and kept (later calls return it);
        refused with :class:`~hessian_spectra.fd_step.FDAccuracyError` when ``max_fd_error``
        is set and the best error along that probe exceeds it.
        """
        if self.fd_model is None:
            # ∇L(θ) sampled first: the calibration's Krylov leg reads the even part
            self.fd_buffers.prepare(self.objective)
            self._sample_gradient()
            m = _fd.calibrate(self, seed, self.stencil, krylov=self.eps is None)
            self.fd_model = m
            self.stats["fd_calibration_gradients"] += m.gradients + 1
            if self.max_fd_error is not None:
                e = self.eps if self.eps is not None else m.step0
                est = m.estimate(1.0, e, m.hu0)
                if est.rel_error > self.max_fd_error:
                    raise self._accuracy_error(est, "the calibration probe")
        return self.fd_model

    def _sample_gradient(self) -> None:
        """Keep the even part's sample of ``∇L(θ)`` at the current θ (one gradient pass)."""
        obj = self.objective
        key = obj.theta_key()
        self.fd_buffers.set_gradient(obj.gradient()[1], key)

    def _accuracy_error(self, est: FDEstimate, where: str) -> FDAccuracyError:
        lost = _fd.perturbation_rounding(
            self.params, self._probe_for_message(), est.eps, self.compute_dtype
        )
        return FDAccuracyError(
            f"the estimated relative error of the fd HVP along {where} is {est.rel_error:.2g} "
            f"(step {est.eps:.3g}; truncation {est.truncation:.2g}, rounding {est.rounding:.2g}"
            f" absolute; {100 * lost:.0f}% of the perturbation of a unit probe at that step is "
            f"lost to {self.compute_dtype} rounding), above max_fd_error={self.max_fd_error:g}. "
            + (
                "Use float32 parameters (and param_dtype=float32 under FSDP2), "
                if torch.finfo(self.compute_dtype).bits < 32
                else "Use stencil='four-point', "
            )
            + "method='exact', or a larger max_fd_error if that error is acceptable."
        )

    def _probe_for_message(self) -> Vector:
        from .vectors import unit_probe

        return unit_probe(self, 0, dtype=self.vector_dtype)

    def fd_error(self, v: Vector, eps: float | None = None, reference: str = "exact") -> FDError:
        """Measure the fd error along ``v`` against an exact HVP or a Richardson estimate
        (:func:`hessian_spectra.fd_step.fd_error`).
        """
        return _fd.fd_error(self, v, eps, reference)

    def eps_sweep(
        self, eps_values, v: Vector | None = None, *, seed: int = 0, reference: str = "exact"
    ) -> list[FDError]:
        """``fd_error`` at each step in ``eps_values`` along one direction (default: a unit
        Rademacher probe from ``seed``; :func:`hessian_spectra.fd_step.eps_sweep`).
        """
        return _fd.eps_sweep(self, eps_values, v, seed=seed, reference=reference)
