"""Shared fixtures for the tests: the tiny models, problems and dense references of
``hessian_spectra.testing`` (shipped, so users can check their own operators the same way),
re-exported here, and a per-session cache of the dense Hessians.

The reference (``testing.dense_hessian``: ``torch.autograd.functional.hessian`` of the flat,
weighted loss) is itself checked in ``test_testing.test_reference_hessian_is_right`` against a
float64 central difference of its own gradient and against the unbatched row-by-row loop.
"""

from __future__ import annotations

import pytest
import torch

from hessian_spectra.testing import (  # noqa: F401  (re-exported for the test modules)
    MLP,
    SmallCNN,
    TinyTransformer,
    ce_loss,
    dense_ggn,
    dense_hessian,
    flat_loss_fn,
    flatten,
    hf_loss,
    known_spectrum_matrix,
    lm_loss,
    make_problem,
    mse_loss,
    perturb_,
    plain_loss,
    unflatten,
)
from hessian_spectra.testing import make_hf_problem as _make_hf_problem

torch.set_num_threads(1)


def make_hf_problem(arch: str = "gpt2", attn: str = "eager", dtype=torch.float64, seed: int = 0):
    """``testing.make_hf_problem``, skipped where transformers is not installed."""
    pytest.importorskip("transformers")
    return _make_hf_problem(arch, attn, dtype, seed)


_CACHE: dict = {}


def problem_with_hessian(kind: str):
    """(model, loss_fn, batches, H) in float64, the dense reference cached per session.

    ``kind``: a ``make_problem`` kind, or ``hf-<arch>-<attn>`` (e.g. ``hf-gpt2-sdpa``)."""
    if kind not in _CACHE:
        if kind.startswith("hf-"):
            _, arch, attn = kind.split("-")
            m, l, b = make_hf_problem(arch, attn)
        else:
            m, l, b = make_problem(kind)
        _CACHE[kind] = (m, l, b, dense_hessian(m, l, b))
    return _CACHE[kind]


@pytest.fixture
def mlp64():
    """A fresh float64 MLP problem and its dense Hessian."""
    m, l, b = make_problem("mlp")
    return m, l, b, problem_with_hessian("mlp")[3]
