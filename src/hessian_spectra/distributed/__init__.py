"""Distributed support: the process group, collectives, FSDP2 sharding and shard geometry.

Everything here is a no-op in a single process. Under ``torchrun`` with the model sharded by
FSDP2 (``fully_shard``), parameters are ``DTensor``s; a vector holds each parameter's *local*
shard and a reduction is a local float64 sum plus one all-reduce of a small tensor (over the
ranks that hold different pieces: all of them under FSDP, a shard group under HSDP, none under
plain data parallelism).

One module per concern (every name is re-exported here; use ``distributed.X``):

- :mod:`.process`: setup/teardown/launch, ranks, barrier, rank-0 printing and writing;
- :mod:`.collectives`: all-reduce of small tensors, agreement checks, small objects;
- :mod:`.fsdp`: the FSDP2 policy: blocks, ``shard_model`` (refuses ranks whose weights differ),
  ``reshard``, ``gradient_scale``;
- :mod:`.parallel`: the setups ``fsdp``, ``hsdp`` (2-D mesh) and ``dp`` (shard size 1):
  ``parallelize``, ``make_mesh``, ``replicate_size``;
- :mod:`.layout`: which ranks hold which piece, hence over which ranks a vector's local sums
  are reduced (``layout_of``, ``sum_over_shards``, ``check_replicas``);
- :mod:`.shards`: DTensor shard geometry (``local``, ``local_flat_range``, ``local_piece``);
- :mod:`._private`: the only uses of private PyTorch APIs, each with its fallback.

A script runs unchanged in one process and under ``torchrun``::

    from hessian_spectra import distributed

    distributed.setup()                    # no-op without torchrun's WORLD_SIZE / RANK
    try:
        model = distributed.parallelize(model)   # FSDP2 per block + root; no-op in one process
        ...                                      # HessianOperator, lanczos, slq: as usual
        distributed.print0("done")               # prints on rank 0 only
        code = 0
    except BaseException:
        traceback.print_exc(); code = 1
    distributed.teardown(exit_code=code, hard_exit=True)   # or: distributed.launch(main)

``launch(main)`` does exactly that dance.

>>> from hessian_spectra import distributed
>>> distributed.setup(), distributed.world_size()   # one process: nothing to set up
(False, 1)
"""

from __future__ import annotations

from .collectives import (
    all_gather_object,
    all_reduce_max,
    all_reduce_sum,
    broadcast_object,
    check_agree,
)
from .fsdp import find_blocks, gradient_scale, reshard, shard_model
from .layout import (
    Layout,
    check_replicas,
    current_layout,
    layout_of,
    sum_over_shards,
    use_layout,
)
from .parallel import PARALLEL, make_mesh, parallelize, replicate_size
from .process import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    barrier,
    is_initialized,
    is_rank0,
    launch,
    local_rank,
    print0,
    rank,
    setup,
    teardown,
    under_torchrun,
    world_size,
    write_json0,
    write_text0,
)
from .shards import is_sharded, local, local_flat_range, local_piece

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PARALLEL",
    "TIMEOUT_ENV",
    "Layout",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "check_agree",
    "check_replicas",
    "current_layout",
    "find_blocks",
    "gradient_scale",
    "is_initialized",
    "is_rank0",
    "is_sharded",
    "launch",
    "layout_of",
    "local",
    "local_flat_range",
    "local_piece",
    "local_rank",
    "make_mesh",
    "parallelize",
    "print0",
    "rank",
    "replicate_size",
    "reshard",
    "setup",
    "shard_model",
    "sum_over_shards",
    "teardown",
    "under_torchrun",
    "use_layout",
    "world_size",
    "write_json0",
    "write_text0",
]
