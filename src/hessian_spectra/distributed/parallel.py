"""The parallel setups: ``fsdp``, ``hsdp`` and ``dp``, each one FSDP2 ``fully_shard`` on a mesh.

- ``fsdp`` (ZeRO-3, the default): a 1-D mesh of all ranks; every rank holds ``1 / world_size``
  of every parameter, gradient and Lanczos vector.
- ``hsdp``: a 2-D mesh ``(replicate, shard)`` of ``replicate × (world_size / replicate)``
  ranks; parameters are split over the shard dimension and copied over the replicate one
  (typically: shard within a node, replicate across nodes). FSDP2 reduce-scatters gradients
  within a shard group and all-reduces them over the replicas.
- ``dp``: plain data parallelism, HSDP with a shard size of 1 (a ``(world_size, 1)`` mesh):
  every rank holds the whole model and whole vectors, and gradients are all-reduced. FSHP
  App. B: when the model (with its gradient and the Lanczos vectors) fits on one device this
  is faster than ``fsdp``, whose per-block all-gathers and reduce-scatters cost
  ``4α(K−1)(L−1) + 6βP`` more per gradient pass (K ranks, L blocks, P bytes; α, β latency
  and inverse bandwidth).

In every setup the data is split over all ranks, and the operator is the Hessian of the loss
over all of it; only how vectors are reduced differs (:mod:`.layout`).

>>> replicate_size("dp", None, world=4), replicate_size("hsdp", 2, world=4)
(4, 2)
>>> replicate_size("hsdp", 3, world=4)
Traceback (most recent call last):
...
ValueError: parallel='hsdp': the world size 4 is not divisible by replicate=3 (divisors: 1, 2, 4)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .fsdp import shard_model
from .process import is_initialized, world_size

__all__ = ["PARALLEL", "make_mesh", "parallelize", "replicate_size"]

#: The setups :func:`parallelize` knows.
PARALLEL = ("fsdp", "hsdp", "dp")


def replicate_size(parallel: str, replicate: int | None, world: int | None = None) -> int:
    """The number of model replicas ``R`` of a setup at world size ``world`` (default: this
    job's), or a ``ValueError`` naming the setting that cannot work: an unknown ``parallel``,
    ``hsdp`` without ``replicate``, a world size not divisible by ``replicate``, or a
    ``replicate`` that contradicts ``fsdp`` (1) or ``dp`` (the world size).
    """
    world = world_size() if world is None else int(world)
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}; got {parallel!r}")
    if replicate is not None and (
        isinstance(replicate, bool) or not isinstance(replicate, int) or replicate < 1
    ):
        raise ValueError(f"replicate must be a positive integer, got {replicate!r}")
    if parallel == "fsdp":
        if replicate not in (None, 1):
            raise ValueError(
                f"replicate={replicate} applies to parallel='hsdp'; parallel='fsdp' shards "
                "over all ranks (one replica)"
            )
        return 1
    if parallel == "dp":
        if replicate not in (None, world):
            raise ValueError(
                f"replicate={replicate} with parallel='dp': every rank is a replica (world "
                f"size {world}); use parallel='hsdp' with replicate={replicate}"
            )
        return world
    if replicate is None:
        raise ValueError(
            "parallel='hsdp' needs replicate=R, the number of model replicas (the world size "
            f"{world} = R x shard size), e.g. the number of nodes"
        )
    if world % replicate:
        divisors = ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)
        raise ValueError(
            f"parallel='hsdp': the world size {world} is not divisible by replicate={replicate} "
            f"(divisors: {divisors})"
        )
    return replicate


def make_mesh(parallel: str = "fsdp", replicate: int | None = None):
    """The ``DeviceMesh`` of a setup: 1-D ``(world_size,)`` for ``fsdp``; 2-D ``(replicate,
    shard)`` with dimension names ``("replicate", "shard")`` for ``hsdp`` and ``dp`` (shard
    size 1). None without a process group. Every rank must call it (it creates groups).
    """
    R = replicate_size(parallel, replicate)
    if not is_initialized():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    dev_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    W = world_size()
    if parallel == "fsdp":
        return init_device_mesh(dev_type, (W,))
    return init_device_mesh(dev_type, (R, W // R), mesh_dim_names=("replicate", "shard"))


def parallelize(
    model: torch.nn.Module,
    parallel: str = "fsdp",
    *,
    replicate: int | None = None,
    blocks=None,
    reshard_after_forward: bool = True,
    mp_policy=None,
    broadcast_from_rank0: bool = False,
) -> torch.nn.Module:
    """Spread ``model`` over the ranks as ``parallel`` says (module docstring); a no-op (after
    checking the setting) without a process group.

    ``parallel="fsdp"`` is :func:`~hessian_spectra.distributed.shard_model`; ``"hsdp"`` and
    ``"dp"`` are ``shard_model`` on the mesh of :func:`make_mesh`. The other arguments are
    ``shard_model``'s (the same-weights check included). The operator then reads the setup
    from the parameters: dots and norms count every entry once (over the shard group under
    ``hsdp``, no reduction under ``dp``) and probes are the same vector as in one process.

    Args:
        model: the model, the same on every rank.
        parallel: ``"fsdp"``, ``"hsdp"`` or ``"dp"``.
        replicate: the number of replicas for ``"hsdp"`` (must divide the world size).
        blocks: see :func:`~hessian_spectra.distributed.find_blocks`.
        reshard_after_forward: see ``shard_model``.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` (default: none).
        broadcast_from_rank0: see ``shard_model``.

    >>> m = torch.nn.Linear(2, 2)
    >>> parallelize(m, "dp") is m   # one process: nothing to spread
    True
    """
    replicate_size(parallel, replicate)
    if not is_initialized():
        return model
    mesh = make_mesh(parallel, replicate)
    return shard_model(
        model,
        blocks,
        reshard_after_forward=reshard_after_forward,
        mesh=mesh,
        mp_policy=mp_policy,
        broadcast_from_rank0=broadcast_from_rank0,
    )
