"""distributed.collectives in one plain process: every collective is the identity."""

from __future__ import annotations

import torch

from hessian_spectra import distributed as D
from hessian_spectra.distributed.collectives import differing_entries


def test_collectives_are_identities_in_one_process():
    """Reductions return their argument itself, gathers a one-element list, broadcasts the
    object, and agreement checks cannot fail."""
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_sum(t) is t and D.all_reduce_max(t) is t
    assert D.all_gather_object({"a": 1}) == [{"a": 1}] and D.broadcast_object(3) == 3
    D.check_agree(5, "anything")
    assert differing_entries(torch.tensor([1, -5, 2**62 + 3])).numel() == 0
