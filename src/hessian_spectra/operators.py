"""The Hessian of a training objective as a linear operator on parameter-space vectors.

``HessianOperator`` applies ``H = ∇²L(θ)`` of the objective ``L`` (:mod:`.objective`:
``Σ_b w_b l_b / Σ_b w_b``, or ``Σ_b w_b l_b`` with ``reduction="sum"``) to vectors laid out
like ``op.params``, by one of three backends (:mod:`.hvp`): ``"fd"`` (central finite
differences of gradients, shard-local under FSDP2; step rule in :mod:`.fd_step`), ``"exact"``
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

import time
import warnings

import torch

from . import fd_step as _fd
from .fd_step import FDError, check_eps, default_eps_scale
from .hvp import JvpUnsupported, hvp_exact, hvp_fd, hvp_jvp
from .objective import Objective
from .vectors import Vector, check_vector

__all__ = ["METHODS", "FDError", "HessianOperator", "default_eps_scale"]

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


class HessianOperator:
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
        eps: the fd step: the parameters are moved to ``θ ± eps·v``. ``None``: the scale-aware
            default of :mod:`hessian_spectra.fd_step`.
        params: a subset of parameters (names or tensors); default all with ``requires_grad``.
        reduction: ``"mean"`` (default): ``L = Σ_b w_b l_b / Σ_b w_b``; ``"sum"``:
            ``L = Σ_b w_b l_b`` (e.g. a risk summed over examples, ``loss_fn`` returning sums).
        train_mode: analyse the training-mode objective (batch-norm batch statistics). Default
            False: eval mode. Either way modules' modes and buffers are restored after each call;
            randomness (dropout) is refused by ``check_determinism``.
        check_determinism: on first use, check that two passes see the same first batch and two
            evaluations of its loss agree; raise if not (dropout, shuffling).
        allow_low_precision_fd: permit ``method="fd"`` with bf16/fp16 parameters (its error was
            ≥ 1 at every ε tried on SmolLM2-135M); otherwise that raises.
        progress: show a progress bar over batches for each pass (rank 0 only).
    """

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
        progress: bool = False,
    ):
        _check_method(method)
        if eps is not None:
            eps = check_eps(eps)
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
        low = torch.finfo(obj.param_dtype).bits < 32
        if method == "fd" and low and not allow_low_precision_fd:
            raise ValueError(
                f"method='fd' with {obj.param_dtype} parameters: finite differences in 16-bit "
                "arithmetic have relative error ≥ 1 (measured on SmolLM2-135M at every ε tried). "
                "Load the model in float32, use method='exact', or pass "
                "allow_low_precision_fd=True if you accept that error."
            )
        if method == "fd" and low:
            warnings.warn(
                f"finite-difference HVPs with {obj.param_dtype} parameters are dominated by "
                "rounding error (relative error ≥ 1 measured); prefer float32",
                stacklevel=2,
            )
        self.stats = {"matvecs": 0, "matvec_seconds": 0.0, "gradients": 0, "gradient_seconds": 0.0}

    # ------------------------------------------------------------------ the objective's facts
    model = property(lambda self: self.objective.model, doc="The model.")
    loss_fn = property(lambda self: self.objective.loss_fn, doc="The loss function.")
    batches = property(lambda self: self.objective.batches, doc="The batches.")
    params = property(lambda self: self.objective.params, doc="The parameters acted on.")
    param_names = property(lambda self: self.objective.param_names, doc="Their names.")
    num_params = property(lambda self: self.objective.num_params, doc="Global number of scalars.")
    param_dtype = property(
        lambda self: self.objective.param_dtype, doc="The lowest-precision parameter dtype."
    )
    vector_dtype = property(
        lambda self: self.objective.vector_dtype, doc="The dtype of the vectors matvec returns."
    )
    sharded = property(lambda self: self.objective.sharded, doc="FSDP2-sharded parameters.")
    train_mode = property(lambda self: self.objective.train_mode, doc="Train-mode objective.")
    reduction = property(lambda self: self.objective.reduction, doc="'mean' or 'sum'.")
    progress = property(lambda self: self.objective.progress, doc="Progress bars on rank 0.")

    @property
    def effective_method(self) -> str:
        """The backend products actually use: ``method``, or ``"exact"`` after a jvp fallback."""
        return "exact" if self.method == "jvp" and self._jvp_fallback else self.method

    @property
    def shape(self) -> tuple[int, int]:
        """``(num_params, num_params)``."""
        return (self.num_params, self.num_params)

    def __matmul__(self, v: Vector) -> Vector:
        return self.matvec(v)

    def __repr__(self):
        return (
            f"HessianOperator(method={self.method!r}, num_params={self.num_params}, "
            f"tensors={len(self.params)}, eps={self.eps}, reduction={self.reduction!r}, "
            f"train_mode={self.train_mode})"
        )

    # ------------------------------------------------------------------ products
    def matvec(self, v: Vector, *, method: str | None = None, eps: float | None = None) -> Vector:
        """``H v`` (a new vector, ``self.vector_dtype``); ``method``/``eps`` override the
        operator's for this call (``eps`` must be a positive finite number)."""
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
            hv = hvp_fd(obj, v, eps if eps is not None else self.eps_for(v))
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
        else:
            hv = hvp_exact(obj, v)
        obj.check_finite(hv)
        self.stats["matvecs"] += 1
        self.stats["matvec_seconds"] += time.perf_counter() - t0
        return hv

    def gradient(self) -> tuple[float, Vector]:
        """``(L(θ), ∇L(θ))`` of the objective; the user's ``.grad`` are left as they were."""
        t0 = time.perf_counter()
        out = self.objective.gradient()
        self.stats["gradients"] += 1
        self.stats["gradient_seconds"] += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ the fd step
    def eps_for(self, v: Vector) -> float:
        """The fd step used for direction ``v`` (``self.eps``, or the default rule of
        :func:`hessian_spectra.fd_step.fd_step`)."""
        if self.eps is not None:
            return self.eps
        return _fd.fd_step(v, self.objective.theta_norms(), self.param_dtype)

    def fd_error(self, v: Vector, eps: float | None = None, reference: str = "exact") -> FDError:
        """Measure the fd error along ``v`` against an exact HVP or a Richardson estimate
        (:func:`hessian_spectra.fd_step.fd_error`)."""
        return _fd.fd_error(self, v, eps, reference)

    def eps_sweep(
        self, eps_values, v: Vector | None = None, *, seed: int = 0, reference: str = "exact"
    ) -> list[FDError]:
        """``fd_error`` at each step in ``eps_values`` along one direction (default: a unit
        Rademacher probe from ``seed``; :func:`hessian_spectra.fd_step.eps_sweep`)."""
        return _fd.eps_sweep(self, eps_values, v, seed=seed, reference=reference)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` on flat float64 numpy vectors (one process)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        if self.sharded:
            raise NotImplementedError(
                "to_scipy() needs the whole vector in one process; the model is sharded"
            )
        shapes = [p.shape for p in self.params]
        sizes = [p.numel() for p in self.params]

        def mv(x):
            x = np.asarray(x, dtype=np.float64).reshape(-1)
            parts = torch.from_numpy(x).split(sizes)
            v = [
                t.reshape(s).to(device=p.device, dtype=self.vector_dtype)
                for t, s, p in zip(parts, shapes, self.params)
            ]
            hv = self.matvec(v)
            return torch.cat([t.reshape(-1).double().cpu() for t in hv]).numpy()

        return LinearOperator(
            (self.num_params, self.num_params), matvec=mv, rmatvec=mv, dtype=np.float64
        )
