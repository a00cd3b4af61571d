"""The generalised Gauss–Newton matrix of a training objective as a linear operator.

With ``f_b(θ) = forward_fn(model, batch_b)`` the model's outputs on batch ``b`` (e.g. logits),
``J_b = ∂f_b/∂θ`` their Jacobian and ``H_out,b = ∂²l_b/∂f²`` the Hessian of the loss
``l_b = loss_of_output_fn(f_b, batch_b)`` with respect to the outputs only,

    G = Σ_b w_b J_bᵀ H_out,b J_b / Σ_b w_b      (reduction="mean"; "sum": no division),

the Hessian without the terms that carry the model's own second derivatives (Schraudolph
2002; Martens 2020, §8). ``G`` is positive semi-definite for a loss convex in the outputs
(cross-entropy, squared error), and equals the Hessian for a model linear in θ. The vector
layout, weights ``w_b`` (returned by ``loss_of_output_fn`` as ``(loss, weight)``), guards, mode
and parameter safety are those of :class:`~hessian_spectra.HessianOperator`: both are built on
one :class:`~hessian_spectra.objective.Objective` (with ``loss_fn = loss_of_output_fn ∘
forward_fn``).

Two ways to compute ``G v``, one pass over the batches each:

- ``method="exact"``: ``J_b v`` by the double-vjp trick (differentiate the linear map
  ``u ↦ J_bᵀ u`` with respect to ``u``), ``H_out,b (J_b v)`` by double backward on the outputs
  only, then ``J_bᵀ(·)`` by one backward through the same graph;
- ``method="fd"`` (shard-local, runs under FSDP2): ``J_b v ≈ (f_b(θ+εv) − f_b(θ−εv)) / 2ε`` from
  two forwards without autograd (the parameters moved in place and restored by copy from one
  snapshot, as in the fd Hessian), then ``H_out,b`` on the outputs, then one forward and one
  backward at ``θ``: about 3 forwards + 1 backward per batch, with only first-order autograd
  through the model. Its error is that of a central difference of the outputs, ``O(ε²)``
  truncation plus ``O(u·|f|/ε)`` rounding; the default ``ε`` is that of the fd Hessian
  (:mod:`hessian_spectra.fd_step`).

For causal LMs on the batches of :mod:`hessian_spectra.data`, :func:`causal_lm_forward` and
:func:`causal_lm_loss_of_logits` are the pair that gives
:func:`hessian_spectra.data.causal_lm_loss` back when composed.

>>> import torch
>>> from hessian_spectra.testing import dense_ggn, flatten, make_problem, unflatten
>>> model, _, batches = make_problem("mlp")
>>> fwd = lambda m, b: m(b[0])
>>> lof = lambda out, b: (((out - b[1]) ** 2).mean(), b[0].shape[0])
>>> op = GGNOperator(model, fwd, lof, batches, method="exact")
>>> v = torch.linspace(-1, 1, op.num_params, dtype=torch.float64)
>>> G = dense_ggn(model, fwd, lof, batches)
>>> bool(torch.allclose(flatten(op @ unflatten(v, op.params)), G @ v, atol=1e-12))
True
"""

from __future__ import annotations

import time

import torch

from . import distributed as _dist
from . import fd_step as _fd
from ._opbase import ObjectiveOperator
from .fd_step import check_eps
from .hvp import _explain_second_order, _sdpa_math
from .objective import Objective, PassRecord, normalise
from .vectors import Vector, check_vector

__all__ = [
    "GGN_METHODS",
    "GGNOperator",
    "SplitLoss",
    "causal_lm_forward",
    "causal_lm_loss_of_logits",
    "split_loss",
]

GGN_METHODS = ("exact", "fd")
IGNORE = -100


def causal_lm_forward(model, batch) -> torch.Tensor:
    """The logits ``(B, T, V)`` of a Hugging Face causal LM on a batch of
    :func:`hessian_spectra.data.make_batches` (``input_ids``, ``attention_mask``).
    """
    params = getattr(model, "parameters", None)  # a stand-in for the model may have none
    dev = next(params()).device if params is not None else batch["input_ids"].device
    ids = batch["input_ids"].to(dev)
    mask = batch["attention_mask"].to(dev)
    return model(input_ids=ids, attention_mask=mask).logits


def causal_lm_loss_of_logits(logits: torch.Tensor, batch):
    """``(mean next-token cross-entropy over the target tokens, number of target tokens)`` from
    the logits ``(B, T, V)``: targets ``labels[:, 1:]``, −100 ignored, computed in float32 or
    wider, as :func:`hessian_spectra.data.causal_lm_loss`.

    >>> logits = torch.zeros(1, 3, 4)
    >>> batch = {"labels": torch.tensor([[0, 1, 2]])}
    >>> loss, count = causal_lm_loss_of_logits(logits, batch)
    >>> round(float(loss), 6), int(count)   # uniform logits: log 4
    (1.386294, 2)
    """
    labels = batch["labels"].to(logits.device)
    targets = labels[:, 1:]  # (B, T-1)
    count = (targets != IGNORE).sum()
    z = logits[:, :-1]  # (B, T-1, V)
    z = z if torch.finfo(z.dtype).bits >= 32 else z.float()
    loss = torch.nn.functional.cross_entropy(
        z.reshape(-1, z.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss / count.clamp(min=1), count


class SplitLoss:
    """A ``loss_fn(model, batch)`` that keeps its two parts: ``loss_of_output_fn(forward_fn(model,
    batch), batch)``. Use it as any loss function; where a GGN is asked for (the CLI's
    ``--curvature ggn`` on a ``module:factory`` model) its parts are taken from it.

    >>> loss_fn = SplitLoss(lambda m, b: m(b[0]), lambda o, b: ((o - b[1]) ** 2).mean())
    >>> m = torch.nn.Linear(2, 1)
    >>> float(loss_fn(m, (torch.zeros(3, 2), m.bias.detach().expand(3, 1))).detach())
    0.0
    """

    def __init__(self, forward_fn, loss_of_output_fn):
        self.forward_fn = forward_fn
        self.loss_of_output_fn = loss_of_output_fn

    def __call__(self, model, batch):
        """``loss_of_output_fn(forward_fn(model, batch), batch)``."""
        return self.loss_of_output_fn(self.forward_fn(model, batch), batch)

    def __repr__(self):
        return f"SplitLoss({self.forward_fn!r}, {self.loss_of_output_fn!r})"


def split_loss(loss_fn):
    """``(forward_fn, loss_of_output_fn)`` of ``loss_fn``: the parts of a :class:`SplitLoss`,
    the causal-LM pair for :func:`hessian_spectra.data.causal_lm_loss`; None for any other.

    >>> from hessian_spectra.data import causal_lm_loss
    >>> split_loss(causal_lm_loss) == (causal_lm_forward, causal_lm_loss_of_logits)
    True
    """
    from .data import causal_lm_loss

    if isinstance(loss_fn, SplitLoss):
        return loss_fn.forward_fn, loss_fn.loss_of_output_fn
    if loss_fn is causal_lm_loss:
        return causal_lm_forward, causal_lm_loss_of_logits
    return None


def _check_method(method: str) -> None:
    if method not in GGN_METHODS:
        raise ValueError(
            f"method must be one of {GGN_METHODS} for a GGNOperator, got {method!r} "
            "('exact': autograd products; 'fd': shard-local finite differences of the outputs)"
        )


def _outputs(out, i: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"forward_fn returned {type(out).__name__} for batch {i}; expected one tensor of "
            "outputs (e.g. the logits: return model(...).logits for a Hugging Face model)"
        )
    if not out.is_floating_point():
        raise TypeError(f"forward_fn returned a {out.dtype} tensor for batch {i}; expected floats")
    return out


def _h_out(loss_of_output_fn, out: torch.Tensor, batch, i: int, zero: bool, u: torch.Tensor):
    """``(H_out u, loss, weight, given)``: the Hessian of ``loss_of_output_fn`` with respect to
    the outputs ``out`` (detached) applied to ``u`` by double backward on the outputs only.
    """
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, w, given = normalise(loss_of_output_fn(o, batch), i, zero)
        if not loss.requires_grad:
            raise ValueError(
                f"loss_of_output_fn's loss of batch {i} does not depend on the outputs it was "
                "given: compute it from its first argument (the outputs), with gradients enabled"
            )
        (g,) = torch.autograd.grad(loss, o, create_graph=True)
        if g.requires_grad:  # else the loss is linear in the outputs: H_out = 0
            (hu,) = torch.autograd.grad(g, o, grad_outputs=u.to(g.dtype), allow_unused=True)
        else:
            hu = None
    hu = torch.zeros_like(o) if hu is None else hu
    return hu.detach(), loss.detach(), w, given


class GGNOperator(ObjectiveOperator):
    """The generalised Gauss–Newton matrix ``G = Σ_b w_b J_bᵀ H_out,b J_b / Σ_b w_b`` as a linear
    operator (module docstring); it meets :class:`~hessian_spectra.linop.Operator`, so
    ``lanczos``, ``slq``, ``top_eigenvalues``, ``trace`` and ``cg_solve`` run on it.

    Args:
        model: a ``torch.nn.Module``, plain or sharded with FSDP2 ``fully_shard`` (then only
            ``method="fd"``).
        forward_fn: ``forward_fn(model, batch)`` returning one tensor of outputs (e.g. logits).
        loss_of_output_fn: ``loss_of_output_fn(outputs, batch)`` returning a scalar loss, or
            ``(loss, weight)`` (e.g. the number of examples or target tokens).
        batches: a re-iterable of batches; every matvec is a full pass over them.
        method: ``"exact"`` (default; autograd) or ``"fd"`` (finite differences of the outputs).
        eps: the fd step (``None``: the default rule of :mod:`hessian_spectra.fd_step`).
        params, reduction, train_mode, check_determinism, progress: as for
            :class:`~hessian_spectra.HessianOperator`.

    ``op.gradient()`` is the gradient of ``loss_of_output_fn(forward_fn(model, batch), batch)``,
    the objective whose GGN this is.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        forward_fn,
        loss_of_output_fn,
        batches,
        method: str = "exact",
        eps: float | None = None,
        params=None,
        *,
        reduction: str = "mean",
        train_mode: bool = False,
        check_determinism: bool = True,
        progress: bool = False,
    ):
        _check_method(method)
        if not callable(forward_fn):
            raise TypeError("forward_fn must be callable as forward_fn(model, batch) -> outputs")
        if not callable(loss_of_output_fn):
            raise TypeError(
                "loss_of_output_fn must be callable as loss_of_output_fn(outputs, batch) -> loss "
                "or (loss, weight)"
            )
        self.forward_fn = forward_fn
        self.loss_of_output_fn = loss_of_output_fn

        def loss_fn(m, batch):
            return loss_of_output_fn(forward_fn(m, batch), batch)

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
        self.method = method
        self.eps = check_eps(eps) if eps is not None else None
        if self.objective.sharded and method != "fd":
            raise NotImplementedError(
                f"method={method!r} is not available on an FSDP2-sharded model: the exact GGN "
                "needs a double backward through FSDP2's hooks, which it does not support. Use "
                "method='fd' (shard-local finite differences of the outputs), or run unsharded."
            )
        self._init_stats()

    loss_fn = property(lambda self: self.objective.loss_fn, doc="loss_of_output_fn ∘ forward_fn.")

    def __repr__(self):
        return (
            f"GGNOperator(method={self.method!r}, num_params={self.num_params}, "
            f"tensors={len(self.params)}, eps={self.eps}, reduction={self.reduction!r}, "
            f"train_mode={self.train_mode})"
        )

    def eps_for(self, v: Vector) -> float:
        """The fd step for direction ``v``: ``self.eps``, or the fd Hessian's default rule."""
        if self.eps is not None:
            return self.eps
        return _fd.fd_step(v, self.objective.theta_norms(), self.param_dtype)

    def matvec(self, v: Vector, *, method: str | None = None, eps: float | None = None) -> Vector:
        """``G v`` (a new vector, ``self.vector_dtype``); ``method``/``eps`` override the
        operator's for this call.
        """
        v = check_vector(v, self.params, "v")
        method = method or self.method
        _check_method(method)
        if self.sharded and method != "fd":
            raise NotImplementedError("method='exact' is not available on a sharded model")
        obj = self.objective
        obj.first_use()
        t0 = time.perf_counter()
        if method == "fd":
            e = check_eps(eps) if eps is not None else self.eps_for(v)
            gv = self._matvec_fd(v, e)
        else:
            gv = self._matvec_exact(v)
        obj.check_finite(gv, what="GGN product")
        self._count(t0)
        return gv

    # ------------------------------------------------------------------ backends
    def _matvec_exact(self, v: Vector) -> Vector:
        obj = self.objective
        out_v = obj.zeros()
        rec = PassRecord()
        with obj.mode(), _sdpa_math(), _explain_second_order("exact"):
            for i, batch, zero in obj.iter_batches("GGN exact"):
                f = _outputs(self.forward_fn(obj.model, batch), i)
                if not f.requires_grad:
                    raise ValueError(
                        f"the outputs of batch {i} do not depend on the parameters: compute them "
                        "from the model inside forward_fn, with gradients enabled"
                    )
                # J v by the double-vjp trick: g(u) = J^T u is linear in u, and
                # d/du (g(u) . v) = J v.
                u = torch.zeros_like(f, requires_grad=True)
                g = torch.autograd.grad(
                    f, obj.params, grad_outputs=u, create_graph=True, allow_unused=True
                )
                pairs = [(gi, vi.to(gi.dtype)) for gi, vi in zip(g, v) if gi is not None]
                pairs = [(gi, vi) for gi, vi in pairs if gi.requires_grad]
                if pairs:
                    (jv,) = torch.autograd.grad(
                        [gi for gi, _ in pairs],
                        u,
                        grad_outputs=[vi for _, vi in pairs],
                        retain_graph=True,
                        allow_unused=True,
                    )
                jv = torch.zeros_like(f) if not pairs or jv is None else jv
                hjv, loss, w, given = _h_out(self.loss_of_output_fn, f, batch, i, zero, jv)
                jt = torch.autograd.grad(
                    f, obj.params, grad_outputs=hjv * w.to(hjv.dtype), allow_unused=True
                )
                for o, h in zip(out_v, jt):
                    if h is not None:
                        o.add_(h.detach().to(o.dtype))
                rec.add(i, batch, loss, w, given)
        torch._foreach_mul_(out_v, 1.0 / obj.normaliser(rec))
        return out_v

    def _matvec_fd(self, v: Vector, eps: float) -> Vector:
        obj = self.objective
        if eps == 0.0:
            return obj.zeros()
        locs = [_dist.local(p) for p in obj.params]
        vs = [t.to(p.dtype) for t, p in zip(v, locs)]
        with torch.no_grad():
            snapshot = [p.detach().clone() for p in locs]

        def moved(sign: float, batch, i: int) -> torch.Tensor:
            _dist.reshard(obj.model)  # no gathered copy of other parameters is reused
            with torch.no_grad():
                torch._foreach_copy_(locs, snapshot)
                torch._foreach_add_(locs, vs, alpha=sign * eps)
                f = _outputs(self.forward_fn(obj.model, batch), i)
            _dist.reshard(obj.model)
            with torch.no_grad():
                torch._foreach_copy_(locs, snapshot)
            return f

        rec = PassRecord()
        try:
            with obj.stash_grads(), obj.mode():
                for i, batch, zero in obj.iter_batches("GGN fd"):
                    f_plus = moved(1.0, batch, i)
                    f_minus = moved(-1.0, batch, i)
                    jv = (f_plus - f_minus).div_(2.0 * eps)  # J v, (outputs' shape)
                    del f_plus, f_minus
                    f = _outputs(self.forward_fn(obj.model, batch), i)
                    if f.shape != jv.shape:
                        raise ValueError(
                            f"forward_fn returned outputs of shape {tuple(f.shape)} for batch {i} "
                            f"at θ but {tuple(jv.shape)} at θ ± εv: the outputs' shape must not "
                            "depend on the parameters"
                        )
                    hjv, loss, w, given = _h_out(self.loss_of_output_fn, f, batch, i, zero, jv)
                    if f.requires_grad:
                        f.backward(hjv.to(f.dtype) * w.to(f.dtype))
                    elif not zero:
                        raise ValueError(
                            f"the outputs of batch {i} do not depend on the parameters: compute "
                            "them from the model inside forward_fn, with gradients enabled"
                        )
                    rec.add(i, batch, loss, w, given)
                N = obj.normaliser(rec)
                gv = obj.read_grads()
                torch._foreach_mul_(gv, obj.grad_scale / N)
                return gv
        finally:
            _dist.reshard(obj.model)
            with torch.no_grad():
                torch._foreach_copy_(locs, snapshot)
