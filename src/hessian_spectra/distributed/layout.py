"""Which ranks hold which piece of the parameters, and so over which ranks a vector's local
sums are reduced.

A vector holds each parameter's *local* data. Its dot products and norms are sums over every
parameter entry, each counted once:

- FSDP (``Shard(0)`` on a 1-D mesh over all ranks): every rank holds other rows, so the local
  float64 sums are all-reduced over all ranks;
- HSDP (a 2-D mesh ``(replicate, shard)``, placements ``(Replicate(), Shard(0))``): the ranks of
  one *shard group* hold the rows between them and every replica holds the same rows, so the
  sums are all-reduced over the shard group only (reducing over all ranks would count every
  entry ``replicate`` times);
- plain data parallelism (``dp``: a shard size of 1, placements ``(Replicate(), Shard(0))`` on
  a ``(world_size, 1)`` mesh): every rank holds the whole vector, so nothing is reduced.

The data, in every case, is split over *all* ranks: sums over batches (losses, weights) stay
all-reduced over all ranks (:func:`~hessian_spectra.distributed.all_reduce_sum`).

The layout in use is process state: an :class:`~hessian_spectra.objective.Objective` reads it
from its parameters (:func:`layout_of`) and makes it current (:func:`use_layout`) when it is
built and before every product, so that :mod:`hessian_spectra.vectors` (whose functions see
only tensors) reduce the right way. One process, or no layout set: all ranks.

>>> import torch
>>> layout_of([torch.zeros(3)]).parallel      # plain tensors in one process
'none'
>>> sum_over_shards(torch.tensor([2.0]))       # one process: the local sum is the sum
tensor([2.])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import fsdp as _fsdp
from ._private import DTensor, Replicate, Shard
from .collectives import _all_reduce, all_gather_object
from .process import world_size

__all__ = [
    "Layout",
    "check_replicas",
    "current_layout",
    "layout_of",
    "sum_over_shards",
    "use_layout",
]


@dataclass(frozen=True)
class Layout:
    """How the parameters are spread over the ranks (module docstring).

    Attributes:
        parallel: ``"none"`` (one process, plain tensors), ``"fsdp"``, ``"hsdp"`` or ``"dp"``.
        shard_size: ranks that split every parameter between them (1: each holds it whole).
        replicate_size: copies of every piece (``world_size = shard_size * replicate_size``).
        shard_group: the process group of this rank's shard group; None when the sums need no
            sub-group (all ranks for FSDP, nothing to reduce when ``shard_size == 1``).
        replicate_group: the ranks that hold the same piece as this one (None: no replicas,
            or a mesh of more than two dimensions).
    """

    parallel: str = "none"
    shard_size: int = 1
    replicate_size: int = 1
    shard_group: object = None
    replicate_group: object = None

    def describe(self) -> str:
        """``"hsdp (replicate 2 x shard 2)"`` and the like, for messages and logs.

        >>> Layout("fsdp", 4, 1).describe()
        'fsdp (replicate 1 x shard 4)'
        """
        return f"{self.parallel} (replicate {self.replicate_size} x shard {self.shard_size})"


_DEFAULT = None  # no layout set: reduce over all ranks (FSDP's rule; identity in one process)
_ACTIVE: Layout | None = _DEFAULT


def use_layout(layout: Layout | None) -> None:
    """Make ``layout`` the one :func:`sum_over_shards` reduces by (None: all ranks)."""
    global _ACTIVE
    _ACTIVE = layout


def current_layout() -> Layout | None:
    """The layout :func:`sum_over_shards` uses now (None: all ranks)."""
    return _ACTIVE


def sum_over_shards(t: torch.Tensor) -> torch.Tensor:
    """Sum of the per-rank local sums ``t`` of a parameter-space quantity, each parameter entry
    counted once: all-reduced over the current layout's shard group (all ranks under FSDP,
    none under ``dp``; module docstring). Returns ``t`` itself when nothing is reduced.

    >>> sum_over_shards(torch.tensor([1.0, 2.0]))
    tensor([1., 2.])
    """
    if world_size() == 1:
        return t
    lay = _ACTIVE
    if lay is None or (lay.shard_group is None and lay.shard_size == world_size()):
        return _all_reduce(t, dist.ReduceOp.SUM)
    if lay.shard_size == 1:
        return t
    return _all_reduce(t, dist.ReduceOp.SUM, group=lay.shard_group)


def layout_of(params) -> Layout:
    """The :class:`Layout` of a list of parameters (plain tensors or FSDP2 DTensors).

    Raises ``ValueError`` naming the parameter for a layout whose sums this package cannot
    count exactly: a mix of sharded and plain parameters under ``torchrun``, parameters on
    different device meshes or with different placements, sharding over more than one mesh
    dimension (tensor parallelism), ``Partial`` placements, or a mesh that does not span all
    ranks (the data is split over all of them).
    """
    named = list(params)
    dts = [p for p in named if isinstance(p, DTensor)]
    ws = world_size()
    if not dts:
        return Layout("none", 1, 1) if ws == 1 else Layout("none", ws, 1)
    if len(dts) != len(named) and ws > 1:
        i = next(i for i, p in enumerate(named) if not isinstance(p, DTensor))
        raise ValueError(
            f"parameter {i} is a plain tensor while others are sharded (DTensor): every rank "
            "would count its entries once more. Shard the whole model (fully_shard on the "
            "root too, as hessian_spectra.distributed.shard_model does)"
        )
    mesh, placements = dts[0].device_mesh, tuple(dts[0].placements)
    for i, p in enumerate(dts):
        if p.device_mesh != mesh or tuple(p.placements) != placements:
            raise ValueError(
                f"the parameters are laid out differently: parameter {i} has placements "
                f"{tuple(p.placements)} on {p.device_mesh}, the first {placements} on {mesh}; "
                "the vectors need one layout (shard the model with one mesh)"
            )
    bad = [q for q in placements if not isinstance(q, (Shard, Replicate))]
    if bad:
        raise ValueError(
            f"parameters placed {placements} (a Partial placement) are not supported: "
            "use Shard(0) and Replicate() (FSDP2 / HSDP)"
        )
    shard_dims = [d for d, q in enumerate(placements) if isinstance(q, Shard)]
    if len(shard_dims) > 1:
        raise ValueError(
            f"parameters sharded over {len(shard_dims)} mesh dimensions (placements "
            f"{placements}, e.g. tensor parallelism) are not supported: shard over one "
            "dimension (FSDP2 fully_shard on a 1-D mesh, or HSDP on a (replicate, shard) mesh)"
        )
    if mesh.size() != ws:
        raise ValueError(
            f"the model's device mesh {tuple(mesh.shape)} spans {mesh.size()} of the {ws} "
            "ranks, but the data is split over all of them: use a mesh of all ranks"
        )
    if not shard_dims:  # replicated everywhere: every rank holds the whole parameter
        return Layout("dp", 1, ws, None, mesh.get_group(0) if mesh.ndim == 1 else None)
    d = shard_dims[0]
    shard = int(mesh.size(d))
    if mesh.ndim == 1:
        return Layout("fsdp", shard, 1)
    group = mesh.get_group(d)
    rep = mesh.get_group(1 - d) if mesh.ndim == 2 else None
    return Layout("dp" if shard == 1 else "hsdp", shard, ws // shard, group, rep)


def check_replicas(tensors, what: str = "the parameters") -> None:
    """Raise the same ``ValueError`` on every rank unless every replica holds the same bits
    (replicas: the ranks that hold the same piece under the current layout). One exact
    fingerprint per tensor (:func:`~hessian_spectra.distributed.fsdp.fingerprint`) and one
    gather of small objects over all ranks; nothing when there are no replicas.

    >>> check_replicas([torch.ones(2)])   # one process: nothing to compare
    """
    lay = _ACTIVE
    if world_size() == 1 or lay is None or lay.replicate_size == 1:
        return
    prints = [tuple(_fsdp.fingerprint(t).tolist()) for t in tensors]
    if lay.shard_group is not None:
        index = dist.get_group_rank(lay.shard_group, dist.get_rank())
    else:
        index = 0  # shard size 1: every rank holds the same (whole) piece
    seen = all_gather_object((index, prints))
    first: dict = {}
    for r, (i, fp) in enumerate(seen):
        if i in first and first[i][1] != fp:
            r0, fp0 = first[i]
            k = next((k for k, (a, b) in enumerate(zip(fp0, fp)) if a != b), 0)
            raise ValueError(
                f"{what} differ between replicas under {lay.describe()}: ranks {r0} and {r} "
                f"hold the same piece but tensor {k} differs. Every replica must hold the "
                "same weights (build the model identically on every rank before sharding)"
            )
        first.setdefault(i, (r, fp))
