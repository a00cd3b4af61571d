"""FSDP2 policy: which modules to shard, sharding a model (after checking that every rank holds
the same weights), freeing gathered parameters, and FSDP2's gradient scaling.

Everything here is a no-op without a process group:

>>> import torch
>>> m = torch.nn.Linear(2, 3)
>>> shard_model(m) is m, gradient_scale(m)
(True, 1.0)
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from . import _private
from .collectives import _backend_device, differing_entries
from .process import is_initialized, is_rank0, world_size

__all__ = ["find_blocks", "gradient_scale", "reshard", "shard_model"]

log = logging.getLogger("hessian_spectra.distributed")

_CHUNK = 1 << 22  # elements per step of the fingerprint (32 MiB of int64 at a time)
_POSITION_MOD = 65521  # positions weigh 1..65521 in the second sum (a prime: no short period)
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def find_blocks(model: torch.nn.Module, blocks=None) -> list[torch.nn.Module]:
    """The modules to shard one by one (each gets its own all-gather / reduce-scatter).

    ``blocks``:
      - ``None``: automatic. A Hugging Face model's ``_no_split_modules`` classes (its decoder
        layers) if it has any; else the children of every outermost ``nn.ModuleList`` whose
        children hold parameters (``model.model.layers``, ``transformer.h``, ``blocks``, ...).
      - a class name or a list of class names: every module of those classes (outermost only).
      - a list of modules: those.

    >>> import torch
    >>> net = torch.nn.Module()
    >>> net.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    >>> len(find_blocks(net)), find_blocks(net, "Linear") == list(net.blocks)
    (2, True)
    """
    if blocks is not None and not isinstance(blocks, (str, Sequence)):
        raise TypeError(
            "blocks must be None, a class name, a list of class names or a list of modules; "
            f"got {type(blocks).__name__}"
        )
    if isinstance(blocks, str):
        blocks = [blocks]
    if blocks is not None and all(isinstance(b, torch.nn.Module) for b in blocks):
        owned = {id(m) for m in model.modules()}
        stray = [type(b).__name__ for b in blocks if id(b) not in owned]
        if stray:
            raise ValueError(f"blocks contains modules that are not part of the model: {stray[:3]}")
        return list(blocks)
    if blocks is not None:
        if not all(isinstance(b, str) for b in blocks):
            raise TypeError("blocks must be all class names (str) or all modules, not a mix")
        names = set(blocks)
        found = _outermost(model, lambda m: type(m).__name__ in names)
        if not found:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                f"no module of class {sorted(names)} in the model; classes present: {present[:20]}"
            )
        return found
    hf = getattr(model, "_no_split_modules", None)
    if hf:
        found = _outermost(model, lambda m: type(m).__name__ in set(hf))
        if found:
            return found
    found = []
    for ml in _outermost(model, lambda m: isinstance(m, torch.nn.ModuleList)):
        found.extend(c for c in ml if any(True for _ in c.parameters()))
    return found


def _outermost(model: torch.nn.Module, pred) -> list[torch.nn.Module]:
    out = []

    def visit(m):
        for c in m.children():
            if pred(c):
                out.append(c)
            else:
                visit(c)

    if pred(model):
        return []  # the root is sharded as the root anyway
    visit(model)
    return out


# ---------------------------------------------------------------------- same weights on all ranks
def _named_states(model: torch.nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """``(kind, name, tensor)`` for every parameter and buffer (shared ones once), except
    DTensors: those are sharded already, and each rank rightly holds a different piece.
    """
    out = [("parameter", n, p) for n, p in model.named_parameters()]
    out += [("buffer", n, b) for n, b in model.named_buffers()]
    return [s for s in out if not isinstance(s[2], _private.DTensor)]


def _layout_code(states) -> int:
    """A CRC-32 of the names, kinds, shapes and dtypes (the same in every process)."""
    text = "|".join(f"{k}:{n}:{tuple(t.shape)}:{t.dtype}" for k, n, t in states)
    return zlib.crc32(text.encode("utf-8"))


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two int64 numbers that change when any bit of ``t`` changes (or entries swap places).

    The tensor's bits, read as integers ``x_i`` of its element size, give ``sum_i x_i`` and
    ``sum_i x_i * (1 + i mod 65521)`` in wrapping int64 arithmetic: exact, so independent of
    the order of summation (threads, devices), and computed on ``t``'s own device in chunks.
    A change of one element always changes the first sum; ``[0, 0]`` for a meta tensor.

    >>> import torch
    >>> a = torch.tensor([1.0, 2.0, 3.0])
    >>> torch.equal(fingerprint(a), fingerprint(a.clone()))
    True
    >>> torch.equal(fingerprint(a), fingerprint(a.flip(0)))   # same values, other places
    False
    """
    out = torch.zeros(2, dtype=torch.int64)
    if t.device.type == "meta" or t.numel() == 0:
        return out
    x = t.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    x = x.contiguous().reshape(-1)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    words = x.view(_WORDS[x.element_size()])
    s = torch.zeros(2, dtype=torch.int64, device=x.device)
    for start in range(0, words.numel(), _CHUNK):
        w = words[start : start + _CHUNK].to(torch.int64)
        pos = torch.arange(start, start + w.numel(), device=w.device, dtype=torch.int64)
        s[0] += w.sum()
        s[1] += (w * (pos % _POSITION_MOD + 1)).sum()
    return s.cpu()


def _refuse_different_layout(states) -> None:
    """One all-reduce of two numbers: the same ValueError on every rank unless all ranks built
    parameters and buffers of the same names, shapes and dtypes.
    """
    code, n = _layout_code(states), len(states)
    if differing_entries(torch.tensor([code, n])).numel():
        raise ValueError(
            "shard_model: the ranks built different models (the names, shapes or dtypes of the "
            f"parameters and buffers differ; this rank has {n} tensors). Build the same model "
            "(same configuration and dtype) on every rank."
        )


def _broadcast_from_rank0(states) -> None:
    """Copy rank 0's value of every parameter and buffer into this rank's, in place."""
    dev = _backend_device()
    with torch.no_grad():
        for _, _, t in states:
            if t.device.type == "meta":
                continue
            buf = t.detach().to(dev, copy=True).contiguous()
            wire = buf.view(torch.uint8) if buf.dtype == torch.bool else buf
            dist.broadcast(wire, src=0)
            t.copy_(buf)


def _same_weights_on_all_ranks(model: torch.nn.Module, broadcast_from_rank0: bool) -> None:
    """Refuse (or, with ``broadcast_from_rank0``, repair) weights that differ between ranks."""
    if world_size() == 1:
        return  # one rank: nothing to compare with (and no time spent on fingerprints)
    states = _named_states(model)
    _refuse_different_layout(states)
    if not states:
        return
    prints = torch.cat([fingerprint(t) for _, _, t in states])  # (2 * num_tensors,)
    bad = sorted({int(i) // 2 for i in differing_entries(prints)})
    if not bad:
        return
    kind, name, _ = states[bad[0]]
    more = f" (and {len(bad) - 1} more of the {len(states)} tensors)" if len(bad) > 1 else ""
    if not broadcast_from_rank0:
        raise ValueError(
            f"shard_model: the model's weights differ between ranks: {kind} {name!r}{more} is "
            "not the same on every rank, so FSDP2 would shard a mix of different models. "
            "Build the model identically on every rank (seed it the same way before creating "
            "it, e.g. torch.manual_seed(0), or load it from one checkpoint), or pass "
            "broadcast_from_rank0=True to copy rank 0's weights to every rank."
        )
    _broadcast_from_rank0(states)
    if is_rank0():
        log.warning(
            "shard_model: the weights differed between ranks (%s %r%s); copied rank 0's "
            "parameters and buffers to every rank (broadcast_from_rank0=True)",
            kind,
            name,
            more,
        )


def shard_model(
    model: torch.nn.Module,
    blocks=None,
    *,
    reshard_after_forward: bool = True,
    mesh=None,
    mp_policy=None,
    broadcast_from_rank0: bool = False,
) -> torch.nn.Module:
    """Shard ``model`` with FSDP2: ``fully_shard`` on each block, then on the root.

    Does nothing (returns ``model``) without a process group. Under ``torchrun`` (also with one
    process) every rank then holds only its ``Shard(0)`` piece of each parameter; the model is
    moved to this rank's device (``cuda:LOCAL_RANK`` with NCCL, CPU with gloo), parameters on
    other devices included. Frozen parameters (``requires_grad=False``) are sharded too.

    Before sharding, every rank must hold the same weights: FSDP2 would otherwise build one
    model out of rows of several (a factory that seeds per rank, or not at all). Each
    parameter's and buffer's bits are summed exactly on its device (:func:`fingerprint`) and
    compared across ranks in one all-reduce (after one more of two numbers that checks the
    names, shapes and dtypes). If they differ, every rank raises the same ``ValueError`` naming
    the first differing tensor.

    Args:
        blocks: see :func:`find_blocks` (default: transformer blocks found automatically).
        reshard_after_forward: free each block's gathered parameters after its forward (memory:
            one gathered block at a time) at the price of a second all-gather in backward.
        mesh: a ``DeviceMesh`` of all ranks: 1-D (FSDP, the default: all ranks) or 2-D
            ``(replicate, shard)`` (HSDP: rows split over the shard dimension, copied over the
            replicate one; a shard size of 1 is plain data parallelism). Build one with
            :func:`~hessian_spectra.distributed.make_mesh`, or call
            :func:`~hessian_spectra.distributed.parallelize`.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` (default: none; FD HVPs want fp32).
        broadcast_from_rank0: when the weights differ between ranks, copy rank 0's parameters
            and buffers to every rank (and log a warning on logger
            ``hessian_spectra.distributed``) instead of raising.
    """
    if not is_initialized():
        return model
    fully_shard, FSDPModule = _private.fsdp_api()
    if isinstance(model, FSDPModule):
        raise ValueError(  # noqa: TRY004 - a wrong value of the right type
            "the model is already sharded with fully_shard; pass it to HessianOperator as is"
        )
    if mesh is not None and (mesh.ndim > 2 or mesh.size() != world_size()):
        raise ValueError(
            f"shard_model: mesh of shape {tuple(mesh.shape)} for {world_size()} ranks; pass a "
            "1-D mesh (FSDP) or a 2-D (replicate, shard) mesh (HSDP) of all ranks"
        )
    _same_weights_on_all_ranks(model, broadcast_from_rank0)
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        dev_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(dev_type, (world_size(),))
    kw = {"mesh": mesh}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for b in find_blocks(model, blocks):
        fully_shard(b, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered (unsharded) FSDP2 parameter of ``model`` (no-op when not sharded).

    After a forward without backward (e.g. under ``no_grad``), FSDP2 keeps the root's gathered
    parameters (and every block's with ``reshard_after_forward=False``) and would reuse them in
    the next forward *without* gathering the shards again. Call this before changing the local
    shards in place (the FD HVP does) so that the next forward sees the change.
    """
    if not is_initialized():
        return
    _, FSDPModule = _private.fsdp_api()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def gradient_scale(model: torch.nn.Module) -> float:
    """The factor that turns FSDP2's reduced gradient into the *sum* over ranks.

    FSDP2 divides the reduce-scattered gradient by its data-parallel size (the mean over ranks)
    unless ``set_gradient_divide_factor(f)`` chose ``f``. Returns that divisor (1.0 when the
    model is not sharded). Raises if the model's FSDP groups disagree. Read when the operator is
    built: change the factor before building it.

    FSDP2 has no public getter for the factor: it is read from FSDP2's private state
    (``_private.gradient_divide_factors``). If a PyTorch release changes that layout, the
    world size (FSDP2's default) is returned with a ``RuntimeWarning`` saying so.
    """
    if not is_initialized():
        return 1.0
    _, FSDPModule = _private.fsdp_api()
    factors = set()
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        found = _private.gradient_divide_factors(m)
        if found is None:
            warnings.warn(
                "could not read FSDP2's gradient divide factor (its private state has another "
                f"layout in torch {torch.__version__}): assuming FSDP2's default, the world "
                f"size {world_size()}. If you called set_gradient_divide_factor(f), products "
                f"are off by f / {world_size()}; please report this torch version.",
                RuntimeWarning,
                stacklevel=2,
            )
            return float(world_size())
        factors.update(found)
    if not factors:
        return 1.0
    if len(factors) > 1:
        raise ValueError(
            f"the model's FSDP2 modules divide gradients by different factors {sorted(factors)}: "
            "the operator needs one. set_gradient_divide_factor(f) applies to one module's own "
            "parameters; call it on every FSDP module (for m in model.modules(): if isinstance(m, "
            "FSDPModule): m.set_gradient_divide_factor(f))"
        )
    return factors.pop()
