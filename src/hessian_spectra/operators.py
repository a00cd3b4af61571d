"""Hessian-vector products of a dataset-averaged loss.

``HessianOperator`` applies ``H = d^2/dθ^2 L(θ)`` with ``L(θ) = sum_b w_b l_b(θ) / sum_b w_b``
(``l_b = loss_fn(model, batch_b)``, ``w_b`` its weight, 1 unless ``loss_fn`` returns one) to
vectors laid out like ``op.params``, by one of three methods:

- ``"fd"``: the central finite difference of gradients (FSHP eq. 1, Alg. 1)
  ``Hv ≈ (∇L(θ+εv) − ∇L(θ−εv)) / 2ε``: two gradient passes, the parameters perturbed in
  place (shard-local under FSDP2) and restored by copy from one snapshot, so they are
  bit-for-bit what they were, also when ``loss_fn`` raises or the run is interrupted.
  Both passes accumulate into the same ``.grad`` buffers (the second with the sign flipped),
  so peak memory is that of one gradient plus the snapshot.
- ``"exact"``: Pearlmutter's double backward (HessFormer): ``∇(∇l_b · v)`` per batch.
- ``"jvp"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``.

Default step (``eps=None``), from Thm 3.1 (ε* ∝ ε_mach^{1/3}) made scale- and
direction-aware: no parameter tensor moves by more than ``c = 0.1 · ε_mach^{1/3}`` of its own
norm (5e-4 in float32, 6e-7 in float64; ε_mach of the lowest-precision parameter dtype):

    ε = c / max_i ( ||v_i|| / ||θ_i|| )      over the tensors i with θ_i ≠ 0.

Why per tensor: Lanczos vectors after the first concentrate on a few sharp tensors (on
SmolLM2-135M: the layer-0 RMSNorm weights), and the best step along them is 1000× smaller
than along a random probe. The earlier global rule ``c ||θ|| / ||v||`` was right for a random
probe (relative error 3e-4) but had relative error ≈ 1 on the second and third Lanczos vectors
(measured on SmolLM2-135M, fp32, 64 tokens, against exact HVPs). With this rule the
relative error along the first five Lanczos vectors there was 1.1e-3, 2.6e-3, 3.2e-3, 4.6e-3,
3.0e-3 (steps 0.23 down to 1.4e-3).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass

import torch

from . import distributed as _dist
from .linop import DenseOperator, as_operator
from .vectors import Vector, check_vector, dot, norm, tensor_norms

__all__ = ["HessianOperator", "FDError", "default_eps_scale"]

METHODS = ("fd", "exact", "jvp")


def default_eps_scale(dtype: torch.dtype) -> float:
    """Relative FD step ``0.1 · ε_mach(dtype)^{1/3}`` (see the module docstring)."""
    return 0.1 * torch.finfo(dtype).eps ** (1.0 / 3.0)


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


class _LossModule(torch.nn.Module):
    """Wraps (model, loss_fn) so torch.func.functional_call can swap the parameters."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _sdpa_math():
    """Force the math SDPA backend: fused CPU/flash kernels have no double backward / forward AD."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except Exception:  # pragma: no cover - torch without torch.nn.attention
        return contextlib.nullcontext()


def _same_batch(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_batch(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_batch(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return a is b


class HessianOperator:
    """The Hessian of a dataset-averaged loss as a linear operator on parameter-space vectors.

    Args:
        model: a ``torch.nn.Module``, plain or sharded with FSDP2 ``fully_shard``.
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss tensor, or
            ``(loss, weight)`` with ``weight`` e.g. the number of target tokens.
        batches: a re-iterable of batches (list, DataLoader without shuffling). Every matvec is a
            full pass: ``sum_b w_b H_b v / sum_b w_b``.
        method: ``"fd"``, ``"exact"`` or ``"jvp"`` (module docstring).
        eps: the FD step: the parameters are moved to ``θ ± eps·v``. ``None``: the scale-aware
            default ``0.1 ε_mach^{1/3} ||θ|| / ||v||``.
        params: a subset of parameters (names or tensors); default all with ``requires_grad``.
        train_mode: analyse the training-mode objective (dropout etc. active). Default False:
            the model is put in eval mode for each call and its modes restored afterwards.
        check_determinism: on first use, check that two passes see the same first batch and two
            evaluations of its loss agree; raise if not (dropout, shuffling, batch-norm updates).
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
        train_mode: bool = False,
        check_determinism: bool = True,
        allow_low_precision_fd: bool = False,
        progress: bool = False,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch)")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive finite number or None, got {eps!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = self._check_batches(batches)
        self.method = method
        self.eps = None if eps is None else float(eps)
        self.train_mode = bool(train_mode)
        self.progress = progress
        self._check_determinism = check_determinism
        self._checked = False

        self.param_names, self.params = self._select_params(params)
        self.sharded = any(_dist.is_sharded(p) for p in self.params)
        if _dist.world_size() > 1 and not self.sharded:
            raise ValueError(
                f"running with world size {_dist.world_size()} but the model's parameters are not "
                "sharded: shard it with hessian_spectra.shard_model(model) (FSDP2), or run in one process"
            )
        if self.sharded and method != "fd":
            raise NotImplementedError(
                f"method={method!r} is not available on an FSDP2-sharded model: FSDP2 does not "
                "support double backward or forward AD through its hooks (PyTorch issue 172543). "
                "Use method='fd' (shard-local finite differences), or run unsharded."
            )
        self.num_params = sum(p.numel() for p in self.params)  # DTensor.numel() is global
        dtypes = {p.dtype for p in self.params}
        self.param_dtype = min(dtypes, key=lambda d: torch.finfo(d).bits)
        self.vector_dtype = torch.float64 if dtypes == {torch.float64} else torch.float32
        if method == "fd" and torch.finfo(self.param_dtype).bits < 32 and not allow_low_precision_fd:
            raise ValueError(
                f"method='fd' with {self.param_dtype} parameters: finite differences in 16-bit "
                "arithmetic have relative error ≥ 1 (measured on SmolLM2-135M at every ε tried). "
                "Load the model in float32 (--dtype float32), use method='exact', or pass "
                "allow_low_precision_fd=True if you accept that error."
            )
        if method == "fd" and torch.finfo(self.param_dtype).bits < 32:
            warnings.warn(
                f"finite-difference HVPs with {self.param_dtype} parameters are dominated by "
                "rounding error (relative error ≥ 1 measured); prefer float32",
                stacklevel=2,
            )
        self._theta_norms = None
        # FSDP2 divides reduced gradients by the data-parallel size (or a user-set factor);
        # multiplying back gives the sum over ranks, normalised by the global weight below.
        self._grad_scale = _dist.gradient_scale(model) if self.sharded else 1.0
        self.stats = {"matvecs": 0, "matvec_seconds": 0.0, "gradients": 0, "gradient_seconds": 0.0}

    # ------------------------------------------------------------------ validation
    @staticmethod
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
        sampler = getattr(getattr(batches, "batch_sampler", None), "sampler", getattr(batches, "sampler", None))
        if isinstance(sampler, torch.utils.data.RandomSampler):
            raise ValueError(
                "batches is a DataLoader with shuffle=True (a RandomSampler): every matvec must see "
                "the same data in the same order. Use shuffle=False or a list of batches."
            )
        try:
            next(iter(batches))
        except StopIteration:
            raise ValueError(
                "batches is empty: the Hessian of an average over no data is undefined. "
                "Check the data path / --num-batches, or that seq-len is not larger than the text."
            ) from None
        return batches

    def _select_params(self, params):
        named = list(self.model.named_parameters())
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
                    import difflib

                    near = [n for n in by_name if item in n][:5] or difflib.get_close_matches(item, list(by_name), n=5)
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
                        "model.to(...)?): pass names from model.named_parameters() or the model's own tensors"
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

    # ------------------------------------------------------------------ plumbing
    @property
    def shape(self):
        return (self.num_params, self.num_params)

    def __matmul__(self, v: Vector) -> Vector:
        return self.matvec(v)

    def __repr__(self):
        return (
            f"HessianOperator(method={self.method!r}, num_params={self.num_params}, "
            f"tensors={len(self.params)}, eps={self.eps}, train_mode={self.train_mode})"
        )

    @contextlib.contextmanager
    def _mode(self):
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.train_mode)
        try:
            yield
        finally:
            for m, t in modes:
                m.training = t

    def _iter_batches(self, desc: str = ""):
        if self.progress and _dist.is_rank0():
            from tqdm.auto import tqdm

            try:
                total = len(self.batches)
            except TypeError:
                total = None
            return enumerate(tqdm(self.batches, total=total, desc=desc, leave=False, unit="batch"))
        return enumerate(self.batches)

    def _forward(self, batch, i):
        return _normalise(self.loss_fn(self.model, batch), i)

    def _zero_like_local(self):
        return [torch.zeros_like(_dist.local(p), dtype=self.vector_dtype) for p in self.params]

    @staticmethod
    def _check_losses(losses, where: str):
        L = torch.stack([l.detach().double().reshape(()) for l in losses])
        if not bool(torch.isfinite(L).all()):
            i = int((~torch.isfinite(L)).nonzero()[0, 0])
            raise FloatingPointError(
                f"the loss of batch {i} is {float(L[i])} {where}. Check that batch's data "
                "(empty targets, all labels -100?), the model's dtype (fp16 overflow?) "
                "and, for method='fd', the step eps."
            )

    def _total_weight(self, weights):
        W = torch.stack(weights).sum()
        W = float(_dist.all_reduce_sum(W.reshape(1))[0])
        if not (W > 0 and math.isfinite(W)):
            raise ValueError(f"the batch weights sum to {W}; they must be positive (e.g. token counts)")
        return W

    def _grad_pass(self, sign: float, desc: str):
        """Accumulate ``sign * sum_b w_b ∇l_b`` into ``p.grad``; return (losses, weights)."""
        losses, weights = [], []
        for i, batch in self._iter_batches(desc):
            loss, w = self._forward(batch, i)
            (loss * (w.to(loss.dtype) * sign)).backward()
            losses.append(loss.detach())
            weights.append(w)
        return losses, weights

    def _read_grads(self) -> Vector:
        out = []
        for p in self.params:
            g = p.grad
            if g is None:
                out.append(torch.zeros_like(_dist.local(p), dtype=self.vector_dtype))
            else:
                out.append(_dist.local(g).detach().to(self.vector_dtype))
        return out

    @contextlib.contextmanager
    def _stash_grads(self):
        """Set every ``.grad`` to None for our passes and give the user's back afterwards."""
        saved = [p.grad for p in self.params]
        others = [(p, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        for p in self.params:
            p.grad = None
        for p, _ in others:  # else backward would accumulate into the user's tensors in place
            p.grad = None
        try:
            yield
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g
            for p, g in others:  # parameters outside op.params got gradients too: put theirs back
                p.grad = g
            chosen = {id(p) for p in self.params}
            kept = {id(p) for p, _ in others}
            for p in self.model.parameters():
                if id(p) not in chosen and id(p) not in kept:
                    p.grad = None

    def _first_use(self):
        if not self._checked and self.sharded:
            self._check_same_num_batches()
        if self._checked or not self._check_determinism:
            self._checked = True
            return
        b1 = next(iter(self.batches))
        b2 = next(iter(self.batches))
        if not _same_batch(b1, b2):
            raise ValueError(
                "batches yields different data on each pass (a DataLoader with shuffle=True or a "
                "random sampler?). Every matvec must see the same data: use shuffle=False or a list."
            )
        bufs = [(n, b.detach().clone()) for n, b in self.model.named_buffers()]
        with torch.no_grad(), self._mode():
            l1, _ = self._forward(b1, 0)
            l2, _ = self._forward(b1, 0)
        changed = [n for (n, before), (_, b) in zip(bufs, self.model.named_buffers()) if not torch.equal(before, b)]
        if changed:
            with torch.no_grad():
                for (n, before), (_, b) in zip(bufs, self.model.named_buffers()):
                    b.copy_(before)
            raise ValueError(
                f"evaluating the loss changed model buffers {changed[:3]} (batch-norm running "
                "statistics in train mode?). The operator would change with every pass: use eval "
                "mode (train_mode=False) or freeze those statistics."
            )
        a, b = float(l1), float(l2)
        rtol = 1e-5 if torch.finfo(self.param_dtype).bits >= 32 else 1e-2
        if not (math.isfinite(a) and math.isfinite(b)):
            self._check_losses([l1], "at the current parameters")
        if abs(a - b) > rtol * max(abs(a), abs(b), 1e-30):
            mode = "train" if self.train_mode else "eval"
            raise ValueError(
                f"loss_fn is not deterministic: two evaluations of batch 0 in {mode} mode gave "
                f"{a!r} and {b!r}. Dropout or other randomness would make every HVP noise: use "
                "eval mode (train_mode=False, the default) or set dropout probabilities to 0."
            )
        self._checked = True

    def _check_same_num_batches(self):
        """Under FSDP2 every rank must run the same number of forward/backward passes (each one
        all-gathers and reduce-scatters with all ranks): raise on every rank, not hang, if not."""
        try:
            n = len(self.batches)
        except TypeError:
            n = sum(1 for _ in self.batches)
        mm = _dist.all_reduce_max(torch.tensor([n, -n], dtype=torch.float64))
        hi, lo = int(mm[0]), -int(mm[1])
        if hi != lo:
            raise ValueError(
                f"rank {_dist.rank()} has {n} batches, but the ranks have between {lo} and {hi}: "
                "under FSDP2 every rank must run the same number of batches (each forward/backward "
                "is a collective). Give each rank an equal share of batches; unequal numbers of "
                "target tokens (labels -100) are fine, the global token weights are all-reduced."
            )

    def _theta_norms_value(self) -> list[float]:
        if self._theta_norms is None:
            self._theta_norms = tensor_norms([_dist.local(p).detach() for p in self.params])
        return self._theta_norms

    def eps_for(self, v: Vector) -> float:
        """The FD step used for direction ``v`` (``self.eps``, or the default rule)."""
        if self.eps is not None:
            return self.eps
        vn = norm(v)
        if vn == 0:
            return 0.0
        c = default_eps_scale(self.param_dtype)
        ratios = [a / b for a, b in zip(tensor_norms(v), self._theta_norms_value()) if b > 0]
        s = max(ratios, default=0.0)
        return c / s if s > 0 else c / vn  # v lives only on zero tensors: treat them as of norm 1

    # ------------------------------------------------------------------ public API
    def matvec(self, v: Vector, *, method: str | None = None, eps: float | None = None) -> Vector:
        """``H v`` (a new vector, ``self.vector_dtype``). ``method``/``eps`` override the defaults."""
        v = check_vector(v, self.params, "v")
        method = method or self.method
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if self.sharded and method != "fd":
            raise NotImplementedError(
                f"method={method!r} is not available on an FSDP2-sharded model (no double backward / "
                "forward AD through FSDP2's hooks, PyTorch issue 172543); use method='fd'"
            )
        self._first_use()
        t0 = time.perf_counter()
        if method == "fd":
            hv = self._matvec_fd(v, eps if eps is not None else self.eps_for(v))
        elif method == "exact":
            hv = self._matvec_exact(v)
        else:
            hv = self._matvec_jvp(v)
        self._check_finite(hv)
        self.stats["matvecs"] += 1
        self.stats["matvec_seconds"] += time.perf_counter() - t0
        return hv

    def gradient(self) -> tuple[float, Vector]:
        """Dataset-averaged ``(loss, ∇L)``; the user's ``.grad`` are left as they were."""
        self._first_use()
        t0 = time.perf_counter()
        with self._stash_grads(), self._mode():
            losses, weights = self._grad_pass(1.0, "gradient")
            self._check_losses(losses, "at the current parameters")
            W = self._total_weight(weights)
            g = self._read_grads()
            torch._foreach_mul_(g, self._grad_scale / W)
        lw = torch.stack([l.double() * w for l, w in zip(losses, weights)]).sum()
        loss = float(_dist.all_reduce_sum(lw.reshape(1))[0]) / W
        self._check_finite(g, what="gradient")
        self.stats["gradients"] += 1
        self.stats["gradient_seconds"] += time.perf_counter() - t0
        return loss, g

    def fd_error(self, v: Vector, eps: float | None = None, reference: str = "exact") -> FDError:
        """Measure the FD error along ``v`` against an exact HVP or a Richardson estimate."""
        v = check_vector(v, self.params, "v")
        e = eps if eps is not None else self.eps_for(v)
        h = self.matvec(v, method="fd", eps=e)
        if reference == "exact":
            ref = self.matvec(v, method="exact")
        elif reference == "richardson":
            h2 = self.matvec(v, method="fd", eps=e / 2)
            ref = [(4 * b - a) / 3 for a, b in zip(h, h2)]
        else:
            raise ValueError(f"reference must be 'exact' or 'richardson', got {reference!r}")
        diff = [a - b for a, b in zip(h, ref)]
        rn, dn = norm(ref), norm(diff)
        return FDError(eps=e, rel_error=dn / rn if rn > 0 else float("inf"), abs_error=dn, ref_norm=rn, reference=reference)

    def eps_sweep(self, eps_values, v: Vector | None = None, *, seed: int = 0, reference: str = "exact") -> list[FDError]:
        """``fd_error`` at each step in ``eps_values`` along one direction (default: a unit
        Rademacher probe from ``seed``); the reference HVP is computed once."""
        from .vectors import random_probe, scale

        if v is None:
            v = random_probe(self, seed, dtype=self.vector_dtype)
            scale(1.0 / norm(v), v)
        v = check_vector(v, self.params, "v")
        eps_values = [float(e) for e in eps_values]
        if not eps_values or any(not (e > 0 and math.isfinite(e)) for e in eps_values):
            raise ValueError(f"eps_values must be positive finite numbers, got {eps_values}")
        if reference == "exact":
            ref = self.matvec(v, method="exact")
        out = []
        for e in eps_values:
            if reference == "exact":
                h = self.matvec(v, method="fd", eps=e)
                diff = [a - b for a, b in zip(h, ref)]
                rn, dn = norm(ref), norm(diff)
                out.append(FDError(eps=e, rel_error=dn / rn if rn > 0 else float("inf"), abs_error=dn,
                                   ref_norm=rn, reference=reference))
            else:
                out.append(self.fd_error(v, eps=e, reference=reference))
        return out

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` on flat float64 numpy vectors (one process)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        if self.sharded:
            raise NotImplementedError("to_scipy() needs the whole vector in one process; the model is sharded")
        shapes = [p.shape for p in self.params]
        sizes = [p.numel() for p in self.params]

        def mv(x):
            x = np.asarray(x, dtype=np.float64).reshape(-1)
            parts = torch.from_numpy(x).split(sizes)
            v = [t.reshape(s).to(device=p.device, dtype=self.vector_dtype) for t, s, p in zip(parts, shapes, self.params)]
            hv = self.matvec(v)
            return torch.cat([t.reshape(-1).double().cpu() for t in hv]).numpy()

        return LinearOperator((self.num_params, self.num_params), matvec=mv, rmatvec=mv, dtype=np.float64)

    # ------------------------------------------------------------------ methods
    def _check_finite(self, hv: Vector, what: str = "HVP"):
        dev = hv[0].device if hv else "cpu"
        # Screen with plain sums (one fast pass; any NaN/inf entry makes its sum non-finite) and
        # count entry by entry only where a sum is not finite (finite entries can overflow a sum).
        # isfinite on every entry cost 0.85 s of a 4.6 s fd HVP on SmolLM2-135M (CPU).
        sums = [t.sum() for t in hv]
        bad = torch.zeros((), dtype=torch.float64, device=dev)
        if sums and not bool(torch.isfinite(torch.stack([s.to(dev) for s in sums])).all()):
            for t in hv:
                bad = bad + (~torch.isfinite(t)).sum().to(bad.device, torch.float64)
        if float(_dist.all_reduce_sum(bad.reshape(1))[0]) > 0:
            culprit = self._find_bad_batch()
            where = f" (first from batch {culprit})" if culprit is not None else ""
            raise FloatingPointError(
                f"the {what} has NaN/inf entries{where}. Check that batch, the model's dtype "
                "(fp16 overflow?), and for method='fd' the step eps."
            )

    def _find_bad_batch(self):
        """Diagnose a non-finite result: the first batch whose own gradient is not finite."""
        if self.sharded:
            return None  # per-batch collectives would need every rank in step; skip the diagnosis
        with self._stash_grads(), self._mode():
            for i, batch in enumerate(self.batches):
                for p in self.params:
                    p.grad = None
                loss, _ = self._forward(batch, i)
                if not torch.isfinite(loss):
                    return i
                loss.backward()
                if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.params):
                    return i
        return None

    def _matvec_fd(self, v: Vector, eps: float) -> Vector:
        if eps == 0.0:
            return self._zero_like_local()
        locs = [_dist.local(p) for p in self.params]
        vs = [t.to(p.dtype) for t, p in zip(v, locs)]
        with torch.no_grad():
            snapshot = [p.detach().clone() for p in locs]
        try:
            with self._stash_grads(), self._mode():
                # FSDP2 may still hold gathered copies (root after a no_grad forward, blocks with
                # reshard_after_forward=False) that the next forward would reuse unperturbed.
                _dist.reshard(self.model)
                with torch.no_grad():
                    torch._foreach_add_(locs, vs, alpha=eps)
                lp, wp = self._grad_pass(1.0, "HVP θ+εv")
                _dist.reshard(self.model)
                with torch.no_grad():
                    torch._foreach_copy_(locs, snapshot)
                    torch._foreach_add_(locs, vs, alpha=-eps)
                lm, wm = self._grad_pass(-1.0, "HVP θ-εv")
                self._check_losses(lp, "at θ+εv")
                self._check_losses(lm, "at θ-εv")
                W = self._total_weight(wp)
                if abs(self._total_weight(wm) - W) > 1e-9 * W:
                    raise ValueError("the batch weights differ between the two FD passes: the data changed between passes")
                hv = self._read_grads()
                torch._foreach_mul_(hv, self._grad_scale / (2.0 * eps * W))
                return hv
        finally:
            _dist.reshard(self.model)  # no gathered copy of perturbed parameters survives
            with torch.no_grad():
                torch._foreach_copy_(locs, snapshot)

    def _matvec_exact(self, v: Vector) -> Vector:
        out = self._zero_like_local()
        weights = []
        losses = []
        with self._mode(), _sdpa_math(), self._explain_double_backward("exact"):
            for i, batch in self._iter_batches("HVP exact"):
                loss, w = self._forward(batch, i)
                g = torch.autograd.grad(loss * w.to(loss.dtype), self.params, create_graph=True, allow_unused=True)
                if all(gi is None for gi in g):
                    raise ValueError("the loss does not depend on any of op.params")
                # ∇(g · v) as a vector-Jacobian product with grad_outputs=v: no elementwise g*v
                # products and their backward (~15% of an exact HVP on SmolLM2-135M, CPU).
                # A g_i that does not require grad is constant in θ (its rows of H are 0).
                pairs = [(gi, vi.to(gi.dtype)) for gi, vi in zip(g, v) if gi is not None and gi.requires_grad]
                hv = (
                    torch.autograd.grad([gi for gi, _ in pairs], self.params, grad_outputs=[vi for _, vi in pairs],
                                        allow_unused=True)
                    if pairs else [None] * len(self.params)
                )
                for o, h in zip(out, hv):
                    if h is not None:
                        o.add_(h.detach().to(o.dtype))
                losses.append(loss.detach())
                weights.append(w)
        self._check_losses(losses, "at the current parameters")
        torch._foreach_mul_(out, 1.0 / self._total_weight(weights))
        return out

    def _matvec_jvp(self, v: Vector) -> Vector:
        from torch.func import functional_call, grad, jvp

        wrapper = _LossModule(self.model, self.loss_fn)
        sel = {"model." + n: p for n, p in zip(self.param_names, self.params)}
        consts = {n: t.detach() for n, t in wrapper.named_parameters() if n not in sel}
        consts.update({n: b for n, b in wrapper.named_buffers()})
        primals = {n: p.detach() for n, p in sel.items()}
        tangents = {n: t.to(p.dtype) for (n, p), t in zip(sel.items(), v)}

        def weighted_loss(pd, batch, i):
            out = functional_call(wrapper, {**consts, **pd}, (batch,))
            loss, w = _normalise(out, i)
            return loss * w.to(loss.dtype), (loss.detach(), w)

        out = self._zero_like_local()
        weights, losses = [], []
        with self._mode(), _sdpa_math(), self._explain_double_backward("jvp"):
            for i, batch in self._iter_batches("HVP jvp"):
                g_fn = grad(lambda pd: weighted_loss(pd, batch, i), has_aux=True)
                _, hv, (loss, w) = jvp(g_fn, (primals,), (tangents,), has_aux=True)
                for o, n in zip(out, sel):
                    o.add_(hv[n].detach().to(o.dtype))
                losses.append(loss)
                weights.append(w)
        self._check_losses(losses, "at the current parameters")
        torch._foreach_mul_(out, 1.0 / self._total_weight(weights))
        return out

    @contextlib.contextmanager
    def _explain_double_backward(self, method: str):
        try:
            yield
        except RuntimeError as e:
            msg = str(e)
            if method == "jvp" and "ZeroTensors are immutable" in msg:
                # torch.func forward-over-reverse bug in some backward formulas (e.g. F.mse_loss)
                raise RuntimeError(
                    "method='jvp' (torch.func forward-over-reverse) failed inside PyTorch on an op of "
                    f"this model or loss ({msg.splitlines()[0]}; F.mse_loss triggers it on torch 2.13). "
                    "Use method='exact' (double backward) or method='fd', or write that loss by hand, "
                    "e.g. ((out - y) ** 2).mean() instead of F.mse_loss."
                ) from e
            keys = ("derivative for", "not implemented", "forward AD", "double backward", "_efficient_attention", "flash")
            if any(k in msg for k in keys):
                other = "'exact' or 'fd'" if method == "jvp" else "'fd'"
                raise RuntimeError(
                    f"method={method!r} needs second derivatives through every op of the model, "
                    f"and one op has none: {msg.splitlines()[0]}. For Hugging Face models load with "
                    f"attn_implementation='eager' (or --attn-implementation eager), or use method={other}."
                ) from e
            raise


def _normalise(out, i):
    """``(loss, weight)`` from what ``loss_fn`` returned for batch ``i``, or a clear error."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise TypeError(
                f"loss_fn returned a {type(out).__name__} of length {len(out)} for batch {i}; "
                "expected a scalar loss or (loss, weight)"
            )
        loss, w = out
    else:
        loss, w = out, 1.0
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn returned {type(loss).__name__} for batch {i}; expected a scalar tensor")
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn returned a loss of shape {tuple(loss.shape)} for batch {i}; it must be a "
            "scalar (reduce it with .mean() or .sum() and return the weight separately)"
        )
    w = torch.as_tensor(w, dtype=torch.float64, device=loss.device).reshape(())
    return loss.reshape(()), w
