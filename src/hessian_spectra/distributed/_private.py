"""Every use of a private (underscore) PyTorch API in the package, and nothing else.

Each function says what it reads, why no public API gives it, and what happens when PyTorch
changes it: the callers get ``None`` (or the public fallback) and choose a safe path, so a new
PyTorch release can cost speed or a warning but never a wrong number. Tested against torch 2.13.
"""

from __future__ import annotations

import torch

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - torch < 2.5: the same classes at their private path
    from torch.distributed._tensor import (  # type: ignore
        DTensor,
        Replicate,
        Shard,
        distribute_tensor,
    )

__all__ = [
    "DTensor",
    "Replicate",
    "Shard",
    "distribute_tensor",
    "fsdp_api",
    "gradient_divide_factors",
    "local_shape_and_offset",
]


def fsdp_api():
    """``(fully_shard, FSDPModule)``.

    Public in ``torch.distributed.fsdp`` since torch 2.6; before that only at the private path
    ``torch.distributed._composable.fsdp`` (same objects). If neither imports, the ImportError
    propagates: FSDP2 is missing and nothing can be sharded.
    """
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard  # type: ignore
    return fully_shard, FSDPModule


def gradient_divide_factors(module: torch.nn.Module) -> list[float] | None:
    """The factors by which FSDP2 divides the reduced gradients of ``module``'s own parameter
    groups, or None when FSDP2's private layout could not be read.

    Reads ``module._get_fsdp_state()._fsdp_param_groups[i].gradient_divide_factor`` (named
    ``reduce_scatter_divide_factor`` in older torch; ``None`` there means FSDP2's default, the
    data-parallel size ``mesh_info.mesh.size()``). Why private: FSDP2 has the setter
    ``FSDPModule.set_gradient_divide_factor`` but no getter (torch 2.13), and the operator must
    undo whatever division was chosen to get the sum over ranks. Fallback when this breaks:
    ``None``; :func:`~hessian_spectra.distributed.gradient_scale` then assumes the default
    (the world size) and warns that a custom factor would be missed.
    """
    try:
        groups = list(module._get_fsdp_state()._fsdp_param_groups)
    except Exception:  # noqa: BLE001 - any change of the private layout: fall back
        return None
    out = []
    for g in groups:
        f = getattr(g, "gradient_divide_factor", None)
        if f is None:  # the name in older torch (set_reduce_scatter_divide_factor)
            f = getattr(g, "reduce_scatter_divide_factor", None)
        if f is None:  # not set by the user: FSDP2 averages over its data-parallel mesh
            try:
                f = g.mesh_info.mesh.size()
            except Exception:  # noqa: BLE001 - private layout changed: fall back
                return None
        try:
            out.append(float(f))
        except (TypeError, ValueError):
            return None
    return out


def local_shape_and_offset(p: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(local_shape, global_offset)`` of this rank's piece of the DTensor ``p``, or None.

    Reads ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset`` (the helper
    DTensor itself uses to place shards). Why private: DTensor exposes the local tensor
    (``to_local()``) but not where it sits in the global tensor. Fallback when this breaks:
    ``None``; :func:`~hessian_spectra.distributed.local_flat_range` then returns None and the
    caller slices a full tensor with the public ``distribute_tensor`` (more memory, same values).
    """
    try:
        try:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        except ImportError:  # pragma: no cover - older torch
            from torch.distributed._tensor._utils import (  # type: ignore
                compute_local_shape_and_global_offset,
            )
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return tuple(int(s) for s in shape), tuple(int(o) for o in offset)
    except Exception:  # noqa: BLE001 - private helper changed: fall back
        return None
