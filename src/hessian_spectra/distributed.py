"""Distributed helpers: global reductions and shard access.

Everything here is a no-op in a single process. Under ``torchrun`` with the model sharded by
FSDP2 (``fully_shard``), parameters are ``DTensor``s; a vector holds each parameter's *local*
shard and a reduction is a local float64 sum plus one all-reduce of a small tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # torch >= 2.5 exposes DTensor publicly
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._tensor import DTensor, distribute_tensor  # type: ignore


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_rank0() -> bool:
    return rank() == 0


def is_sharded(p: torch.Tensor) -> bool:
    """True when ``p`` is a DTensor (FSDP2-sharded parameter)."""
    return isinstance(p, DTensor)


def local(p: torch.Tensor) -> torch.Tensor:
    """The rank-local data of a parameter (``p.to_local()`` for a DTensor, else ``p``)."""
    return p.to_local() if isinstance(p, DTensor) else p


def local_piece(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` (a tensor of ``p``'s global shape), laid out like ``p``.

    Every rank holds the same ``full`` (it was drawn from the same seed), so no data moves:
    ``src_data_rank=None`` tells ``distribute_tensor`` to slice locally.
    """
    if not isinstance(p, DTensor):
        return full
    full = full.to(p.to_local().device)
    try:
        d = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    except TypeError:  # pragma: no cover - torch < 2.6 has no src_data_rank
        d = distribute_tensor(full, p.device_mesh, p.placements)
    return d.to_local()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (returns ``t`` itself in one process)."""
    if world_size() == 1:
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.detach().to(dev, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)
