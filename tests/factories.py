"""Tiny ``package.module:factory`` models for the command-line tests.

Each factory returns ``(model, loss_fn, batches)``: a float64 two-layer MLP regression with a
fixed seed, small enough that a dense Hessian is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hessian_spectra.testing import save_tiny_llama

CALLS = {"loss": 0}


def _mlp(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    batches = []
    for _ in range(3):
        x = torch.randn(5, 4, generator=g, dtype=torch.float64)
        y = torch.randn(5, 2, generator=g, dtype=torch.float64)
        batches.append((x, y))
    return model, batches


def _loss(model, batch):
    CALLS["loss"] += 1
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y), x.shape[0]


def mlp():
    """A float64 MLP with 44 parameters and 3 batches of 5 examples."""
    model, batches = _mlp()
    return model, _loss, batches


def _interrupting_loss(model, batch):
    """Counts calls; raises KeyboardInterrupt on call number $HS_INTERRUPT_AT (like Ctrl-C)."""
    CALLS["loss"] += 1
    at = int(os.environ.get("HS_INTERRUPT_AT", "0"))
    if at and CALLS["loss"] == at:
        raise KeyboardInterrupt
    return _plain_loss(model, batch)


def _plain_loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y), x.shape[0]


def interrupting_mlp():
    """The MLP of ``mlp`` whose loss raises KeyboardInterrupt on the $HS_INTERRUPT_AT-th call."""
    model, batches = _mlp()
    return model, _interrupting_loss, batches


def nan_mlp():
    """An MLP whose loss is NaN: the CLI must report a numerical failure (exit 3)."""
    model, batches = _mlp()

    def loss(model, batch):
        return _plain_loss(model, batch)[0] * float("nan")

    return model, loss, batches


def not_a_triple():
    return "nope"


tiny_hf_checkpoint = save_tiny_llama  # a factory spec tests pass by name


def raising_factory():
    """A factory whose own code fails: the CLI must say the error came from the factory."""
    raise RuntimeError("the dataset file my_data.pt is missing")


def tiny_gpt2_checkpoint(folder, *, n_positions: int = 64, seed: int = 0):
    """Save a tiny GPT-2 (n_positions 64) with the byte-level BPE tokenizer of
    ``tiny_hf_checkpoint`` to ``folder``: a model whose position limit is ``n_positions``."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tiny_hf_checkpoint(folder)  # writes the tokenizer (and a Llama, replaced below)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=n_positions,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    for f in Path(folder).glob("model*.safetensors"):
        f.unlink()
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def value_error_loss_mlp():
    """The MLP whose loss raises ValueError (as the library does for a loss that does not
    depend on the parameters): the CLI must report it as a user error, exit 2, one line."""
    model, batches = _mlp()

    def loss(model, batch):
        raise ValueError("the loss does not depend on the parameters: compute it from model(...)")

    return model, loss, batches


def slow_mlp():
    """The MLP whose loss sleeps $HS_SLEEP seconds per call (default 0.05): a run that lasts
    long enough to be signalled or raced."""
    model, batches = _mlp()

    def loss(model, batch):
        import time

        time.sleep(float(os.environ.get("HS_SLEEP", "0.05")))
        return _plain_loss(model, batch)

    return model, loss, batches


def no_grad_loss_mlp():
    """The MLP whose loss is computed under torch.no_grad() (a common mistake): the library
    refuses it with a ValueError, the CLI with one line and exit 2."""
    model, batches = _mlp()

    def loss(model, batch):
        with torch.no_grad():
            return _plain_loss(model, batch)

    return model, loss, batches
