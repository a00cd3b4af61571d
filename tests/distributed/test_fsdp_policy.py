"""distributed.fsdp and distributed._private in one plain process: block finding, the weight
fingerprint that shard_model compares across ranks, no-ops without a process group, and the
fallbacks when PyTorch's private layout changes. (Sharding itself: test_fsdp.py, torchrun.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessian_spectra import distributed as D
from hessian_spectra.distributed import _private, fsdp


class Blocky(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)])
        self.extra = nn.ModuleList([nn.Tanh()])  # no parameters: not a block
        self.head = nn.Linear(4, 5)


def test_sharding_helpers_are_noops_in_one_process():
    """Without a process group the model comes back untouched and unsharded, reshard does
    nothing and FSDP2's gradient divisor is 1."""
    m = Blocky()
    before = [p.detach().clone() for p in m.parameters()]
    assert D.shard_model(m) is m and not any(D.is_sharded(p) for p in m.parameters())
    assert D.shard_model(m, broadcast_from_rank0=True) is m
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
    D.reshard(m)
    assert D.gradient_scale(m) == 1.0


def test_find_blocks_automatic_by_name_and_explicit():
    """Blocks: HF ``_no_split_modules`` classes, else children of outermost ModuleLists that hold
    parameters; or by class name; or given modules; wrong requests fail with a clear error."""
    m = Blocky()
    assert D.find_blocks(m) == list(m.blocks)
    assert D.find_blocks(m, "Linear") == [m.blocks[0][0], m.blocks[1][0], m.blocks[2][0], m.head]
    assert D.find_blocks(m, [m.head]) == [m.head]
    with pytest.raises(ValueError, match="no module of class"):
        D.find_blocks(m, "LlamaDecoderLayer")
    with pytest.raises(ValueError, match="not part of the model"):
        D.find_blocks(m, [nn.Linear(1, 1)])
    with pytest.raises(TypeError):
        D.find_blocks(m, 3)


def test_find_blocks_hf_llama():
    """A Hugging Face decoder model's blocks are its decoder layers."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = transformers.LlamaForCausalLM(cfg)
    assert D.find_blocks(model) == list(model.model.layers)


DTYPES = [
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int64,
    torch.uint8,
    torch.complex64,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fingerprint_sees_every_one_element_change(dtype):
    """The fingerprint shard_model compares across ranks changes when any single element
    changes by the smallest step its dtype allows (one ulp, or 1 for integers), and when two
    unequal elements swap places; equal tensors (a copy) give equal fingerprints."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(7, 5, generator=g, dtype=torch.float64) * 3).to(dtype)
    if not dtype.is_floating_point and not dtype.is_complex:
        base = torch.randint(0, 200, (7, 5), generator=g).to(dtype)
    ref = fsdp.fingerprint(base)
    assert torch.equal(ref, fsdp.fingerprint(base.clone()))
    for k in (0, 17, 34):
        t = base.clone().reshape(-1)
        if dtype.is_complex:
            t[k] = torch.complex(torch.nextafter(t[k].real, t[k].real + 1), t[k].imag)
        elif dtype.is_floating_point:
            t[k] = torch.nextafter(t[k], t[k] + 1)
        else:
            t[k] = t[k] + 1
        assert not torch.equal(t[k], base.reshape(-1)[k])
        assert not torch.equal(fsdp.fingerprint(t.reshape(7, 5)), ref), (dtype, k)
    swapped = base.clone().reshape(-1)
    swapped[[3, 20]] = swapped[[20, 3]]
    assert not torch.equal(swapped, base.reshape(-1))
    assert not torch.equal(fsdp.fingerprint(swapped), ref)


def test_fingerprint_is_independent_of_chunking(monkeypatch):
    """Exact integer sums: computing the fingerprint in chunks of 7 elements gives the same
    numbers as in one chunk (so the order of summation on a rank cannot matter); a
    non-contiguous view gives the fingerprint of its values."""
    t = torch.randn(40, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    whole = fsdp.fingerprint(t)
    monkeypatch.setattr(fsdp, "_CHUNK", 7)
    assert torch.equal(fsdp.fingerprint(t), whole)
    assert torch.equal(fsdp.fingerprint(t.t()), fsdp.fingerprint(t.t().contiguous()))


def test_fingerprint_of_bool_empty_and_meta():
    """Bool tensors are fingerprinted as bytes; empty and meta tensors (no values yet) give 0."""
    a = torch.tensor([True, False, True])
    assert not torch.equal(fsdp.fingerprint(a), fsdp.fingerprint(~a))
    assert fsdp.fingerprint(torch.zeros(0)).tolist() == [0, 0]
    assert fsdp.fingerprint(torch.empty(3, device="meta")).tolist() == [0, 0]


def test_private_fsdp_state_unreadable_gives_none():
    """_private.gradient_divide_factors returns None (gradient_scale then falls back with a
    warning: tested under torchrun) for a module whose FSDP2 state is not laid out as expected;
    local_shape_and_offset returns None when DTensor's helper fails."""

    class NoState(nn.Module):
        def _get_fsdp_state(self):
            raise AttributeError("_fsdp_param_groups")

    class OtherGroups(nn.Module):
        def _get_fsdp_state(self):
            from types import SimpleNamespace

            # a group without a factor attribute and without mesh_info
            return SimpleNamespace(_fsdp_param_groups=[object()])

    assert _private.gradient_divide_factors(NoState()) is None
    assert _private.gradient_divide_factors(OtherGroups()) is None
    assert _private.local_shape_and_offset(torch.zeros(2)) is None  # not a DTensor
