"""The three Hessian-vector product backends, each one pass over an :class:`Objective`.

- :func:`hvp_fd`: the central finite difference of gradients (FSHP eq. 1, Alg. 1)
  ``Hv ≈ (∇L(θ+εv) − ∇L(θ−εv)) / 2ε``: two gradient passes, the parameters perturbed in
  place (shard-local under FSDP2) and restored by copy from one snapshot, so they are
  bit-for-bit what they were, also when ``loss_fn`` raises or the run is interrupted.
  Both passes accumulate into the same ``.grad`` buffers (the second with the sign flipped),
  so peak memory is that of one gradient plus the snapshot, which the operator keeps
  (:class:`FDBuffers`) with the small even-part samples: no parameter-sized allocation per
  product but the result. The step rule: :mod:`.fd_step`.
- :func:`hvp_exact`: Pearlmutter's double backward (HessFormer): ``∇(∇l_b · v)`` per batch.
- :func:`hvp_jvp`: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``
  (the curvlinops core). Where PyTorch has no forward-mode derivative for an op's backward it
  raises :class:`JvpUnsupported`; ``HessianOperator`` then falls back to :func:`hvp_exact`.

Activation checkpointing (``torch.utils.checkpoint``, Hugging Face
``gradient_checkpointing_enable()``) changes no number: fd and exact (non-reentrant checkpoint)
give the products without it; jvp cannot run through it and falls back to exact; exact through
a reentrant checkpoint (``use_reentrant=True``) raises ``NotImplementedError`` naming the fix.

Each returns ``H v`` (local shards, ``obj.vector_dtype``) normalised as the objective says
(``/ Σ w_b`` for ``reduction="mean"``).

>>> import hessian_spectra as hs
>>> from hessian_spectra.objective import Objective
>>> from hessian_spectra.testing import make_problem
>>> obj = Objective(*make_problem("mlp"))
>>> v = hs.unit_probe(obj)
>>> a, b = hvp_exact(obj, v), hvp_jvp(obj, v)
>>> hs.norm(hs.sub(a, b)) < 1e-14 * hs.norm(a)
True
"""

from __future__ import annotations

import contextlib

import torch

from . import distributed as _dist
from .fd_step import stencil_points
from .objective import Objective, PassRecord, _no_graph_error, any_rank, normalise
from .vectors import Vector

__all__ = ["FDBuffers", "JvpUnsupported", "hvp_exact", "hvp_fd", "hvp_jvp"]


class JvpUnsupported(RuntimeError):
    """``torch.func`` forward-over-reverse failed inside PyTorch on an op of the model or loss
    (its backward has no forward-mode derivative, or that derivative is broken).
    """


def _sdpa_math():
    """Force the math SDPA backend: fused CPU/flash kernels have no double backward / forward
    AD.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except Exception:  # noqa: BLE001  # pragma: no cover - torch without torch.nn.attention
        return contextlib.nullcontext()


# Tensors with more entries than this have their even part sampled (every EVEN_STRIDE-th
# entry of the flattened global tensor); smaller ones (norm weights, biases) are read whole.
EVEN_FULL = 4096
EVEN_STRIDE = 31  # prime: a row length that is a multiple of it is rare
# a write through p.data between products moves no version counter: the entries compared
# with the snapshot to see one (about 1/4093 of a vector, every tensor's first entry included)
FINGERPRINT_STRIDE = 4093
FUSED_MOVE = 1 << 16  # tensors of at least this many entries move in one fused pass


class FDBuffers:
    """What an operator keeps across its fd products, allocated on the first one and reused:
    the parameter snapshot (one copy of the local parameters, the restore source) and two
    even-part samples (the gradient at θ and the first pass's gradient, at the sampled entries:
    about ``2/EVEN_STRIDE`` of a vector). No parameter-sized tensor is allocated per product
    but the one returned (the ``.grad`` the passes accumulate into).

    The sample: every entry of a tensor with at most ``EVEN_FULL`` entries, and of a larger one
    every ``EVEN_STRIDE``-th entry of its flattened *global* tensor, its squared norm weighted
    by ``numel / samples`` (an unbiased estimate of the tensor's; the same entries at every
    world size). A tensor sharded in a layout other than FSDP2's rows is read whole.
    """

    def __init__(self):
        self.snapshot: Vector | None = None
        self.layout: list[tuple[int, int, int, int]] | None = None  # offset, stride, start, m
        self.weights: list[float] = []  # numel / samples per tensor (global)
        self.g0_sample: torch.Tensor | None = None
        self.plus_sample: torch.Tensor | None = None
        self.has_gradient = False
        self._fingerprint = None  # (storages, strided views of the parameters and snapshot)
        self.g0_key: tuple | None = None  # Objective.theta_key() of the θ g0_sample is from
        self.restored_key: tuple | None = None  # theta_key() after the last restore

    def nbytes(self) -> int:
        """Bytes held (the snapshot and the two samples)."""
        held = list(self.snapshot or []) + [self.g0_sample, self.plus_sample]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def prepare(self, obj: Objective) -> None:
        """Allocate the snapshot and the samples and lay them out (first call only)."""
        if self.layout is not None:
            return
        lay, start = [], 0
        for p in obj.params:
            n, loc = p.numel(), _dist.local(p)  # n: global
            span = _dist.local_flat_range(p)
            sampled = n > EVEN_FULL and span is not None
            off, k = ((-span[0]) % EVEN_STRIDE, EVEN_STRIDE) if sampled else (0, 1)
            m = len(range(off, loc.numel(), k))
            lay.append((off, k, start, m))
            self.weights.append(n / ((n + k - 1) // k))
            start += m
        dev = obj.params[0].device if obj.params else "cpu"
        self.g0_sample, self.plus_sample = (
            torch.zeros(start, dtype=obj.vector_dtype, device=dev) for _ in range(2)
        )
        self.snapshot = [torch.empty_like(_dist.local(p).detach()) for p in obj.params]
        self.layout = lay
        # the parameters move to θ + offset·ε·v from the snapshot in one pass per tensor
        # (torch.add(..., out=)) where a tensor is large, by two foreach calls where the
        # Python call per tensor would cost more than the second pass
        self.fused = [_dist.local(p).numel() >= FUSED_MOVE for p in obj.params]
        self._small = [i for i, f in enumerate(self.fused) if not f]
        self._snap_small = [self.snapshot[i] for i in self._small]
        # what every product reuses: the samples' per-tensor views, the segment lengths and
        # weights of the even part's weighted norm (no small tensor built per product)
        self._plus_views = self._views(self.plus_sample)
        self._lengths = torch.tensor([m for *_, m in lay], dtype=torch.long, device=dev)
        self._w = torch.tensor(self.weights, dtype=torch.float64, device=dev)
        self.sizes = [p.numel() for p in obj.params]  # global (DTensor.numel() is global)

    def revalidate(self, obj: Objective) -> tuple:
        """Before a product: where the parameters' version counters moved since this
        operator's last restore (another operator's product, a write that put the same
        values back) but their values equal the snapshot (that θ, bit for bit), what was
        cached for that θ (:meth:`Objective.theta_norms`, the gradient sample) holds still.
        Values that differ leave it stale, to be recomputed. Where no counter moved, every
        ``FINGERPRINT_STRIDE``-th entry is compared with the snapshot (a write through
        ``p.data``); a difference counts as :meth:`Objective.params_changed`. Returns
        ``obj.theta_key()``.
        """
        last = self.restored_key
        key = obj.theta_key()
        if last is None:
            return key
        locs = [_dist.local(p).detach() for p in obj.params]
        if not any_rank(key != last):
            # no counter moved; a write through p.data moves none, so a sparse sample of the
            # values (every FINGERPRINT_STRIDE-th entry) is compared with the snapshot: a
            # changed one (a hand-written SGD step changes every entry) counts as
            # params_changed(), which a caller that knows should call
            if not any_rank(not self._sample_equal(locs, key)):
                return key
            obj.params_changed()
            return obj.theta_key()
        if not any_rank(not all(torch.equal(a, b) for a, b in zip(locs, self.snapshot))):
            obj.theta_restored(last, key)
            if self.g0_key == last:
                self.g0_key = key
            self.restored_key = key
        return key

    def _sample_equal(self, locs: list, key: tuple) -> bool:
        """Every ``FINGERPRINT_STRIDE``-th entry of each local tensor equals the snapshot's
        (strided views kept while the tensors' storages, part of ``key``, stay the same).
        """
        ptrs = tuple(x[1] for x in key[1])
        if self._fingerprint is None or self._fingerprint[0] != ptrs:
            k = FINGERPRINT_STRIDE
            views = [(a.reshape(-1)[::k], b.reshape(-1)[::k]) for a, b in zip(locs, self.snapshot)]
            self._fingerprint = (ptrs, [a for a, _ in views], [b for _, b in views])
        _, a, b = self._fingerprint
        return not a or torch.equal(torch.cat(a), torch.cat(b))

    def move(self, locs: list, vs: list, alpha: float) -> None:
        """Set the local parameters ``locs`` to ``snapshot + alpha·vs`` (no_grad)."""
        small = self._small
        if small:
            dst = [locs[i] for i in small]
            torch._foreach_copy_(dst, self._snap_small)
            torch._foreach_add_(dst, [vs[i] for i in small], alpha=alpha)
        for p, s, t, f in zip(locs, self.snapshot, vs, self.fused):
            if f:
                torch.add(s, t, alpha=alpha, out=p)

    def _views(self, flat: torch.Tensor) -> list:
        return [flat[start : start + m] for _, _, start, m in self.layout]

    def _picks(self, vec) -> list:
        # views (no copy for contiguous tensors); the whole of a tensor read whole
        return [
            t.reshape(-1)[off::k] if k > 1 else t.reshape(-1)
            for t, (off, k, _, _) in zip(vec, self.layout)
        ]

    def sample(self, vec, out: torch.Tensor) -> None:
        """Gather the sampled entries of ``vec`` (local tensors) into ``out`` (a sample)."""
        views = self._plus_views if out is self.plus_sample else self._views(out)
        with torch.no_grad():
            torch._foreach_copy_(views, self._picks(vec))

    def set_gradient(self, g0: Vector, key: tuple | None = None) -> None:
        """Keep the sample of the normalised gradient at θ (for the even part); ``key``: the
        objective's ``theta_key()`` at that θ (a later product at another θ sees it stale).
        """
        self.sample(g0, self.g0_sample)
        self.has_gradient = True
        self.g0_key = key

    def even_norm(self, pair: Vector, f: float) -> float:
        """``||f·(2·plus − pair) − 2 g0||`` over the sample, with ``pair`` the local ``.grad``
        after the second pass (read at the sampled entries), float64, each tensor's squared
        norm weighted by its ``numel / samples`` (global).
        """
        # (samples,) float64, freed on return: the picks cast in the one foreach copy
        d = torch.empty(self.plus_sample.shape, dtype=torch.float64, device=self._w.device)
        with torch.no_grad():
            torch._foreach_copy_(self._views(d), self._picks(pair))
            # f·(2·plus − pair) − 2 g0, as −f·(pair − 2·plus) − 2 g0 (the same float64 numbers)
            d.sub_(self.plus_sample, alpha=2.0).mul_(-f).sub_(self.g0_sample, alpha=2.0)
            # each tensor's squared norm (one segmented sum), weighted by numel / samples
            sq = torch.segment_reduce(d.square_(), "sum", lengths=self._lengths)
        return float(_dist.sum_over_shards(sq.mul_(self._w).sum().reshape(1).cpu())[0]) ** 0.5


def hvp_fd(
    obj: Objective,
    v: Vector,
    eps: float,
    stencil: str = "central",
    g0: Vector | None = None,
    info: dict | None = None,
    buffers: FDBuffers | None = None,
) -> Vector:
    """``(∇L(θ+εv) − ∇L(θ−εv)) / 2ε`` with the parameters restored by copy (module docstring);
    ``stencil="four-point"``: ``(8∇L(θ+εv) − 8∇L(θ−εv) − ∇L(θ+2εv) + ∇L(θ−2εv)) / 12ε``
    (truncation O(ε⁴), 4 gradient passes). ``eps == 0`` (only for a zero ``v``) gives the zero
    vector.

    ``buffers`` (:class:`FDBuffers`, kept by the operator): the snapshot and samples are reused
    across products; without it they are allocated for this call. The parameters move to each
    point in one pass (``θ + offset·ε·v`` written from the snapshot), and back by one copy.

    With the gradient at θ (``g0``, normalised, or one set by :meth:`FDBuffers.set_gradient`)
    and a dict ``info``, also sets ``info["d2"] = ||∇L(θ+εv) + ∇L(θ−εv) − 2 g0||``, the even
    part of the pair (``≈ ε² ||∇(D²L[v,v])||``): the error model's curvature-change scale
    (:mod:`.fd_step`), estimated from the entries :class:`FDBuffers` samples (exact on tensors
    of up to ``EVEN_FULL`` entries), read between and after the passes without a
    parameter-sized temporary.
    """
    if eps == 0.0:
        return obj.zeros()
    points, divisor = stencil_points(stencil)
    ws = buffers if buffers is not None else FDBuffers()
    ws.prepare(obj)
    locs = [_dist.local(p) for p in obj.params]
    vs = [t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(v, locs)]
    snapshot = ws.snapshot
    key = obj.theta_key()  # the parameters as found: the same values after the restore
    even = info is not None and (g0 is not None or ws.has_gradient)
    if even and g0 is not None:
        ws.set_gradient(g0, key)
    with torch.no_grad():
        torch._foreach_copy_(snapshot, locs)
    try:
        with obj.stash_grads(), obj.mode():
            recs = []
            for k, (offset, weight) in enumerate(points):
                # FSDP2 may still hold gathered copies (root after a no_grad forward, blocks
                # with reshard_after_forward=False) that the next forward would reuse
                # unperturbed.
                _dist.reshard(obj.model)
                with torch.no_grad():
                    if k == 0:
                        torch._foreach_add_(locs, vs, alpha=offset * eps)
                    else:  # θ + offset·ε·v from the snapshot
                        ws.move(locs, vs, offset * eps)
                where = f"θ{offset:+g}εv".replace("1εv", "εv")
                recs.append((obj.grad_pass(weight, f"HVP {where}"), where))
                if even and k == 0:
                    # w₀ ∇L(θ+εv), unnormalised, at the sampled entries
                    ws.sample(_grads_or_zeros(obj, locs), ws.plus_sample)
                elif even and k == 1:
                    # the first two points are ±ε with weights ±w₀: .grad = w₀(g₊ − g₋)
                    n1 = obj.normaliser(recs[0][0], f"at {recs[0][1]}")
                    recs[0] = (*recs[0], n1)
                    f = obj.grad_scale / (points[0][1] * n1)
                    info["d2"] = ws.even_norm(_grads_or_zeros(obj, locs), f)
            rp = recs[0][0]
            N = recs[0][2] if len(recs[0]) > 2 else obj.normaliser(rp, f"at {recs[0][1]}")
            for rm, where in recs[1:]:
                Nm = obj.normaliser(rm, f"at {where}")
                if abs(rm.total_weight - rp.total_weight) > 1e-9 * rp.total_weight or N != Nm:
                    raise ValueError(
                        "the batch weights differ between the fd passes: the data changed "
                        "between passes"
                    )
            hv = obj.read_grads()
            torch._foreach_mul_(hv, obj.grad_scale / (divisor * eps * N))
            return hv
    finally:
        _dist.reshard(obj.model)  # no gathered copy of perturbed parameters survives
        with torch.no_grad():
            torch._foreach_copy_(locs, snapshot)
        # the copies moved the version counters on, not the values: what was cached for
        # the parameters as found (their norms, the gradient sample) still holds
        new = obj.theta_key()
        obj.theta_restored(key, new)
        if ws.g0_key == key:
            ws.g0_key = new
        ws.restored_key = new


def _grads_or_zeros(obj: Objective, locs) -> list:
    """The local ``.grad`` of each parameter (a zero tensor where there is none)."""
    return [
        _dist.local(p.grad) if p.grad is not None else torch.zeros_like(loc)
        for p, loc in zip(obj.params, locs)
    ]


def hvp_exact(obj: Objective, v: Vector) -> Vector:
    """``Σ_b w_b ∇(∇l_b · v)`` by double backward, normalised (module docstring)."""
    out = obj.zeros()
    rec = PassRecord()
    with obj.mode(), _sdpa_math(), _explain_second_order("exact"):
        for i, batch, zero in obj.iter_batches("HVP exact"):
            loss, w, given = obj.forward(batch, i, zero)
            if not loss.requires_grad:
                raise _no_graph_error(i)
            g = torch.autograd.grad(
                loss * w.to(loss.dtype), obj.params, create_graph=True, allow_unused=True
            )
            if all(gi is None for gi in g):
                raise ValueError(
                    f"the loss of batch {i} does not depend on any of the operator's parameters "
                    f"({', '.join(obj.param_names[:3])}{', ...' if len(obj.params) > 3 else ''}): "
                    "choose params that the loss uses"
                )
            # ∇(g · v) as a vector-Jacobian product with grad_outputs=v: no elementwise g*v
            # products and their backward (~15% of an exact HVP on SmolLM2-135M, CPU).
            # A g_i that does not require grad is constant in θ (its rows of H are 0).
            pairs = [
                (gi, vi.to(gi.dtype)) for gi, vi in zip(g, v) if gi is not None and gi.requires_grad
            ]
            hv = (
                torch.autograd.grad(
                    [gi for gi, _ in pairs],
                    obj.params,
                    grad_outputs=[vi for _, vi in pairs],
                    allow_unused=True,
                )
                if pairs
                else [None] * len(obj.params)
            )
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach().to(o.dtype))
            rec.add(i, batch, loss, w, given)
    torch._foreach_mul_(out, 1.0 / obj.normaliser(rec))
    return out


class _LossModule(torch.nn.Module):
    """Wraps (model, loss_fn) so torch.func.functional_call can swap the parameters."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def hvp_jvp(obj: Objective, v: Vector) -> Vector:
    """``Σ_b w_b`` jvp(grad(l_b))(θ; v), normalised (module docstring); raises
    :class:`JvpUnsupported` where PyTorch cannot do forward-over-reverse through an op.
    """
    from torch.func import functional_call, grad, jvp

    wrapper = _LossModule(obj.model, obj.loss_fn)
    sel = {"model." + n: p for n, p in zip(obj.param_names, obj.params)}
    consts = {n: t.detach() for n, t in wrapper.named_parameters() if n not in sel}
    consts.update(dict(wrapper.named_buffers()))
    primals = {n: p.detach() for n, p in sel.items()}
    tangents = {n: t.to(p.dtype) for (n, p), t in zip(sel.items(), v)}

    given = {}  # batch index -> whether loss_fn returned a weight (aux outputs must be tensors)

    def weighted_loss(pd, batch, i, zero):
        loss, w, given[i] = normalise(functional_call(wrapper, {**consts, **pd}, (batch,)), i, zero)
        if not loss.requires_grad:
            raise _no_graph_error(i)
        return loss * w.to(loss.dtype), (loss.detach(), w)

    out = obj.zeros()
    rec = PassRecord()
    with obj.mode(), _sdpa_math(), _explain_second_order("jvp"):
        for i, batch, zero in obj.iter_batches("HVP jvp"):
            g_fn = grad(lambda pd, b=batch, i=i, z=zero: weighted_loss(pd, b, i, z), has_aux=True)
            _, hv, (loss, w) = jvp(g_fn, (primals,), (tangents,), has_aux=True)
            for o, n in zip(out, sel):
                o.add_(hv[n].detach().to(o.dtype))
            rec.add(i, batch, loss, w, given[i])
    torch._foreach_mul_(out, 1.0 / obj.normaliser(rec))
    return out


@contextlib.contextmanager
def _explain_second_order(method: str):
    """Turn PyTorch's errors about missing second-order derivatives into ours."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as e:
        if isinstance(e, JvpUnsupported):
            raise
        msg = str(e)
        first = msg.splitlines()[0] if msg else type(e).__name__
        if method == "jvp" and "ZeroTensors are immutable" in msg:
            raise JvpUnsupported(
                "torch.func forward-over-reverse failed inside PyTorch: the forward-mode "
                "derivative of an op's backward writes into an immutable zero tangent "
                f"({first}). F.mse_loss with reduction='mean' does this on torch 2.13 "
                "(mse_loss_backward); reduction='sum', reduction='none' then .mean(), or "
                "((out - y) ** 2).mean() work."
            ) from e
        if method == "jvp" and "mutate a captured Tensor" in msg:
            raise JvpUnsupported(
                "torch.func forward-over-reverse cannot run a model that updates a tensor in "
                "place while it computes the loss (batch-norm running statistics in train mode, "
                f"a cache): {first}"
            ) from e
        if method == "jvp" and ("saved tensor hooks" in msg or "setup_context" in msg):
            raise JvpUnsupported(
                "torch.func forward-over-reverse cannot run through activation checkpointing "
                "(torch.utils.checkpoint, Hugging Face gradient_checkpointing_enable()) or another "
                f"custom autograd.Function: {first}"
            ) from e
        if method == "exact" and "use_reentrant=True" in msg:
            raise NotImplementedError(
                "method='exact' cannot differentiate twice through activation checkpointing "
                "with use_reentrant=True (torch.utils.checkpoint, or Hugging Face "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
                "True})). Checkpoint with use_reentrant=False (Hugging Face's default), or use "
                f"method='fd'. PyTorch: {first}"
            ) from e
        if method == "jvp" and ("forward AD" in msg or "forward-mode" in msg):
            raise JvpUnsupported(
                f"torch.func forward-over-reverse failed inside PyTorch: {first}"
            ) from e
        keys = (
            "derivative for",
            "not implemented",
            "double backward",
            "_efficient_attention",
            "flash",
        )
        if any(k in msg for k in keys):
            other = "'exact' or 'fd'" if method == "jvp" else "'fd'"
            raise RuntimeError(
                f"method={method!r} needs second derivatives through every op of the model, "
                f"and one op has none: {first}. For Hugging Face models load with "
                f"attn_implementation='eager', or use method={other}."
            ) from e
        raise
