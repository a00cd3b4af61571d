"""DTensor shard geometry: which part of a parameter this rank holds.

Under FSDP2 a parameter is a ``DTensor`` placed ``Shard(0)`` on a 1-D mesh: each rank holds a
contiguous block of rows. Under HSDP (a 2-D mesh, placements ``(Replicate(), Shard(0))``) the
rows are split over the shard dimension and every replica holds the same block; with a shard
dimension of size 1 (plain data parallelism) every rank holds the whole parameter. A vector in
this package holds each parameter's *local* shard; these helpers find that shard
(:func:`local`), where it lies in the flattened global tensor (:func:`local_flat_range`) and cut
the matching piece out of a full tensor (:func:`local_piece`). For a plain tensor each is the
identity.

>>> import torch
>>> p = torch.zeros(3, 4)
>>> is_sharded(p), local(p) is p, local_flat_range(p)
(False, True, (0, 12))
"""

from __future__ import annotations

import torch

from ._private import DTensor, Replicate, Shard, distribute_tensor, local_shape_and_offset

__all__ = ["is_sharded", "local", "local_flat_range", "local_piece"]


def is_sharded(p: torch.Tensor) -> bool:
    """True when ``p`` is a DTensor (FSDP2-sharded parameter)."""
    return isinstance(p, DTensor)


def local(p: torch.Tensor) -> torch.Tensor:
    """The rank-local data of a parameter (``p.to_local()`` for a DTensor, else ``p``).

    For FSDP2 this is a view of the very storage FSDP all-gathers from, so an in-place change
    to it is what the next forward sees (after :func:`~hessian_spectra.distributed.reshard`).
    """
    return p.to_local() if isinstance(p, DTensor) else p


def local_flat_range(p: torch.Tensor) -> tuple[int, int] | None:
    """``(start, stop)``: the span of ``p``'s row-major flattened *global* tensor held locally.

    ``(0, numel)`` for a plain tensor. For a DTensor sharded by rows on one mesh dimension and
    replicated on the others (``Shard(0)`` on a 1-D mesh, FSDP2's default; ``(Replicate(),
    Shard(0))`` under HSDP; only ``Replicate()``: every rank holds it whole) the local rows
    are one contiguous span of the flattened tensor. None for any other layout, or when
    DTensor's private placement helper is unavailable (the caller then falls back to
    :func:`local_piece`).
    """
    if not isinstance(p, DTensor):
        return 0, p.numel()
    placements = tuple(p.placements)
    shards = [q for q in placements if q == Shard(0)]
    if len(shards) > 1 or any(q != Shard(0) and q != Replicate() for q in placements):
        return None
    found = local_shape_and_offset(p)
    if found is None:
        return None
    shape, offset = found
    loc = p.to_local()
    if shape != tuple(loc.shape):
        return None
    row = 1
    for d in p.shape[1:]:
        row *= int(d)
    start = offset[0] * row if loc.numel() else 0
    return start, start + loc.numel()


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
