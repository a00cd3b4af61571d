"""distributed.shards (and the probe spans built on it) in one plain process."""

from __future__ import annotations

import pytest
import torch

from hessian_spectra import distributed as D
from hessian_spectra import vectors as V


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_probe_spans_are_slices_of_the_whole(monkeypatch, kind):
    """What makes shard-local probes world-size invariant: entries [start, stop) drawn alone
    equal the same entries of the whole draw, for spans inside one block or across several."""
    monkeypatch.setattr(V, "_PROBE_BLOCK", 16)
    numel = 100
    cpu = torch.device("cpu")
    whole = V._draw_span(3, "w", numel, 0, numel, kind, cpu, torch.float32)
    for start, stop in [(0, 0), (0, 7), (5, 16), (15, 17), (16, 32), (30, 100), (99, 100), (3, 97)]:
        part = V._draw_span(3, "w", numel, start, stop, kind, cpu, torch.float32)
        assert torch.equal(part, whole[start:stop]), (start, stop)
    if kind == "rademacher":
        assert set(whole.tolist()) == {-1.0, 1.0}
    other = V._draw_span(4, "w", numel, 0, numel, kind, cpu, torch.float32)
    assert not torch.equal(whole, other)


def test_plain_tensors_are_their_own_shard():
    """For an unsharded tensor: not sharded, local() is the tensor itself, the local span is
    the whole flattened tensor and the local piece of a full tensor is that tensor."""
    p = torch.zeros(3, 4)
    full = torch.arange(12.0).reshape(3, 4)
    assert not D.is_sharded(p) and D.local(p) is p
    assert D.local_flat_range(p) == (0, 12)
    assert D.local_piece(full, p) is full
