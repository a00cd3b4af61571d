"""The training objective that every curvature operator shares.

An :class:`Objective` is the weighted loss of a model over a fixed list of batches,

    L(θ) = Σ_b w_b l_b(θ) / Σ_b w_b      (reduction="mean", the default)
    L(θ) = Σ_b w_b l_b(θ)                (reduction="sum"),

with ``l_b = loss_fn(model, batch_b)`` and ``w_b`` the weight ``loss_fn`` returns with it
(``(loss, weight)``, e.g. the number of target tokens) or 1. Under ``torchrun`` the sums run
over the batches of every rank (weights and losses are all-reduced); a batch wrapped in
:class:`~hessian_spectra.partition.ZeroWeight` is evaluated (so FSDP2's collectives stay in
step) and weighs 0.

It owns what an operator must get right around the loss, so that the HVP backends
(:mod:`hessian_spectra.hvp`) and every operator built on them share it:

- the inputs, validated: a re-iterable, unshuffled, non-empty ``batches``; the parameters
  (``params``: names or tensors, default all with ``requires_grad``);
- the mode: eval by default (dropout off), ``train_mode=True`` on request; the model's buffers
  (batch-norm running statistics) are saved and restored bit-for-bit around every pass, so a
  train-mode batch norm (batch statistics) is analysable and nothing of the model changes;
- the user's ``.grad`` tensors, stashed and given back around every pass;
- the weights: no batch may weigh less than 0, the total must be positive, and batches of
  different sizes without weights are refused (a mean-reduced loss would then count a short
  batch like a full one);
- the guards: the same data on every pass, a deterministic loss (``check_determinism``), the
  same number of batches on every rank; finite losses and results, with the first bad batch
  named; a model sharded only in part (parameters outside every ``fully_shard`` module, whose
  gradients FSDP2 never reduces) and a reentrant activation checkpoint that hides parameters
  from backward (inputs that need no gradient) are refused;
- :meth:`Objective.gradient` ``-> (loss, grad)``.

>>> from hessian_spectra.testing import make_problem
>>> obj = Objective(*make_problem("mlp"))
>>> loss, g = obj.gradient()
>>> obj.num_params, len(g), round(loss, 4)
(51, 4, 1.226)
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import warnings

import torch

from . import distributed as _dist
from ._progress import progress_bar
from .partition import ZeroWeight
from .vectors import Vector, tensor_norms

__all__ = ["REDUCTIONS", "Objective", "PassRecord", "batch_size"]

REDUCTIONS = ("mean", "sum")


def batch_size(batch) -> int | None:
    """The leading dimension of the first tensor in ``batch`` (a tensor, or a tuple, list or dict
    of them), or None when it holds no tensor with a dimension.

    >>> batch_size((torch.zeros(5, 3), torch.zeros(5)))
    5
    """
    if isinstance(batch, ZeroWeight):
        batch = batch.batch
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim >= 1 else None
    items = batch.values() if isinstance(batch, dict) else batch
    if isinstance(items, (list, tuple)) or isinstance(batch, dict):
        for x in items:
            n = batch_size(x)
            if n is not None:
                return n
    return None


class PassRecord:
    """What one pass over the batches saw: losses, weights, and the sizes of the batches whose
    ``loss_fn`` returned no weight (for the unequal-batch check).
    """

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.unweighted: dict[int, int] = {}
        self.total_weight: float | None = None

    def add(self, i: int, batch, loss: torch.Tensor, w: torch.Tensor, given: bool) -> None:
        """Record batch ``i``'s loss and weight (``given``: whether ``loss_fn`` returned one)."""
        self.losses.append(loss.detach())
        self.weights.append(w)
        if not given:
            n = batch_size(batch)
            if n is not None:
                self.unweighted[i] = n


def _same_batch(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_batch(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_batch(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a == b of arbitrary objects may raise anything
        return a is b


def normalise(out, i: int, zero: bool = False):
    """``(loss, weight, given)`` from what ``loss_fn`` returned for batch ``i`` (``given``: a
    weight was returned; ``zero``: a ZeroWeight batch, weight 0), or a clear error.
    """
    given = isinstance(out, (tuple, list))
    if given:
        if len(out) != 2:
            raise TypeError(
                f"loss_fn returned a {type(out).__name__} of length {len(out)} for batch {i}; "
                "expected a scalar loss or (loss, weight)"
            )
        loss, w = out
    else:
        loss, w = out, 1.0
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"loss_fn returned {type(loss).__name__} for batch {i}; expected a scalar tensor"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn returned a loss of shape {tuple(loss.shape)} for batch {i}; it must be a "
            "scalar (reduce it with .mean() or .sum() and return the weight separately)"
        )
    w = torch.as_tensor(0.0 if zero else w, dtype=torch.float64, device=loss.device).reshape(())
    return loss.reshape(()), w, given or zero


def _no_graph_error(i: int) -> ValueError:
    return ValueError(
        f"the loss of batch {i} does not depend on the parameters (it has no autograd graph): "
        "it was computed under torch.no_grad() or torch.inference_mode(), detached (.detach(), "
        ".item(), .numpy()), or from tensors other than the model's parameters. Compute it from "
        "model(...) inside loss_fn, with gradients enabled."
    )


class Objective:
    """The weighted loss of ``model`` over ``batches`` (module docstring): inputs, mode, user
    state, weights, guards and ``gradient()``, shared by every curvature operator.

    Args:
        model: a ``torch.nn.Module``, plain or sharded with FSDP2 ``fully_shard``.
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss tensor, or ``(loss, weight)``.
        batches: a re-iterable of batches (list, DataLoader without shuffling).
        params: a subset of parameters (names or tensors); default all with ``requires_grad``.
        reduction: ``"mean"`` (``Σ w_b l_b / Σ w_b``) or ``"sum"`` (``Σ w_b l_b``).
        train_mode: evaluate in training mode (batch statistics); default eval mode.
        check_determinism: on first use, check that two passes see the same first batch and
            two evaluations of its loss agree.
        progress: a progress bar over the batches of each pass (rank 0 only).
    """

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
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch)")
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"reduction must be 'mean' (Σ w_b l_b / Σ w_b) or 'sum' (Σ w_b l_b), "
                f"got {reduction!r}"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.batches = _check_batches(batches)
        self.reduction = reduction
        self.train_mode = bool(train_mode)
        self.progress = progress
        self.check_determinism = check_determinism
        self._checked = False
        self._sizes_checked = False
        self.param_names, self.params = _select_params(model, params)
        self.sharded = any(_dist.is_sharded(p) for p in self.params)
        if self.sharded and _dist.world_size() > 1:
            _refuse_partly_sharded(self.param_names, self.params)
        if _dist.world_size() > 1 and not self.sharded:
            raise ValueError(
                f"running with world size {_dist.world_size()} but the model's parameters are "
                "not sharded: spread it with hessian_spectra.distributed.parallelize(model, "
                "'fsdp' | 'hsdp' | 'dp') (FSDP2), or run in one process"
            )
        # which ranks hold which piece: the group that vectors' dots and norms reduce over
        self.layout = _dist.layout_of(self.params)
        _dist.use_layout(self.layout)
        self.num_params = sum(p.numel() for p in self.params)  # DTensor.numel() is global
        dtypes = {p.dtype for p in self.params}
        self.param_dtype = min(dtypes, key=lambda d: torch.finfo(d).bits)
        self.vector_dtype = torch.float64 if dtypes == {torch.float64} else torch.float32
        # FSDP2 divides reduced gradients by the data-parallel size (or a user-set factor);
        # multiplying back gives the sum over ranks, normalised by the global weight.
        self.grad_scale = _dist.gradient_scale(model) if self.sharded else 1.0
        self._theta_norms = None
        self._theta_key = None  # theta_key() when _theta_norms was computed
        self._generation = 0  # bumped by params_changed(): part of every theta_key()
        self._cut_checked = False  # the first gradient pass looks for a reentrant-checkpoint cut

    def with_batches(self, batches) -> Objective:
        """The same objective (model, loss, parameters, mode, reduction) on other ``batches``;
        its determinism check is off (the caller's objective has done it).

        >>> from hessian_spectra.testing import make_problem
        >>> obj = Objective(*make_problem("mlp"))
        >>> len(obj.with_batches(obj.batches[:1]).batches)
        1
        """
        new = copy.copy(self)
        new.batches = _check_batches(batches)
        new.check_determinism = False
        new._checked = False
        new._sizes_checked = False
        return new

    def __repr__(self):
        return (
            f"Objective(num_params={self.num_params}, tensors={len(self.params)}, "
            f"reduction={self.reduction!r}, train_mode={self.train_mode})"
        )

    # ------------------------------------------------------------------ state around a pass
    @contextlib.contextmanager
    def mode(self):
        """Train/eval mode as asked for the duration; modules' modes and every buffer (e.g.
        batch-norm running statistics) restored bit-for-bit afterwards.
        """
        modules = list(self.model.modules())
        modes = [(m, m.training) for m in modules]
        bufs = [
            (m, name, b, b.detach().clone())
            for m in modules
            for name, b in m._buffers.items()
            if isinstance(b, torch.Tensor)
        ]
        if any(t != self.train_mode for _, t in modes):  # else train() would change nothing
            self.model.train(self.train_mode)
        try:
            yield
        finally:
            for m, t in modes:
                if m.training != t:  # Module.__setattr__ costs ~1 µs a module
                    m.training = t
            with torch.no_grad():
                for m, name, b, saved in bufs:
                    m._buffers[name] = b
                    if not torch.equal(b, saved):
                        b.copy_(saved)

    @contextlib.contextmanager
    def stash_grads(self):
        """Set every ``.grad`` to None for our passes and give the user's back afterwards."""
        saved = [p.grad for p in self.params]
        every = list(self.model.parameters())  # one traversal of the modules, for both ends
        others = [(p, p.grad) for p in every if p.grad is not None]
        for p in self.params:
            p.grad = None
        for p, _ in others:  # else backward would accumulate into the user's tensors in place
            p.grad = None
        try:
            yield
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g
            for p, g in others:  # parameters outside params got gradients too: put theirs back
                p.grad = g
            chosen = {id(p) for p in self.params}
            kept = {id(p) for p, _ in others}
            for p in every:
                if p.grad is not None and id(p) not in chosen and id(p) not in kept:
                    p.grad = None

    # ------------------------------------------------------------------ the batch loop
    def iter_batches(self, desc: str = ""):
        """``(i, batch, zero)`` for every batch (``zero``: a ZeroWeight batch, unwrapped)."""
        try:
            total = len(self.batches)
        except TypeError:
            total = None
        with progress_bar(self.progress, total=total, desc=desc, unit="batch", leave=False) as bar:
            for i, b in enumerate(self.batches):
                zero = isinstance(b, ZeroWeight)
                yield i, (b.batch if zero else b), zero
                if bar is not None:
                    bar.update(1)

    def forward(self, batch, i: int, zero: bool = False):
        """``(loss, weight, given)`` of batch ``i`` (see :func:`normalise`)."""
        return normalise(self.loss_fn(self.model, batch), i, zero)

    def grad_pass(self, sign: float, desc: str) -> PassRecord:
        """Accumulate ``sign · Σ_b w_b ∇l_b`` into the parameters' ``.grad``.

        The first pass also refuses a reentrant activation checkpoint that cut the graph
        (:func:`_watch_checkpoint_cut`): parameters it hid would get no gradient, silently.
        """
        rec = PassRecord()
        watch = contextlib.nullcontext([]) if self._cut_checked else _watch_checkpoint_cut()
        with watch as cut:
            for i, batch, zero in self.iter_batches(desc):
                loss, w, given = self.forward(batch, i, zero)
                if not loss.requires_grad:
                    raise _no_graph_error(i)
                # the weight as the seed of the backward: no product node in the graph
                loss.backward(w.to(loss.dtype) * sign)
                rec.add(i, batch, loss, w, given)
        if cut:
            hidden = [n for n, p in zip(self.param_names, self.params) if p.grad is None]
            if hidden:
                raise _checkpoint_cut_error(hidden)
        self._cut_checked = True
        return rec

    def read_grads(self) -> Vector:
        """The accumulated ``.grad`` (local shards) as a vector in ``vector_dtype``."""
        out = []
        for p in self.params:
            g = p.grad
            if g is None:
                out.append(torch.zeros_like(_dist.local(p), dtype=self.vector_dtype))
            else:
                out.append(_dist.local(g).detach().to(self.vector_dtype))
        return out

    def zeros(self) -> Vector:
        """A zero vector laid out like ``params`` (local shards), in ``vector_dtype``."""
        return [torch.zeros_like(_dist.local(p), dtype=self.vector_dtype) for p in self.params]

    # ------------------------------------------------------------------ weights and checks
    def normaliser(self, rec: PassRecord, where: str = "at the current parameters") -> float:
        """Check one pass (finite losses, weights ≥ 0, no unequal unweighted batches) and return
        what its weighted sum is divided by: ``Σ_b w_b`` (global) for ``"mean"``, 1 for
        ``"sum"``. Also sets ``rec.total_weight``.
        """
        check_losses(rec.losses, where)
        self._check_sizes(rec)
        w = torch.stack(rec.weights)
        bad = (~torch.isfinite(w)) | (w < 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"loss_fn returned weight {float(w[i])} for batch {i}; a weight must be finite "
                "and ≥ 0 (e.g. the number of examples or target tokens in the batch)"
            )
        W = float(_dist.all_reduce_sum(w.sum().reshape(1))[0])
        if not (W > 0 and math.isfinite(W)):
            raise ValueError(
                f"the batch weights sum to {W}; they must be positive (e.g. token counts)"
            )
        rec.total_weight = W
        return W if self.reduction == "mean" else 1.0

    def _check_sizes(self, rec: PassRecord) -> None:
        """Refuse batches of different sizes whose ``loss_fn`` returned no weight (mean only)."""
        if self._sizes_checked or self.reduction != "mean":
            return
        sizes = list(rec.unweighted.values())
        lo, hi = (min(sizes), max(sizes)) if sizes else (math.inf, -math.inf)
        if self.sharded:
            mm = _dist.all_reduce_max(torch.tensor([hi, -lo], dtype=torch.float64))
            hi, lo = float(mm[0]), -float(mm[1])
        if math.isfinite(hi) and math.isfinite(lo) and hi != lo:
            where = ", ".join(f"batch {i}: {n}" for i, n in list(rec.unweighted.items())[:4])
            raise ValueError(
                f"the batches have different sizes ({lo:g} to {hi:g} along their first "
                f"dimension; {where}) and loss_fn returned no weight, so every batch would count "
                "as much as any other (a mean-reduced loss of a short batch as much as a full "
                "one). Return (loss, batch_size) from loss_fn, or sum the loss over the batch "
                "and pass reduction='sum'."
            )
        self._sizes_checked = True

    def check_finite(self, hv: Vector, what: str = "HVP") -> None:
        """Raise ``FloatingPointError`` naming the first bad batch if ``hv`` has NaN/inf."""
        dev = hv[0].device if hv else "cpu"
        # Screen with plain sums (one fast pass; any NaN/inf entry makes its sum non-finite) and
        # count entry by entry only where a sum is not finite (finite entries can overflow a
        # sum). isfinite on every entry cost 0.85 s of a 4.6 s fd HVP on SmolLM2-135M (CPU).
        sums = [t.sum() for t in hv]
        bad = torch.zeros((), dtype=torch.float64, device=dev)
        if sums and not bool(torch.isfinite(torch.stack([s.to(dev) for s in sums])).all()):
            for t in hv:
                bad = bad + (~torch.isfinite(t)).sum().to(bad.device, torch.float64)
        if float(_dist.all_reduce_sum(bad.reshape(1))[0]) > 0:
            culprit = self.find_bad_batch()
            where = f" (first from batch {culprit})" if culprit is not None else ""
            raise FloatingPointError(
                f"the {what} has NaN/inf entries{where}. Check that batch, the model's dtype "
                "(fp16 overflow?), and for method='fd' the step eps."
            )

    def find_bad_batch(self) -> int | None:
        """The first batch whose own gradient is not finite (None when sharded or none)."""
        if self.sharded:
            return None  # per-batch collectives would need every rank in step
        with self.stash_grads(), self.mode():
            for i, batch, zero in self.iter_batches():
                for p in self.params:
                    p.grad = None
                loss, _, _ = self.forward(batch, i, zero)
                if not torch.isfinite(loss):
                    return i
                if not loss.requires_grad:
                    continue
                loss.backward()
                if any(
                    p.grad is not None and not torch.isfinite(p.grad).all() for p in self.params
                ):
                    return i
        return None

    def first_use(self) -> None:
        """The guards run once before the first pass (module docstring); and, before every
        pass, this objective's parameter layout made the one vectors reduce by.
        """
        _dist.use_layout(self.layout)
        if not self._checked and self.layout.replicate_size > 1:
            _dist.check_replicas([_dist.local(p).detach() for p in self.params])
        if not self._checked and self.sharded:
            try:
                n = len(self.batches)
            except TypeError:
                n = sum(1 for _ in self.batches)
            _dist.check_agree(
                n,
                "the number of batches",
                "Under FSDP2 every forward/backward is a collective, so every rank must run the "
                "same number of batches: split them with hessian_spectra.partition.shard_batches, "
                "which pads a short rank with ZeroWeight batches.",
            )
        if self._checked or not self.check_determinism:
            self._checked = True
            return
        b1 = next(iter(self.batches))
        b2 = next(iter(self.batches))
        if not _same_batch(b1, b2):
            raise ValueError(
                "batches yields different data on each pass (a DataLoader with shuffle=True or a "
                "random sampler?). Every matvec must see the same data: use shuffle=False or a "
                "list."
            )
        zero = isinstance(b1, ZeroWeight)
        b = b1.batch if zero else b1
        with torch.no_grad(), self.mode():
            l1 = self.forward(b, 0, zero)[0]
            l2 = self.forward(b, 0, zero)[0]
        a, c = float(l1), float(l2)
        if not (math.isfinite(a) and math.isfinite(c)):
            check_losses([l1, l2], "at the current parameters")
        rtol = 1e-5 if torch.finfo(self.param_dtype).bits >= 32 else 1e-2
        if abs(a - c) > rtol * max(abs(a), abs(c), 1e-30):
            mode = "train" if self.train_mode else "eval"
            raise ValueError(
                f"loss_fn is not deterministic: two evaluations of batch 0 in {mode} mode gave "
                f"{a!r} and {c!r}. Dropout or other randomness (or state that the model updates "
                "as it runs and that feeds the loss) would make every HVP noise: use eval mode "
                "(train_mode=False, the default) or set dropout probabilities to 0."
            )
        self._checked = True

    def theta_key(self) -> tuple:
        """What identifies the current parameter values cheaply: each local tensor's version
        counter (bumped by every in-place change through it or a view of it, ``optimizer.step()``
        and ``load_state_dict`` included) and its storage. A write through ``p.data`` bumps no
        counter: an fd operator also compares a sparse sample of the values with its snapshot
        (:meth:`~hessian_spectra.hvp.FDBuffers.revalidate`); to be sure, call
        :meth:`params_changed` after one.
        """
        ts = self.params if not self.sharded else [_dist.local(p) for p in self.params]
        return (self._generation, tuple([(t._version, t.data_ptr()) for t in ts]))

    def params_changed(self) -> None:
        """Say that the parameter values may have changed without a version counter seeing it
        (a write through ``p.data``): every :meth:`theta_key` taken before differs from the
        next, so what was cached for them (:meth:`theta_norms`, an fd operator's sample of
        ``∇L(θ)``) is recomputed unless the values are found equal to the fd snapshot.
        """
        self._generation += 1
        self._theta_norms = None
        self._theta_key = None

    def theta_norms(self, key: tuple | None = None) -> list[float]:
        """The global norms of the parameter tensors, cached while :meth:`theta_key` stays the
        same (an in-place change of a parameter between products recomputes them); ``key``:
        ``theta_key()`` if the caller has it.
        """
        key = self.theta_key() if key is None else key
        if any_rank(self._theta_norms is None or key != self._theta_key):
            self._theta_norms = tensor_norms([_dist.local(p).detach() for p in self.params])
            self._theta_key = key
        return self._theta_norms

    def theta_restored(self, key: tuple, new: tuple) -> None:
        """After a product that moved the parameters and copied them back bit for bit (their
        version counters moved on from ``key`` to ``new``, their values did not): a cache made
        for ``key`` holds for ``new``.
        """
        if self._theta_norms is not None and key == self._theta_key:
            self._theta_key = new

    # ------------------------------------------------------------------ the gradient
    def gradient(self) -> tuple[float, Vector]:
        """``(L(θ), ∇L(θ))`` (module docstring); the user's ``.grad`` are left as they were."""
        self.first_use()
        with self.stash_grads(), self.mode():
            rec = self.grad_pass(1.0, "gradient")
            N = self.normaliser(rec)
            g = self.read_grads()
            torch._foreach_mul_(g, self.grad_scale / N)
        lw = torch.stack([lb.double() * w for lb, w in zip(rec.losses, rec.weights)]).sum()
        loss = float(_dist.all_reduce_sum(lw.reshape(1))[0]) / N
        self.check_finite(g, what="gradient")
        return loss, g


def any_rank(flag: bool) -> bool:
    """``flag`` on any rank (one small all-reduce under ``torchrun``): a decision that leads to
    a collective (a norm, a gradient pass) must be the same on every rank.

    >>> any_rank(False)
    False
    """
    if _dist.world_size() == 1:
        return bool(flag)
    return bool(_dist.all_reduce_max(torch.tensor([1.0 if flag else 0.0]))[0] > 0)


def check_losses(losses, where: str) -> None:
    """Raise ``FloatingPointError`` naming the first batch whose loss is not finite."""
    L = torch.stack([lb.detach().double().reshape(()) for lb in losses])
    if not bool(torch.isfinite(L).all()):
        i = int((~torch.isfinite(L)).nonzero()[0, 0])
        raise FloatingPointError(
            f"the loss of batch {i} is {float(L[i])} {where}. Check that batch's data "
            "(empty targets, all labels -100?), the model's dtype (fp16 overflow?) "
            "and, for method='fd', the step eps."
        )


def _check_batches(batches):
    if batches is None:
        raise ValueError("batches is None: pass a list of batches or a DataLoader")
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(
            f"batches must be re-iterable (a list or a DataLoader), got {type(batches).__name__}"
        ) from None
    if it is batches:
        raise TypeError(
            "batches is a one-shot iterator (e.g. a generator): every matvec is a full pass "
            "over the data, so wrap it in list(...) or pass a DataLoader"
        )
    sampler = getattr(
        getattr(batches, "batch_sampler", None), "sampler", getattr(batches, "sampler", None)
    )
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise ValueError(
            "batches is a DataLoader with shuffle=True (a RandomSampler): every matvec must see "
            "the same data in the same order. Use shuffle=False or a list of batches."
        )
    try:
        next(iter(batches))
    except StopIteration:
        raise ValueError(
            "batches is empty: the Hessian of an average over no data is undefined. Check the "
            "data source (its path, the number of batches), or that the sequence length is not "
            "larger than the text."
        ) from None
    return batches


def _refuse_partly_sharded(names: list[str], params: list[torch.Tensor]) -> None:
    """Refuse parameters outside every FSDP2 module when others are sharded (world size > 1):
    FSDP2 does not reduce their gradients, so each rank would see only its own data's.
    """
    plain = [n for n, p in zip(names, params) if not _dist.is_sharded(p)]
    if plain:
        more = ", ..." if len(plain) > 3 else ""
        raise ValueError(
            f"the model is only partly sharded: {len(plain)} of the {len(params)} parameters "
            f"({', '.join(plain[:3])}{more}) belong to no fully_shard module, so FSDP2 does not "
            "reduce their gradients across ranks and their Hessian rows would hold one rank's "
            "data. Call fully_shard(model) on the root after your own blocks (it takes every "
            "parameter left), or shard with hessian_spectra.distributed.shard_model(model)."
        )


# torch.utils.checkpoint(use_reentrant=True) warns this and returns an output without a graph
_CHECKPOINT_CUT = "None of the inputs have requires_grad=True"


@contextlib.contextmanager
def _watch_checkpoint_cut():
    """Yield a list that holds ``True`` after the block if a reentrant checkpoint ran with no
    input that requires grad (its parameters then get no gradient; PyTorch only warns). Every
    other warning is passed on as it came.
    """
    cut: list[bool] = []
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", message=_CHECKPOINT_CUT)
            yield cut
    finally:
        for w in caught:
            if _CHECKPOINT_CUT in str(w.message):
                cut[:] = [True]
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def _checkpoint_cut_error(hidden: list[str]) -> ValueError:
    more = ", ..." if len(hidden) > 3 else ""
    return ValueError(
        "activation checkpointing with use_reentrant=True ran a checkpointed block none of whose "
        f"inputs requires grad, so its parameters ({', '.join(hidden[:3])}{more}; {len(hidden)} "
        "tensors) get no gradient and their Hessian rows would be zero (PyTorch only warns: "
        f"'{_CHECKPOINT_CUT}'). Checkpoint with use_reentrant=False, or make the block's inputs "
        "require grad (Hugging Face: model.enable_input_require_grads()); if these parameters "
        "are unused by the loss, leave them out of params."
    )


def _select_params(model, params):
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "the model has no parameters with requires_grad=True: "
                "call p.requires_grad_(True) on the ones to analyse"
            )
        return [n for n, _ in chosen], [p for _, p in chosen]
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    names = []
    for item in params:
        if isinstance(item, str):
            if item not in by_name:
                near = [n for n in by_name if item in n][:5] or difflib.get_close_matches(
                    item, list(by_name), n=5
                )
                hint = f" Did you mean one of {near}?" if near else ""
                raise ValueError(
                    f"no parameter named {item!r} in the model.{hint} The names are those of "
                    "model.named_parameters()."
                )
            names.append(item)
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError(
                    "a tensor in params is not a parameter of the model (a copy, or taken before "
                    "model.to(...)?): pass names from model.named_parameters() or the model's "
                    "own tensors"
                )
            names.append(by_id[id(item)])
        else:
            raise TypeError(f"params entries must be names or tensors, got {type(item).__name__}")
    if not names:
        raise ValueError("params is empty: name at least one parameter")
    if len(set(names)) != len(names):
        raise ValueError("params lists a parameter twice")
    for n in names:
        if not by_name[n].requires_grad:
            raise ValueError(
                f"parameter {n!r} has requires_grad=False: enable it with "
                f"model.get_parameter({n!r}).requires_grad_(True) or leave it out of params"
            )
    return names, [by_name[n] for n in names]
