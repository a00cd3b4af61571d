"""Splitting a list of batches over the ranks of a ``torchrun`` job, with nothing dropped.

Under FSDP2 every forward/backward is a collective, so every rank must run the same number of
passes. Batch ``i`` goes to rank ``i % world_size``; a rank left with fewer than
``ceil(n / world_size)`` batches runs one of the batches again wrapped in :class:`ZeroWeight`,
which the operator evaluates (the collectives stay in step) and counts with weight 0. The
global objective ``sum_b w_b l_b / sum_b w_b`` is therefore the same at every world size.

>>> shard_batches(["a", "b", "c"], rank=1, world_size=2)
['b', ZeroWeight(batch='b')]
>>> shard_batches(["a"], rank=1, world_size=2)
[ZeroWeight(batch='a')]
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ZeroWeight", "shard_batches"]


@dataclass(frozen=True)
class ZeroWeight:
    """A batch that is evaluated but weighs 0 in the average (padding for uneven splits)."""

    batch: object


def shard_batches(batches, rank: int, world_size: int) -> list:
    """This rank's share of ``batches`` (a sequence), padded with ``ZeroWeight`` entries so that
    every rank holds ``ceil(len(batches) / world_size)`` (module docstring).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: there is nothing to split over the ranks")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    mine = batches[rank::world_size]
    per_rank = -(-len(batches) // world_size)
    pad = mine[-1] if mine else batches[0]
    return mine + [ZeroWeight(pad)] * (per_rank - len(mine))
