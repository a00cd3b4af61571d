"""Shared fixtures for the engine tests: tiny models, their data, and dense reference Hessians.

Every ground truth here is computed independently of the engine: the dataset-averaged,
weighted loss is written as a function of ONE flat float64 parameter vector
(``torch.func.functional_call``) and differentiated twice with
``torch.autograd.functional.hessian`` (reverse over reverse; ``dense_hessian``). That reference
is checked in ``test_operators.test_reference_hessian_is_right`` against a float64 central
difference of its own gradient and against the unbatched row-by-row loop. ``torch.func.hessian``
(``jacfwd(jacrev)``, i.e. vmap of forward-over-reverse) is NOT used: on torch 2.13 it is right on
the MLP/CNN but wrong by up to ~8% (relative, in H v) on the LayerNorm + attention models, tiny
GPT-2 included.

Losses: ``F.mse_loss`` is avoided (it breaks torch.func forward-over-reverse on torch 2.13), and
the Hugging Face loss is computed here from the logits (transformers' own loss downcasts float64
logits to float32).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)


# --------------------------------------------------------------------------- tiny models
class MLP(nn.Module):
    """4 -> 6 -> 3 with tanh: 51 parameters."""

    def __init__(self, d_in=4, d_hidden=6, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):  # (B, d_in) -> (B, d_out)
        return self.fc2(torch.tanh(self.fc1(x)))


class SmallCNN(nn.Module):
    """conv(1->2, 3x3) -> tanh -> avg-pool -> linear(2*3*3 -> 3): 59 parameters on 1x6x6 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):  # (B, 1, 6, 6)
        h = torch.tanh(self.conv(x))  # (B, 2, 4, 4)
        h = F.avg_pool2d(h, 2)  # (B, 2, 2, 2)
        return self.fc(h.flatten(1))


class Block(nn.Module):
    """Pre-LayerNorm causal self-attention block (one head) + MLP."""

    def __init__(self, d):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):  # (B, T, C)
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)  # (B, T, C) each
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True)
        x = x + self.proj(a.squeeze(1))
        return x + self.fc(torch.tanh(self.ln2(x)))


class TinyTransformer(nn.Module):
    """Causal LM: embedding(V, d) + learned positions, ``n_layer`` blocks, final LayerNorm, head."""

    def __init__(self, vocab=7, d=4, n_layer=1, max_len=8):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(max_len, d))
        self.blocks = nn.ModuleList([Block(d) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):  # (B, T) -> (B, T, V)
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def perturb_(model: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """Move LayerNorm weights/biases off their (1, 0) init so their Hessian rows are generic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(scale * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.add_(scale * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
    return model


# --------------------------------------------------------------------------- losses
def mse_loss(model, batch):
    """Mean squared error with the batch size as weight (so the dataset loss is a per-example mean).

    Written by hand: ``F.mse_loss`` breaks torch.func forward-over-reverse on torch 2.13
    ("ZeroTensors are immutable"; see test_operators.test_jvp_mse_loss_error_is_explained).
    """
    x, y = batch
    return ((model(x) - y) ** 2).mean(), x.shape[0]


def ce_loss(model, batch):
    """Cross-entropy (classification), weight = number of examples."""
    x, y = batch
    return F.cross_entropy(model(x), y), x.shape[0]


def lm_loss(model, batch):
    """Next-token cross-entropy of a causal LM, weight = number of predicted tokens."""
    idx = batch  # (B, T)
    logits = model(idx)[:, :-1]  # (B, T-1, V)
    tgt = idx[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)), tgt.numel()


def hf_loss(model, batch):
    """Next-token cross-entropy of a Hugging Face causal LM, computed here from the logits.

    Not ``model(..., labels=...).loss``: transformers' ``ForCausalLMLoss`` upcasts logits with
    ``.float()``, i.e. *down*casts float64 to float32, which limits every float64 check to ~1e-7.
    """
    logits = model(input_ids=batch).logits[:, :-1]  # (B, T-1, V)
    tgt = batch[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)), tgt.numel()


def plain_loss(model, batch):
    """Unweighted loss (loss_fn returning a bare scalar: every batch has weight 1)."""
    x, y = batch
    return ((model(x) - y) ** 2).mean()


# --------------------------------------------------------------------------- problems
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_problem(kind: str, dtype=torch.float64, seed: int = 0):
    """(model, loss_fn, batches) for ``kind`` in mlp | cnn | transformer | transformer2 | plain.

    Batches have unequal sizes (so the weighted average differs from a plain mean).
    """
    torch.manual_seed(seed)
    g = _gen(seed + 1)
    if kind in ("mlp", "plain"):
        model = MLP()
        sizes = [3, 5, 2]
        batches = [(torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)) for n in sizes]
        loss = mse_loss if kind == "mlp" else plain_loss
    elif kind == "cnn":
        model = SmallCNN()
        sizes = [2, 3]
        batches = [(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]
        loss = ce_loss
    elif kind in ("transformer", "transformer2"):
        model = perturb_(TinyTransformer(n_layer=1 if kind == "transformer" else 2))
        shapes = [(1, 6), (2, 5)]
        batches = [torch.randint(0, 7, s, generator=g) for s in shapes]
        loss = lm_loss
    else:
        raise ValueError(kind)
    model = model.to(dtype)
    batches = [_cast(b, dtype) for b in batches]
    model.eval()
    return model, loss, batches


def make_hf_problem(arch: str = "gpt2", attn: str = "eager", dtype=torch.float64, seed: int = 0):
    """A tiny Hugging Face causal LM built from a config (n_embd 8/16, vocab 11, 1 layer)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=11, n_positions=16, n_embd=8, n_layer=1, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
            tie_word_embeddings=True,
        )
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=attn)
    else:
        raise ValueError(arch)
    model = model.to(dtype).eval()
    perturb_(model)
    g = _gen(seed + 1)
    batches = [torch.randint(0, 11, s, generator=g) for s in [(1, 5), (2, 4)]]
    return model, hf_loss, batches


def _cast(b, dtype):
    if isinstance(b, torch.Tensor):
        return b.to(dtype) if b.is_floating_point() else b
    return type(b)(_cast(t, dtype) for t in b)


# --------------------------------------------------------------------------- references
def flat_loss_fn(model, loss_fn, batches, names=None):
    """``f(θ_flat)`` = the weighted dataset-average loss, plus (names, shapes) of the layout."""
    params = dict(model.named_parameters())
    names = list(names) if names is not None else [n for n, p in params.items() if p.requires_grad]
    shapes = [params[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]
    others = {n: p.detach() for n, p in params.items() if n not in names}
    buffers = dict(model.named_buffers())

    def f(theta):
        parts = theta.split(sizes)
        pd = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        tot, W = 0.0, 0.0
        for b in batches:
            out = loss_fn(_Bound(model, {**others, **buffers, **pd}), b)
            loss, w = (out if isinstance(out, tuple) else (out, 1.0))
            tot = tot + loss * float(w)
            W += float(w)
        return tot / W

    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    return f, theta0, names, shapes


class _Bound:
    """Calls ``model`` with the parameters in ``pd`` (a stand-in for the model inside loss_fn)."""

    def __init__(self, model, pd):
        self.model, self.pd = model, pd

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.pd, args, kwargs)


def dense_hessian(model, loss_fn, batches, names=None, how: str = "autograd") -> torch.Tensor:
    """Dense Hessian of the dataset-averaged loss w.r.t. the flat parameters (float64 in, float64 out).

    how="autograd" (the reference everywhere): ``torch.autograd.functional.hessian``, reverse over
    reverse with the rows batched (``vectorize=True``); how="autograd-loop": the same, one row per
    backward pass, no vmap (slow; equal to the batched one to ~1e-15). how="func": ``torch.func.hessian``
    (``jacfwd(jacrev)``, i.e. vmap of jvp-over-vjp): right on MLP/CNN, but on torch 2.13 wrong by
    up to ~8% (relative, in ``H @ v``) on models with LayerNorm + attention, so not used as truth
    (``test_operators.test_reference_hessian_is_right`` shows both facts).
    """
    f, theta0, _, _ = flat_loss_fn(model, loss_fn, batches, names)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        if how == "func":
            H = torch.func.hessian(f)(theta0)
        elif how == "autograd":
            H = torch.autograd.functional.hessian(f, theta0, vectorize=True)
        elif how == "autograd-loop":
            H = torch.autograd.functional.hessian(f, theta0, vectorize=False)
        else:
            raise ValueError(how)
    H = H.detach()
    return 0.5 * (H + H.T)


def flatten(v) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in v])


def unflatten(x: torch.Tensor, like) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        n = p.numel()
        out.append(x[i : i + n].reshape(p.shape).to(p.dtype))
        i += n
    return out


def known_spectrum_matrix(eigs, seed=0, dtype=torch.float64):
    """``Q diag(eigs) Q^T`` with a seeded random orthogonal Q: a dense symmetric matrix with known spectrum."""
    eigs = torch.as_tensor(np.asarray(eigs, dtype=np.float64))
    n = eigs.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    H = (Q * eigs) @ Q.T
    return (0.5 * (H + H.T)).to(dtype)


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
