"""Small collectives over all ranks: sums and maxima of small tensors, agreement checks, objects.

Each is the identity in one process. A reduction copies its (small) tensor to the backend's
device (CUDA under NCCL, CPU under gloo) and back, so callers pass tensors from anywhere.

>>> import torch
>>> all_reduce_sum(torch.tensor([1.0, 2.0]))   # one process: the tensor itself
tensor([1., 2.])
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .process import rank, world_size

__all__ = [
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_sum",
    "broadcast_object",
    "check_agree",
]


def _backend_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op, group=None) -> torch.Tensor:
    buf = t.detach().to(_backend_device(), copy=True)
    dist.all_reduce(buf, op=op, group=group)
    return buf.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (returns ``t`` itself in one process).

    For sums over the *data* (losses, weights), which is split over all ranks. A local sum
    over a parameter-space vector is reduced with
    :func:`~hessian_spectra.distributed.sum_over_shards` instead (under HSDP or ``dp``, ranks
    hold copies of the same entries).
    """
    return _all_reduce(t, dist.ReduceOp.SUM) if world_size() > 1 else t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max of ``t`` over all ranks (returns ``t`` itself in one process)."""
    return _all_reduce(t, dist.ReduceOp.MAX) if world_size() > 1 else t


def all_gather_object(obj) -> list:
    """``[obj from rank 0, obj from rank 1, ...]`` (``[obj]`` in one process). Small objects only.

    >>> all_gather_object({"a": 1})
    [{'a': 1}]
    """
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process). Small objects only.

    >>> broadcast_object("rank 0's path")
    "rank 0's path"
    """
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_agree(value: int, what: str, hint: str = "") -> None:
    """Raise the same ``ValueError`` on every rank unless all ranks pass the same ``value``.

    One all-reduce of two numbers: call it where ranks could diverge (number of batches, a
    resumed step) *before* collectives that would otherwise hang or mismatch.

    >>> check_agree(3, "number of batches")   # one process: always agrees
    """
    if world_size() == 1:
        return
    mm = all_reduce_max(torch.tensor([value, -value], dtype=torch.float64))
    hi, lo = int(mm[0]), -int(mm[1])
    if hi != lo:
        raise ValueError(
            f"{what} differs between ranks: rank {rank()} has {value}, the ranks have {lo} to "
            f"{hi}. {hint}".rstrip()
        )


def differing_entries(values: torch.Tensor) -> torch.Tensor:
    """Indices ``i`` where the int64 vector ``values`` is not the same on every rank (the same
    answer on every rank). One all-reduce (max) of ``2 * len(values)`` integers; every rank must
    pass a vector of the same length. Entries are compared modulo 2**62.

    >>> differing_entries(torch.tensor([4, 5]))   # one process: nothing can differ
    tensor([], dtype=torch.int64)
    """
    v = values.to(torch.int64) & ((1 << 62) - 1)  # so that -v cannot overflow
    if world_size() == 1:
        return torch.zeros(0, dtype=torch.int64)
    mm = all_reduce_max(torch.cat([v, -v]))
    hi, lo = mm[: v.numel()], -mm[v.numel() :]
    return torch.nonzero(hi != lo).reshape(-1).cpu()
