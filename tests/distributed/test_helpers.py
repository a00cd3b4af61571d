"""The distributed helpers in one plain process (no torchrun needed, so not marked distributed)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hessian_spectra import distributed as D
from hessian_spectra.distributed import process
from hessian_spectra import vectors as V


@pytest.fixture
def no_torchrun(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def test_setup_teardown_shard_are_noops_in_one_process(no_torchrun, capsys, tmp_path):
    """Without torchrun's environment nothing is initialised, the model comes back as it was,
    reductions are identities and rank-0 IO happens (we are rank 0)."""
    assert D.setup() is False and not D.is_initialized()
    m = nn.Sequential(nn.Linear(2, 3))
    assert D.shard_model(m) is m and not any(D.is_sharded(p) for p in m.parameters())
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_sum(t) is t and D.all_reduce_max(t) is t
    assert D.all_gather_object({"a": 1}) == [{"a": 1}] and D.broadcast_object(3) == 3
    D.check_agree(5, "anything")
    D.barrier()
    D.reshard(m)
    assert D.gradient_scale(m) == 1.0
    D.print0("hello")
    assert capsys.readouterr().out == "hello\n"
    D.write_json0(tmp_path / "sub" / "r.json", {"x": 1})
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"x": 1}
    D.teardown()  # no group: nothing to do, must not exit
    assert D.world_size() == 1 and D.rank() == 0 and D.is_rank0()


def test_launch_returns_exit_codes(no_torchrun, capsys):
    """launch() runs main between setup and teardown and turns outcomes into exit codes."""
    assert D.launch(lambda: None) == 0
    assert D.launch(lambda: 3) == 3

    def boom():
        raise RuntimeError("boom")

    assert D.launch(boom) == 1
    assert "RuntimeError: boom" in capsys.readouterr().err


def test_timeout_env(monkeypatch):
    """HESSIAN_SPECTRA_DIST_TIMEOUT overrides the collective timeout; nonsense is rejected."""
    monkeypatch.setenv(D.TIMEOUT_ENV, "12.5")
    assert process._timeout_s() == 12.5
    monkeypatch.setenv(D.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="seconds"):
        process._timeout_s()
    monkeypatch.delenv(D.TIMEOUT_ENV)
    assert process._timeout_s() == D.DEFAULT_TIMEOUT_S


class Blocky(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)])
        self.extra = nn.ModuleList([nn.Tanh()])  # no parameters: not a block
        self.head = nn.Linear(4, 5)


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
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg)
    assert D.find_blocks(model) == list(model.model.layers)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_probe_spans_are_slices_of_the_whole(monkeypatch, kind):
    """What makes shard-local probes world-size invariant: entries [start, stop) drawn alone
    equal the same entries of the whole draw, for spans inside one block or across several."""
    monkeypatch.setattr(V, "_PROBE_BLOCK", 16)
    numel = 100
    whole = V._draw_span(3, "w", numel, 0, numel, kind, torch.device("cpu"), torch.float32)
    for start, stop in [(0, 0), (0, 7), (5, 16), (15, 17), (16, 32), (30, 100), (99, 100), (3, 97)]:
        part = V._draw_span(3, "w", numel, start, stop, kind, torch.device("cpu"), torch.float32)
        assert torch.equal(part, whole[start:stop]), (start, stop)
    if kind == "rademacher":
        assert set(whole.tolist()) == {-1.0, 1.0}
    assert not torch.equal(whole, V._draw_span(4, "w", numel, 0, numel, kind, torch.device("cpu"), torch.float32))


def test_local_flat_range_plain():
    assert D.local_flat_range(torch.zeros(3, 4)) == (0, 12)
