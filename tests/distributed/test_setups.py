"""The FSDP2 setups real training stacks use, at world size 2 (torchrun, CPU, gloo), against one
plain process: ``CPUOffloadPolicy``, ``reshard_after_forward=False``, activation checkpointing
(``torch.utils.checkpoint``, reentrant or not, around or inside the blocks; Hugging Face
``gradient_checkpointing_enable()``) and models the user sharded with their own block choice
and mesh. What cannot work is refused with an error naming the setting.

One torchrun launch runs every sharded setup (``_setups_worker.py sharded``); the single-process
reference and the one-process checks run in this process on the same tiny float64 models.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _setups_worker as W
from _launch import launch

from hessian_spectra import HessianOperator, random_probe
from hessian_spectra.testing import flatten, hf_loss, lm_loss

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_setups_worker.py")

# setup -> the reference it must reproduce
SETUPS = {
    "shard_model": "plain",
    "offload": "plain",
    "no_reshard": "plain",
    "ckpt": "plain",
    "ckpt_reentrant": "plain",
    "ckpt_inner": "plain",
    "user_every_other": "plain",
    "user_linear": "plain",
    "hf_ckpt": "hf",
}
CHECKPOINTED = ("ckpt", "ckpt_reentrant", "ckpt_inner", "hf_ckpt")


@pytest.fixture(scope="module")
def ref():
    """The single-process results (:func:`_setups_worker.reference`), through JSON as the
    sharded ones."""
    pytest.importorskip("transformers")
    return json.loads(json.dumps(W.reference()))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The world-size-2 results of every setup (one torchrun launch)."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("setups") / "ws2.json"
    rc, _, log = launch(WORKER, ["sharded", out], 2)
    assert rc == 0, log[-6000:]
    return json.loads(out.read_text())


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("setup", list(SETUPS))
def test_setup_at_world_size_2_matches_one_process(ref, sharded, setup):
    """Each setup, sharded over 2 ranks, gives the single-process fd HVP (fixed step) to 1e-10
    relative and the Ritz values of a 5-step Lanczos run to 1e-9 (measured: 1.8e-13 and
    4.7e-11; Hugging Face Llama 1.2e-14 and 9e-15), and leaves every rank's parameter shards and
    the loss bit-for-bit as they were."""
    s, r = sharded[setup], ref[SETUPS[setup]]
    assert sharded["world_size"] == 2 and s["sharded"] and not r["sharded"]
    assert s["num_params"] == r["num_params"]
    assert _rel(s["hvp_fd"], r["hvp_fd"]) <= 1e-10
    assert _rel(s["ritz"], r["ritz"]) <= 1e-9
    assert s["params_identical"] == [True, True]


def test_setups_are_what_they_claim(sharded):
    """The checkpointed setups recompute their blocks (the first block's inside runs twice per
    batch in a gradient pass, once otherwise); the user's own sharding is kept as they chose it
    (shard_model skipped); CPU offload keeps the shards on the CPU."""
    for setup in SETUPS:
        want = 2.0 if setup in CHECKPOINTED else 1.0
        assert sharded[setup]["forwards_per_batch"] == want, setup
    blocks = ["", "blocks.0", "blocks.1", "blocks.2"]
    assert sharded["shard_model"]["fsdp_modules"] == blocks
    assert sharded["offload"]["fsdp_modules"] == blocks
    assert sharded["offload"]["param_devices"] == ["cpu"]
    assert sharded["user_every_other"]["fsdp_modules"] == ["", "blocks.0", "blocks.2"]
    linears = [f"blocks.{i}.{n}" for i in range(3) for n in ("qkv", "proj", "fc")]
    assert sharded["user_linear"]["fsdp_modules"] == ["", *linears, "head"]
    assert sharded["hf_ckpt"]["fsdp_modules"] == ["", "model.layers.0", "model.layers.1"]


def test_partly_sharded_model_refused_on_every_rank(sharded):
    """A user who sharded the blocks but not the root leaves the embeddings and head as plain
    tensors whose gradients FSDP2 never reduces (their Hessian rows were 38% off): the operator
    refuses it at construction on both ranks, naming the parameters and the fix."""
    errs = sharded["rootless_error"]
    assert len(errs) == 2 and errs[0] == errs[1]
    assert errs[0].startswith("ValueError: the model is only partly sharded")
    assert "tok.weight" in errs[0] and "fully_shard(model)" in errs[0]


def test_reentrant_checkpoint_cut_refused_on_every_rank(sharded):
    """Reentrant checkpointing of blocks whose inputs need no gradient (frozen embeddings) hides
    the blocks' parameters from backward (their Hessian rows came out 0): refused on the first
    product on both ranks, parameters restored."""
    errs = sharded["reentrant_frozen_error"]
    assert len(errs) == 2 and errs[0] == errs[1]
    assert errs[0].startswith("ValueError: activation checkpointing with use_reentrant=True")
    assert "blocks.0.ln1.weight" in errs[0] and "use_reentrant=False" in errs[0]
    assert sharded["reentrant_frozen_params_identical"] == [True, True]


# ---------------------------------------------------------------- one process
def test_checkpointing_changes_no_number_in_one_process(ref):
    """In one process, fd and exact HVPs and the Lanczos Ritz values with checkpointed blocks
    (around or inside each block, reentrant or not; Hugging Face gradient_checkpointing_enable()
    in training mode) equal those without checkpointing to 1e-12 relative (measured: identical),
    and the checkpointing is really on (the blocks are recomputed)."""
    pairs = [("ckpt", "plain"), ("ckpt_inner", "plain"), ("ckpt_reentrant", "plain")]
    pairs.append(("hf_ckpt", "hf"))
    for got, want in pairs:
        g, w = ref[got], ref[want]
        assert g["forwards_per_batch"] == 2.0 and w["forwards_per_batch"] == 1.0, got
        for key in ("hvp_fd", "hvp_exact", "ritz"):
            if key in g:
                assert _rel(g[key], w[key]) <= 1e-12, (got, key)
        assert g["params_identical"] == [True]
    # and the numbers are the Hessian's: fd against exact, jvp against exact
    assert _rel(ref["plain"]["hvp_fd"], ref["plain"]["hvp_exact"]) <= 1e-5
    assert _rel(ref["plain"]["hvp_jvp"], ref["plain"]["hvp_exact"]) <= 1e-13
    assert _rel(ref["hf"]["hvp_fd"], ref["hf"]["hvp_exact"]) <= 1e-3  # RMSNorm in float32


def _op(model, loss_fn=lm_loss, **kw):
    kw.setdefault("fd_calibration", False)
    return HessianOperator(model, loss_fn, W.global_data(), **kw)


def test_jvp_through_checkpoint_falls_back_to_exact():
    """torch.func cannot run through a checkpoint (saved-tensor hooks): method='jvp' warns and
    falls back to double backward, which gives the unchecked model's exact HVP."""
    want_op = _op(W.build("plain"), method="exact")
    v = random_probe(want_op, 2, dtype=torch.float64)
    want = flatten(want_op.matvec(v))
    op = _op(W.build("ckpt"), method="jvp")
    with pytest.warns(UserWarning, match="activation checkpointing"):
        got = flatten(op.matvec(v))
    assert op.effective_method == "exact"
    assert float((got - want).norm() / want.norm()) <= 1e-12


@pytest.mark.parametrize("model_kind", ["torch", "hf"])
def test_exact_through_reentrant_checkpoint_refused(model_kind):
    """Double backward cannot go through a reentrant checkpoint (PyTorch refuses .grad() there):
    method='exact' raises NotImplementedError naming use_reentrant and method='fd', parameters
    unchanged; fd through the same model gives the unchecked model's HVP (Hugging Face: with
    gradient_checkpointing_kwargs={'use_reentrant': True}, which also makes its inputs require
    grad)."""
    if model_kind == "torch":
        model, plain, loss_fn, train = W.build("ckpt_reentrant"), W.build("plain"), lm_loss, False
    else:
        pytest.importorskip("transformers")
        model, plain = W.build_hf(True, use_reentrant=True), W.build_hf(False)
        loss_fn, train = hf_loss, True
    op = _op(model, loss_fn, method="exact", train_mode=train)
    v = random_probe(op, 4, dtype=torch.float64)
    before = [p.detach().clone() for p in op.params]
    with pytest.raises(NotImplementedError, match="use_reentrant=True.*method='fd'"):
        op.matvec(v)
    assert all(torch.equal(a, p) for a, p in zip(before, op.params))
    fd = flatten(_op(model, loss_fn, eps=W.EPS, train_mode=train).matvec(v))
    want = flatten(_op(plain, loss_fn, eps=W.EPS, train_mode=train).matvec(v))
    assert float((fd - want).norm() / want.norm()) <= 1e-12


def test_reentrant_checkpoint_cut_refused_in_one_process():
    """Frozen embeddings + reentrant checkpoint: the blocks' parameters would get no gradient.
    fd products and the gradient raise ValueError naming the setting (parameters unchanged);
    analysing only parameters outside the cut (the head) is fine and gives the unchecked
    model's product."""
    op = _op(W.frozen_inputs(W.build("ckpt_reentrant")), eps=W.EPS)
    v = random_probe(op, 4, dtype=torch.float64)
    before = [p.detach().clone() for p in op.params]
    with pytest.raises(ValueError, match="use_reentrant=True.*blocks.0.ln1.weight"):
        op.matvec(v)
    with pytest.raises(ValueError, match="use_reentrant=True"):
        op.gradient()
    assert all(torch.equal(a, p) for a, p in zip(before, op.params))
    head = ["head.weight", "ln_f.weight"]
    got_op = _op(W.frozen_inputs(W.build("ckpt_reentrant")), eps=W.EPS, params=head)
    want_op = _op(W.frozen_inputs(W.build("plain")), eps=W.EPS, params=head)
    u = random_probe(want_op, 5, dtype=torch.float64)
    got, want = flatten(got_op.matvec(u)), flatten(want_op.matvec(u))
    assert float((got - want).norm() / want.norm()) <= 1e-12


def test_other_warnings_in_the_first_pass_still_reach_the_user():
    """The first gradient pass watches PyTorch's warnings for the reentrant-checkpoint cut; every
    other warning (here the loss function's own) is passed on, not swallowed."""

    def loud_loss(model, batch):
        warnings.warn("the loss function's own warning", UserWarning, stacklevel=1)
        return lm_loss(model, batch)

    op = _op(W.build("plain"), loud_loss, check_determinism=False)
    with pytest.warns(UserWarning, match="the loss function's own warning"):
        op.gradient()
