"""Distributed support: the process group, collectives, FSDP2 sharding and shard geometry.

Everything here is a no-op in a single process. Under ``torchrun`` with the model sharded by
FSDP2 (``fully_shard``), parameters are ``DTensor``s; a vector holds each parameter's *local*
shard and a reduction is a local float64 sum plus one all-reduce of a small tensor.

One module per concern (every name is re-exported here; use ``distributed.X``):

- :mod:`.process`: setup/teardown/launch, ranks, barrier, rank-0 printing and writing;
- :mod:`.collectives`: all-reduce of small tensors, agreement checks, small objects;
- :mod:`.fsdp`: the FSDP2 policy: blocks, ``shard_model`` (refuses ranks whose weights differ),
  ``reshard``, ``gradient_scale``;
- :mod:`.shards`: DTensor shard geometry (``local``, ``local_flat_range``, ``local_piece``);
- :mod:`._private`: the only uses of private PyTorch APIs, each with its fallback.

A script runs unchanged in one process and under ``torchrun``::

    from hessian_spectra import distributed

    distributed.setup()                    # no-op without torchrun's WORLD_SIZE / RANK
    try:
        model = distributed.shard_model(model)   # FSDP2 per block + root; no-op in one process
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
    "TIMEOUT_ENV",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "check_agree",
    "find_blocks",
    "gradient_scale",
    "is_initialized",
    "is_rank0",
    "is_sharded",
    "launch",
    "local",
    "local_flat_range",
    "local_piece",
    "local_rank",
    "print0",
    "rank",
    "reshard",
    "setup",
    "shard_model",
    "teardown",
    "under_torchrun",
    "world_size",
    "write_json0",
    "write_text0",
]
