"""Distributed helpers: process group, FSDP2 sharding, global reductions, shard access, rank-0 IO.

Everything here is a no-op in a single process. Under ``torchrun`` with the model sharded by
FSDP2 (``fully_shard``), parameters are ``DTensor``s; a vector holds each parameter's *local*
shard and a reduction is a local float64 sum plus one all-reduce of a small tensor.

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
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

try:  # torch >= 2.5 exposes DTensor publicly
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._tensor import DTensor, Shard, distribute_tensor  # type: ignore

__all__ = [
    "setup",
    "teardown",
    "launch",
    "under_torchrun",
    "is_initialized",
    "world_size",
    "rank",
    "local_rank",
    "is_rank0",
    "barrier",
    "print0",
    "write_text0",
    "write_json0",
    "shard_model",
    "find_blocks",
    "reshard",
    "gradient_scale",
    "is_sharded",
    "local",
    "local_piece",
    "local_flat_range",
    "all_reduce_sum",
    "all_reduce_max",
    "check_agree",
    "all_gather_object",
    "broadcast_object",
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
]

#: Seconds a collective may wait for the other ranks before it raises (env override below).
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "HESSIAN_SPECTRA_DIST_TIMEOUT"

_OWNS_GROUP = False  # True when setup() created the process group (so teardown() ends it)


# ---------------------------------------------------------------------- process group
def under_torchrun() -> bool:
    """True when the torchrun environment (``WORLD_SIZE`` and ``RANK``) is set."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_TIMEOUT_S
    try:
        t = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not t > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return t


def local_rank() -> int:
    """``LOCAL_RANK`` from torchrun (0 in one process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup(backend: str | None = None, *, timeout_s: float | None = None) -> bool:
    """Join the ``torchrun`` process group; do nothing in a plain single process.

    Backend: NCCL when CUDA is available (the CUDA device is set from ``LOCAL_RANK``), else
    gloo. ``timeout_s`` (default ``$HESSIAN_SPECTRA_DIST_TIMEOUT`` or 600 s) bounds how long a
    collective waits for a rank that died or diverged: it then raises instead of hanging.
    Returns True when this call created the process group.
    """
    global _OWNS_GROUP
    if not under_torchrun() or is_initialized():
        return False
    timeout = _dt.timedelta(seconds=timeout_s if timeout_s is not None else _timeout_s())
    use_cuda = torch.cuda.is_available() and (backend in (None, "nccl"))
    backend = backend or ("nccl" if use_cuda else "gloo")
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
        kwargs["device_id"] = torch.device("cuda", local_rank())
    try:
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    except TypeError:  # pragma: no cover - torch without device_id
        dist.init_process_group(backend=backend, timeout=timeout)
    _OWNS_GROUP = True
    return True


def barrier() -> None:
    """All ranks meet here (no-op in one process). On gloo a failure names the missing rank."""
    if world_size() == 1:
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=_dt.timedelta(seconds=_timeout_s()), wait_all_ranks=True)
    else:
        dist.barrier()


def _flush() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # pragma: no cover - closed streams
            pass


def teardown(exit_code: int | None = None, *, hard_exit: bool = False) -> None:
    """Leave the process group that ``setup()`` created (no-op in one process).

    On success (``exit_code`` None or 0) every rank first meets at a barrier, so no rank tears
    down while another still needs it; on failure there is no barrier (the other ranks may be
    stuck in a collective: torchrun stops them when this process exits, and the collective
    timeout bounds the wait otherwise). Then the group is destroyed and stdout/stderr flushed.

    ``hard_exit=True`` ends the process with ``os._exit(exit_code or 0)`` right after: with
    FSDP2 on gloo, about 1 run in 6 (world size 2) aborted at interpreter shutdown after all
    work was done (``terminate called without an active exception``: a gloo worker thread
    released during finalisation); barrier + destroy alone left 1 in 30, and the flush plus
    ``os._exit`` 0 in 50 (and 0 in 55 runs of ``tests/distributed/_worker.py``). Use it at the
    end of a script or CLI run under torchrun.
    """
    global _OWNS_GROUP
    ok = exit_code in (None, 0)
    if is_initialized() and _OWNS_GROUP:
        try:
            if ok:
                barrier()
            if ok or not hard_exit:
                dist.destroy_process_group()
        except Exception:
            if not hard_exit:
                raise
            # a rank died before the final barrier: report it, and fail this rank too
            sys.stderr.write(f"[rank {rank()}] teardown: " + traceback.format_exc())
            exit_code = exit_code or 1
        finally:
            _OWNS_GROUP = False
    _flush()
    if hard_exit:
        os._exit(int(exit_code or 0))


def launch(main: Callable[..., int | None], *args, hard_exit: bool | None = None, **kwargs) -> int:
    """Run ``main(*args, **kwargs)`` between ``setup()`` and ``teardown()``; return its exit code.

    An exception is printed (with the rank) and turns into exit code 1; ``SystemExit`` keeps its
    code. ``hard_exit`` (default: True under torchrun) ends the process in ``teardown``.
    """
    if hard_exit is None:
        hard_exit = under_torchrun()
    setup()
    try:
        code = main(*args, **kwargs)
        code = 0 if code is None else int(code)
    except SystemExit as e:
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        sys.stderr.write(f"[rank {rank()}] interrupted\n" if world_size() > 1 else "interrupted\n")
        code = 130
    except BaseException:
        where = f"[rank {rank()}] " if world_size() > 1 else ""
        sys.stderr.write(where + traceback.format_exc())  # one write: ranks' lines do not interleave
        code = 1
    teardown(exit_code=code, hard_exit=hard_exit)
    return code


# ---------------------------------------------------------------------- ranks
def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_rank0() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushes, so lines are not lost at a hard exit)."""
    if is_rank0():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def _write_atomic(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text0(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, on rank 0 only. Returns the path."""
    path = Path(path)
    if is_rank0():
        _write_atomic(path, text)
    return path


def write_json0(path, obj, **json_kwargs) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically, on rank 0 only. Returns the path."""
    json_kwargs.setdefault("indent", 2)
    return write_text0(path, json.dumps(obj, **json_kwargs) + "\n")


# ---------------------------------------------------------------------- FSDP2
def _fsdp():
    """``(fully_shard, FSDPModule)`` from torch >= 2.6 (public) or the older private path."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard  # type: ignore
    return fully_shard, FSDPModule


def find_blocks(model: torch.nn.Module, blocks=None) -> list[torch.nn.Module]:
    """The modules to shard one by one (each gets its own all-gather / reduce-scatter).

    ``blocks``:
      - ``None``: automatic. A Hugging Face model's ``_no_split_modules`` classes (its decoder
        layers) if it has any; else the children of every outermost ``nn.ModuleList`` whose
        children hold parameters (``model.model.layers``, ``transformer.h``, ``blocks``, ...).
      - a class name or a list of class names: every module of those classes (outermost only).
      - a list of modules: those.
    """
    if blocks is not None and not isinstance(blocks, (str, Sequence)):
        raise TypeError(f"blocks must be None, a class name, a list of class names or a list of modules; got {type(blocks).__name__}")
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
            raise ValueError(f"no module of class {sorted(names)} in the model; classes present: {present[:20]}")
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


def shard_model(
    model: torch.nn.Module,
    blocks=None,
    *,
    reshard_after_forward: bool = True,
    mesh=None,
    mp_policy=None,
) -> torch.nn.Module:
    """Shard ``model`` with FSDP2: ``fully_shard`` on each block, then on the root.

    Does nothing (returns ``model``) without a process group. Under ``torchrun`` (also with one
    process) every rank then holds only its ``Shard(0)`` piece of each parameter; the model is
    moved to this rank's device (``cuda:LOCAL_RANK`` with NCCL, CPU with gloo).

    Args:
        blocks: see :func:`find_blocks` (default: transformer blocks found automatically).
        reshard_after_forward: free each block's gathered parameters after its forward (memory:
            one gathered block at a time) at the price of a second all-gather in backward.
        mesh: a 1-D ``DeviceMesh`` (default: all ranks).
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` (default: none; FD HVPs want fp32).
    """
    if not is_initialized():
        return model
    fully_shard, FSDPModule = _fsdp()
    if isinstance(model, FSDPModule):
        raise ValueError("the model is already sharded with fully_shard; pass it to HessianOperator as is")
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
    _, FSDPModule = _fsdp()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def gradient_scale(model: torch.nn.Module) -> float:
    """The factor that turns FSDP2's reduced gradient into the *sum* over ranks.

    FSDP2 divides the reduce-scattered gradient by its data-parallel size (the mean over ranks)
    unless ``set_gradient_divide_factor(f)`` chose ``f``. Returns that divisor (1.0 when the
    model is not sharded). Raises if the model's FSDP groups disagree. Read when the operator is
    built: change the factor before building it.
    """
    if not is_initialized():
        return 1.0
    _, FSDPModule = _fsdp()
    factors = set()
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        try:
            groups = m._get_fsdp_state()._fsdp_param_groups
        except Exception:  # pragma: no cover - private layout changed
            return float(world_size())
        for g in groups:
            f = getattr(g, "gradient_divide_factor", None)
            if f is None:  # the name in older torch (set_reduce_scatter_divide_factor)
                f = getattr(g, "reduce_scatter_divide_factor", None)
            if f is None:
                try:
                    f = g.mesh_info.mesh.size()
                except Exception:  # pragma: no cover
                    f = world_size()
            factors.add(float(f))
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


# ---------------------------------------------------------------------- shards
def is_sharded(p: torch.Tensor) -> bool:
    """True when ``p`` is a DTensor (FSDP2-sharded parameter)."""
    return isinstance(p, DTensor)


def local(p: torch.Tensor) -> torch.Tensor:
    """The rank-local data of a parameter (``p.to_local()`` for a DTensor, else ``p``).

    For FSDP2 this is a view of the very storage FSDP all-gathers from, so an in-place change
    to it is what the next forward sees (after :func:`reshard`).
    """
    return p.to_local() if isinstance(p, DTensor) else p


def local_flat_range(p: torch.Tensor) -> tuple[int, int] | None:
    """``(start, stop)``: the span of ``p``'s row-major flattened *global* tensor held locally.

    ``(0, numel)`` for a plain tensor. For a DTensor sharded by rows (``Shard(0)`` on a 1-D
    mesh, FSDP2's default) the local rows are one contiguous span of the flattened tensor. None
    for any other layout (the caller then falls back to :func:`local_piece`).
    """
    if not isinstance(p, DTensor):
        return 0, p.numel()
    try:
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            return None
        try:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        except ImportError:  # pragma: no cover - older torch
            from torch.distributed._tensor._utils import compute_local_shape_and_global_offset  # type: ignore
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        loc = p.to_local()
        if tuple(shape) != tuple(loc.shape):
            return None
        row = 1
        for d in p.shape[1:]:
            row *= int(d)
        start = int(offset[0]) * row if loc.numel() else 0
        return start, start + loc.numel()
    except Exception:  # pragma: no cover - private helper changed: use the general path
        return None


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
    return _all_reduce(t, dist.ReduceOp.SUM) if world_size() > 1 else t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max of ``t`` over all ranks (returns ``t`` itself in one process)."""
    return _all_reduce(t, dist.ReduceOp.MAX) if world_size() > 1 else t


def all_gather_object(obj) -> list:
    """``[obj from rank 0, obj from rank 1, ...]`` (``[obj]`` in one process). Small objects only."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process). Small objects only."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_agree(value: int, what: str, hint: str = "") -> None:
    """Raise the same ``ValueError`` on every rank unless all ranks pass the same ``value``.

    One all-reduce of two numbers: call it where ranks could diverge (number of batches, a
    resumed step) *before* collectives that would otherwise hang or mismatch.
    """
    if world_size() == 1:
        return
    mm = all_reduce_max(torch.tensor([value, -value], dtype=torch.float64))
    hi, lo = int(mm[0]), -int(mm[1])
    if hi != lo:
        raise ValueError(f"{what} differs between ranks: rank {rank()} has {value}, the ranks have {lo} to {hi}. {hint}".rstrip())


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.detach().to(dev, copy=True)
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)
