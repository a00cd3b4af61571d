"""The empirical Fisher: the mean outer product of per-example gradients.

With ``(l_n, w_n) = loss_fn(model, example_n)`` for every example ``n`` of every batch (an
example is a batch of one: every tensor of the batch sliced to ``[k:k+1]`` along its first
dimension) and ``g_n = ∇_θ l_n``,

    F = Σ_n w_n g_n g_nᵀ / Σ_n w_n      (reduction="mean"; "sum": no division).

``F`` is what "the Fisher" often means in practice (Adam's second moment, many natural-gradient
and K-FAC codes), although it is neither the Hessian nor the true Fisher (Kunstner et al. 2019):
the point of having it next to :class:`~hessian_spectra.HessianOperator` and
:class:`~hessian_spectra.GGNOperator` is to compare their spectra.

``F v = Σ_n w_n g_n (g_n · v) / Σ_n w_n`` is computed without forming the ``g_n``: the vector of
per-example losses ``l(θ) = (l_1, ..., l_n)`` of a batch comes from one ``torch.func.vmap`` of
``loss_fn`` over its examples, ``J v`` (``J = ∂l/∂θ``, one row ``g_nᵀ`` per example) by the
double-vjp trick and ``Jᵀ (w ⊙ J v)`` by one more backward. Where ``loss_fn`` cannot be vmapped
(``.item()``, data-dependent control flow, in-place updates of captured tensors) the error says
so; ``per_example="loop"`` then runs one forward and backward per example instead.

>>> import torch
>>> from hessian_spectra.testing import dense_empirical_fisher, flatten, make_problem, unflatten
>>> model, loss_fn, batches = make_problem("mlp")
>>> op = EmpiricalFisherOperator(model, loss_fn, batches)
>>> v = torch.linspace(-1, 1, op.num_params, dtype=torch.float64)
>>> F = dense_empirical_fisher(model, loss_fn, batches)
>>> bool(torch.allclose(flatten(op @ unflatten(v, op.params)), F @ v, atol=1e-12))
True
"""

from __future__ import annotations

import time
import warnings

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ._opbase import ObjectiveOperator
from .hvp import _explain_second_order, _LossModule, _sdpa_math
from .objective import Objective, PassRecord, batch_size
from .vectors import Vector, check_vector

__all__ = ["PER_EXAMPLE", "EmpiricalFisherOperator", "PerExampleError", "split_examples"]

PER_EXAMPLE = ("vmap", "loop", "auto")


class PerExampleError(ValueError):
    """Per-example gradients could not be computed from ``loss_fn`` with ``torch.func.vmap``."""


def _num_examples(batch, i: int) -> int:
    n = batch_size(batch)
    if n is None:
        raise ValueError(
            f"batch {i} holds no tensor with a leading (example) dimension: the empirical "
            "Fisher needs per-example gradients, so every tensor of a batch must have the "
            "examples along its first dimension"
        )
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor) and (leaf.ndim == 0 or leaf.shape[0] != n):
            raise ValueError(
                f"batch {i} mixes tensors with {n} examples and a tensor of shape "
                f"{tuple(leaf.shape)}: every tensor of a batch must have the examples along its "
                "first dimension for per-example gradients"
            )
    return n


def split_examples(batch) -> list:
    """The examples of ``batch`` as batches of one (each tensor sliced ``[k:k+1]``).

    >>> [tuple(x.shape) for x, _ in split_examples((torch.zeros(3, 2), torch.zeros(3)))]
    [(1, 2), (1, 2), (1, 2)]
    """
    n = _num_examples(batch, 0)
    return [
        tree_map(lambda t, k=k: t[k : k + 1] if isinstance(t, torch.Tensor) else t, batch)
        for k in range(n)
    ]


def _weight64(w, like: torch.Tensor) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w.to(torch.float64).reshape(())
    return torch.tensor(float(w), dtype=torch.float64, device=like.device)


def _split(out):
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise TypeError(
                f"loss_fn returned a {type(out).__name__} of length {len(out)}; expected a "
                "scalar loss or (loss, weight)"
            )
        return out[0], out[1]
    return out, 1.0


class EmpiricalFisherOperator(ObjectiveOperator):
    """The empirical Fisher ``F = Σ_n w_n g_n g_nᵀ / Σ_n w_n`` over the examples of ``batches``
    (module docstring) as an operator meeting :class:`~hessian_spectra.linop.Operator`.

    Args:
        model: a ``torch.nn.Module`` (not FSDP2-sharded).
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss or ``(loss, weight)``; it is
            called on batches of one example to get ``(l_n, w_n)``.
        batches: a re-iterable of batches whose tensors hold the examples along dimension 0.
        params, reduction, train_mode, check_determinism, progress: as for
            :class:`~hessian_spectra.HessianOperator`.
        per_example: ``"vmap"`` (default; ``torch.func.vmap`` over the examples of a batch),
            ``"loop"`` (one forward and backward per example; any model) or ``"auto"`` (vmap,
            and the loop with a warning from the first batch vmap cannot run).
    """

    method = "ef"

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn,
        batches,
        params=None,
        *,
        reduction: str = "mean",
        train_mode: bool = False,
        check_determinism: bool = True,
        progress: bool = False,
        per_example: str = "vmap",
    ):
        if per_example not in PER_EXAMPLE:
            raise ValueError(f"per_example must be one of {PER_EXAMPLE}, got {per_example!r}")
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
        if self.objective.sharded:
            raise NotImplementedError(
                "the empirical Fisher is not available on an FSDP2-sharded model (per-example "
                "gradients need torch.func or one backward per example on every rank); run it "
                "unsharded, or use GGNOperator(method='fd') or HessianOperator(method='fd')"
            )
        self.per_example = per_example
        self.eps = None
        self._init_stats()

    loss_fn = property(lambda self: self.objective.loss_fn, doc="The loss function.")

    def __repr__(self):
        return (
            f"EmpiricalFisherOperator(num_params={self.num_params}, tensors={len(self.params)}, "
            f"per_example={self.per_example!r}, reduction={self.reduction!r})"
        )

    def matvec(self, v: Vector) -> Vector:
        """``F v`` (a new vector, ``self.vector_dtype``)."""
        v = check_vector(v, self.params, "v")
        obj = self.objective
        obj.first_use()
        t0 = time.perf_counter()
        out = obj.zeros()
        rec = PassRecord()
        with obj.mode(), _sdpa_math(), _explain_second_order("exact"):
            for i, batch, zero in obj.iter_batches("empirical Fisher"):
                vm = None
                if self.per_example in ("vmap", "auto"):
                    try:
                        vm = self._losses_vmap(batch, i)
                    except PerExampleError as e:
                        if self.per_example == "vmap":
                            raise
                        warnings.warn(
                            f"{e} Using per_example='loop' for this operator.", stacklevel=2
                        )
                        self.per_example = "loop"
                if vm is not None:
                    losses, w = vm
                    self._accumulate(out, losses, w * (0.0 if zero else 1.0), v)
                else:
                    losses, w = self._loop(out, batch, i, zero, v)
                W = w.sum()
                mean = (losses.detach().double() * w).sum() / W if float(W) > 0 else W
                rec.add(i, batch, mean, W * (0.0 if zero else 1.0), True)
        torch._foreach_mul_(out, 1.0 / obj.normaliser(rec))
        obj.check_finite(out, what="empirical Fisher product")
        self._count(t0)
        return out

    # ------------------------------------------------------------------ per-example passes
    def _losses_vmap(self, batch, i: int):
        """``(l, w)``: the per-example losses (n,) with autograd graph, and weights (n,)."""
        from torch.func import functional_call, vmap

        obj = self.objective
        _num_examples(batch, i)
        wrapper = _LossModule(obj.model, obj.loss_fn)
        sel = {"model." + n: p for n, p in zip(obj.param_names, obj.params)}
        consts = {n: t.detach() for n, t in wrapper.named_parameters() if n not in sel}
        consts.update(dict(wrapper.named_buffers()))
        in_dims = tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, batch)

        def one(pd, example):
            ex = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
            loss, w = _split(functional_call(wrapper, {**consts, **pd}, (ex,)))
            return loss.reshape(()), _weight64(w, loss)

        try:
            losses, w = vmap(one, in_dims=(None, in_dims))(sel, batch)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise PerExampleError(
                f"per-example gradients by torch.func.vmap over the examples of batch {i} "
                f"failed: {first}. loss_fn must run on one example at a time without .item(), "
                "data-dependent Python control flow or in-place updates of captured tensors; "
                "pass per_example='loop' (one backward per example) to use any model."
            ) from e
        if not losses.requires_grad:
            raise ValueError(
                f"the per-example losses of batch {i} do not depend on the parameters: compute "
                "the loss from model(...) inside loss_fn, with gradients enabled"
            )
        return losses, w.detach()

    def _accumulate(self, out: Vector, losses: torch.Tensor, w: torch.Tensor, v: Vector) -> None:
        """``out += Jᵀ (w ⊙ J v)`` with ``J`` the Jacobian of the per-example losses."""
        params = self.objective.params
        u = torch.zeros_like(losses, requires_grad=True)  # (n,)
        g = torch.autograd.grad(
            losses, params, grad_outputs=u, create_graph=True, allow_unused=True
        )
        pairs = [
            (gi, vi.to(gi.dtype)) for gi, vi in zip(g, v) if gi is not None and gi.requires_grad
        ]
        jv = None
        if pairs:
            (jv,) = torch.autograd.grad(
                [gi for gi, _ in pairs],
                u,
                grad_outputs=[vi for _, vi in pairs],
                retain_graph=True,
                allow_unused=True,
            )
        if jv is None:
            return
        jt = torch.autograd.grad(
            losses, params, grad_outputs=jv.detach() * w.to(jv.dtype), allow_unused=True
        )
        for o, h in zip(out, jt):
            if h is not None:
                o.add_(h.detach().to(o.dtype))

    def _loop(self, out: Vector, batch, i: int, zero: bool, v: Vector):
        obj = self.objective
        losses, ws = [], []
        for ex in split_examples(batch) if _num_examples(batch, i) else []:
            loss, w = _split(obj.loss_fn(obj.model, ex))
            w = _weight64(w, loss)
            if not loss.requires_grad:
                raise ValueError(
                    f"the loss of an example of batch {i} does not depend on the parameters"
                )
            g = torch.autograd.grad(loss.reshape(()), obj.params, allow_unused=True)
            c = sum((gi.double() * vi.double()).sum() for gi, vi in zip(g, v) if gi is not None)
            c = float(c) * float(w) * (0.0 if zero else 1.0)
            for o, gi in zip(out, g):
                if gi is not None:
                    o.add_(gi.detach().to(o.dtype), alpha=c)
            losses.append(loss.detach().reshape(()))
            ws.append(w)
        return torch.stack(losses), torch.stack(ws)
