"""Dense references and small problems: check an operator (ours or yours) against ground truth.

Everything here is computed independently of the package's operators: the weighted loss is
written as a function of ONE flat float64 parameter vector (``torch.func.functional_call``) and
differentiated twice with ``torch.autograd.functional.hessian`` (reverse over reverse). Use it to
check your own operator, loss or model on a problem small enough for a dense matrix:

>>> import torch
>>> import hessian_spectra as hs
>>> from hessian_spectra.testing import dense_hessian, flatten, make_problem, unflatten
>>> model, loss_fn, batches = make_problem("mlp")
>>> H = dense_hessian(model, loss_fn, batches)          # (51, 51), float64
>>> op = hs.HessianOperator(model, loss_fn, batches, method="exact")
>>> v = torch.linspace(-1, 1, H.shape[0], dtype=torch.float64)
>>> bool(torch.allclose(flatten(op @ unflatten(v, op.params)), H @ v, atol=1e-12))
True

Contents: the references :func:`dense_hessian`, :func:`dense_ggn` (``J^T H_out J``) and
:func:`dense_empirical_fisher` (``Σ_n w_n g_n g_n^T / Σ_n w_n``), the
flat layout helpers :func:`flatten` / :func:`unflatten`, :func:`known_spectrum_matrix`, and the
tiny models and problems the package's own tests share (:func:`make_problem`,
:func:`make_hf_problem`). ``torch.func.hessian`` (``jacfwd(jacrev)``) is deliberately not the
reference: on torch 2.13 it is right on an MLP or CNN but off by up to ~8% (relative, in ``H v``)
on LayerNorm + attention models.

``F.mse_loss`` is avoided in the losses here (its mean reduction breaks torch.func
forward-over-reverse on torch 2.13), and the Hugging Face loss is computed from the logits
(transformers' own loss downcasts float64 logits to float32).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MLP",
    "SmallCNN",
    "TinyTransformer",
    "ce_loss",
    "dense_empirical_fisher",
    "dense_ggn",
    "dense_hessian",
    "flat_loss_fn",
    "flatten",
    "hf_loss",
    "known_spectrum_matrix",
    "lm_loss",
    "make_hf_problem",
    "make_problem",
    "mse_loss",
    "perturb_",
    "plain_loss",
    "save_tiny_llama",
    "unflatten",
]


# --------------------------------------------------------------------------- tiny models
class MLP(nn.Module):
    """4 -> 6 -> 3 with tanh: 51 parameters.

    >>> sum(p.numel() for p in MLP().parameters())
    51
    """

    def __init__(self, d_in=4, d_hidden=6, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):  # (B, d_in) -> (B, d_out)
        """The outputs (B, d_out)."""
        return self.fc2(torch.tanh(self.fc1(x)))


class SmallCNN(nn.Module):
    """conv(1->2, 3x3) -> tanh -> avg-pool -> linear(2*2*2 -> 3): 59 parameters on 1x6x6 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):  # (B, 1, 6, 6)
        """The logits (B, 3)."""
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
        a = F.scaled_dot_product_attention(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True
        )
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
        """The next-token logits (B, T, V)."""
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
                m.weight.add_(
                    scale * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype)
                )
                m.bias.add_(scale * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
    return model


# --------------------------------------------------------------------------- losses
def mse_loss(model, batch):
    """Mean squared error with the batch size as weight (the dataset loss is a per-example mean).

    Written by hand: ``F.mse_loss`` with mean reduction breaks torch.func forward-over-reverse on
    torch 2.13 ("ZeroTensors are immutable").
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
    """Unweighted loss (a bare scalar: every batch has weight 1; the batches must be equal)."""
    x, y = batch
    return ((model(x) - y) ** 2).mean()


# --------------------------------------------------------------------------- problems
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cast(b, dtype):
    if isinstance(b, torch.Tensor):
        return b.to(dtype) if b.is_floating_point() else b
    return type(b)(_cast(t, dtype) for t in b)


def make_problem(kind: str, dtype=torch.float64, seed: int = 0):
    """``(model, loss_fn, batches)`` for ``kind`` in mlp | cnn | transformer | transformer2 | plain.

    The batches of mlp, cnn and the transformers have unequal sizes and their ``loss_fn`` returns
    ``(loss, weight)``, so the weighted average differs from a plain mean of batch losses;
    ``plain`` returns a bare scalar on three equal batches of 4 examples (weight 1 each).

    >>> model, loss_fn, batches = make_problem("mlp")
    >>> [x.shape[0] for x, _ in batches]
    [3, 5, 2]
    """
    torch.manual_seed(seed)
    g = _gen(seed + 1)
    if kind in ("mlp", "plain"):
        model = MLP()
        sizes = [3, 5, 2] if kind == "mlp" else [4, 4, 4]
        batches = [(torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)) for n in sizes]
        loss = mse_loss if kind == "mlp" else plain_loss
    elif kind == "cnn":
        model = SmallCNN()
        sizes = [2, 3]
        batches = [
            (torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
            for n in sizes
        ]
        loss = ce_loss
    elif kind in ("transformer", "transformer2"):
        model = perturb_(TinyTransformer(n_layer=1 if kind == "transformer" else 2))
        shapes = [(1, 6), (2, 5)]
        batches = [torch.randint(0, 7, s, generator=g) for s in shapes]
        loss = lm_loss
    else:
        raise ValueError(
            f"kind must be one of mlp, plain, cnn, transformer, transformer2; got {kind!r}"
        )
    model = model.to(dtype)
    batches = [_cast(b, dtype) for b in batches]
    model.eval()
    return model, loss, batches


def make_hf_problem(arch: str = "gpt2", attn: str = "eager", dtype=torch.float64, seed: int = 0):
    """A tiny Hugging Face causal LM built from a config (n_embd 8, vocab 11, 1 layer), its loss
    (:func:`hf_loss`) and two batches of token ids; ``arch`` is ``"gpt2"`` or ``"llama"``.
    """
    import transformers

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=11,
            n_positions=16,
            n_embd=8,
            n_layer=1,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=11,
            hidden_size=8,
            intermediate_size=12,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
            tie_word_embeddings=True,
        )
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=attn)
    else:
        raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")
    model = model.to(dtype).eval()
    perturb_(model)
    g = _gen(seed + 1)
    batches = [torch.randint(0, 11, s, generator=g) for s in [(1, 5), (2, 4)]]
    return model, hf_loss, batches


# --------------------------------------------------------------------------- layout
def save_tiny_llama(folder, *, vocab_size: int = 320, seed: int = 0):
    """Save a tiny Llama (hidden 32, 2 layers) and a byte-level BPE tokenizer trained on the
    embedded prose to ``folder``: a local Hugging Face checkpoint for ``--model FOLDER``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .data import default_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(default_texts()[:8], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(folder)
    eos = fast.eos_token_id
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def flatten(v) -> torch.Tensor:
    """One flat float64 tensor from a parameter-space vector (a list of tensors).

    >>> flatten([torch.ones(2, 2), torch.zeros(1)])
    tensor([1., 1., 1., 1., 0.], dtype=torch.float64)
    """
    return torch.cat([t.reshape(-1).double() for t in v])


def unflatten(x: torch.Tensor, like) -> list[torch.Tensor]:
    """The inverse of :func:`flatten`: pieces of ``x`` shaped (and typed) like ``like``.

    >>> [t.shape for t in unflatten(torch.arange(5.0), [torch.ones(2, 2), torch.zeros(1)])]
    [torch.Size([2, 2]), torch.Size([1])]
    """
    out, i = [], 0
    for p in like:
        n = p.numel()
        out.append(x[i : i + n].reshape(p.shape).to(p.dtype))
        i += n
    return out


def known_spectrum_matrix(eigs, seed=0, dtype=torch.float64):
    """``Q diag(eigs) Q^T`` with a seeded random orthogonal ``Q``: a symmetric matrix with a known
    spectrum.

    >>> H = known_spectrum_matrix([1.0, 2.0, 5.0])
    >>> [round(float(x), 12) for x in torch.linalg.eigvalsh(H)]
    [1.0, 2.0, 5.0]
    """
    eigs = torch.as_tensor(np.asarray(eigs, dtype=np.float64))
    n = eigs.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    H = (Q * eigs) @ Q.T
    return (0.5 * (H + H.T)).to(dtype)


# --------------------------------------------------------------------------- references
class _Bound:
    """Calls ``model`` with the parameters in ``pd`` (a stand-in for the model inside loss_fn)."""

    def __init__(self, model, pd):
        self.model, self.pd = model, pd

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.pd, args, kwargs)


def _split(out):
    return out if isinstance(out, tuple) else (out, 1.0)


def _layout(model, names):
    params = dict(model.named_parameters())
    names = list(names) if names is not None else [n for n, p in params.items() if p.requires_grad]
    shapes = [params[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]
    others = {n: p.detach() for n, p in params.items() if n not in names}
    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    return names, shapes, sizes, others, theta0


def flat_loss_fn(model, loss_fn, batches, names=None, reduction: str = "mean"):
    """``(f, θ0, names, shapes)``: ``f(θ_flat)`` is the weighted loss of ``batches``,
    ``Σ_b w_b l_b / Σ_b w_b`` (``reduction="mean"``) or ``Σ_b w_b l_b`` (``"sum"``), with the
    model's buffers copied (a train-mode batch norm does not touch the model's own).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    names, shapes, sizes, others, theta0 = _layout(model, names)

    def f(theta):
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        parts = theta.split(sizes)
        pd = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        tot, W = 0.0, 0.0
        for b in batches:
            loss, w = _split(loss_fn(_Bound(model, {**others, **buffers, **pd}), b))
            tot = tot + loss * float(w)
            W += float(w)
        return tot / W if reduction == "mean" else tot

    return f, theta0, names, shapes


def dense_hessian(
    model, loss_fn, batches, names=None, how: str = "autograd", reduction: str = "mean"
) -> torch.Tensor:
    """Dense Hessian of the weighted loss of ``batches`` w.r.t. the flat parameters ``names``
    (default: all with ``requires_grad``), symmetrised; float64 in, float64 out.

    ``how="autograd"`` (the reference): ``torch.autograd.functional.hessian``, reverse over
    reverse with the rows batched (``vectorize=True``); ``"autograd-loop"``: the same, one row per
    backward pass (slow; equal to the batched one to ~1e-15, and works where vmap does not, e.g.
    a train-mode batch norm); ``"func"``: ``torch.func.hessian`` (``jacfwd(jacrev)``), not a
    reference (module docstring). ``reduction`` as in :func:`flat_loss_fn`.

    >>> model, loss_fn, batches = make_problem("mlp")
    >>> dense_hessian(model, loss_fn, batches).shape
    torch.Size([51, 51])
    """
    f, theta0, _, _ = flat_loss_fn(model, loss_fn, batches, names, reduction)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        if how == "func":
            H = torch.func.hessian(f)(theta0)
        elif how == "autograd":
            H = torch.autograd.functional.hessian(f, theta0, vectorize=True)
        elif how == "autograd-loop":
            H = torch.autograd.functional.hessian(f, theta0, vectorize=False)
        else:
            raise ValueError(f"how must be 'autograd', 'autograd-loop' or 'func', got {how!r}")
    H = H.detach()
    return 0.5 * (H + H.T)


def dense_ggn(
    model, forward_fn, loss_of_output_fn, batches, names=None, reduction: str = "mean"
) -> torch.Tensor:
    """Dense generalised Gauss–Newton ``G = Σ_b w_b J_b^T H_out,b J_b / Σ_b w_b`` (``"sum"``:
    without the division), float64: ``J_b`` the Jacobian of ``forward_fn(model, batch)`` w.r.t. the
    flat parameters, ``H_out,b`` the Hessian of ``loss_of_output_fn(outputs, batch)`` (which
    returns a loss or ``(loss, weight)``) w.r.t. the outputs.

    For a loss that is linear in the outputs' second-order terms, e.g. least squares on a linear
    model, the GGN equals the Hessian:

    >>> model = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.zeros(4, 2, dtype=torch.float64)
    >>> fwd = lambda m, b: m(b[0])
    >>> lof = lambda out, b: ((out - b[1]) ** 2).mean()
    >>> G = dense_ggn(model, fwd, lof, [(x, y)])
    >>> H = dense_hessian(model, lambda m, b: lof(fwd(m, b), b), [(x, y)])
    >>> bool(torch.allclose(G, H, atol=1e-12))
    True
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    names, shapes, sizes, others, theta0 = _layout(model, names)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def outputs(theta, batch):
        pd = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return forward_fn(_Bound(model, {**others, **buffers, **pd}), batch)

    G = torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.float64)
    W = 0.0
    for b in batches:
        out0 = outputs(theta0, b).detach()
        J = torch.autograd.functional.jacobian(lambda t, b=b: outputs(t, b).reshape(-1), theta0)
        _, w = _split(loss_of_output_fn(out0, b))

        def lo(o, b=b, shape=out0.shape):
            return _split(loss_of_output_fn(o.reshape(shape), b))[0]

        H_out = torch.autograd.functional.hessian(lo, out0.reshape(-1))
        G += float(w) * (J.T @ H_out @ J)
        W += float(w)
    G = G / W if reduction == "mean" else G
    return 0.5 * (G + G.T)


def dense_empirical_fisher(
    model, loss_fn, batches, names=None, reduction: str = "mean"
) -> torch.Tensor:
    """Dense empirical Fisher ``F = Σ_n w_n g_n g_n^T / Σ_n w_n`` (``"sum"``: without the
    division), float64: one example ``n`` at a time (every tensor of a batch sliced ``[k:k+1]``),
    ``(l_n, w_n) = loss_fn(model, example)`` and ``g_n`` its gradient w.r.t. the flat parameters
    ``names``, by ``torch.autograd.functional.jacobian``.

    >>> model, loss_fn, batches = make_problem("mlp")
    >>> F = dense_empirical_fisher(model, loss_fn, batches)
    >>> F.shape, bool(torch.linalg.eigvalsh(F).min() > -1e-12)   # PSD, rank ≤ 10 examples
    (torch.Size([51, 51]), True)
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    _, theta0, _, _ = flat_loss_fn(model, loss_fn, batches[:1], names)
    F = torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.float64)
    W = 0.0
    for b in batches:
        n = next(t for t in _leaves(b) if isinstance(t, torch.Tensor)).shape[0]
        for k in range(n):
            ex = _slice(b, k)
            f, _, _, _ = flat_loss_fn(model, lambda m, e: _split(loss_fn(m, e))[0], [ex], names)
            w = float(_split(loss_fn(model, ex))[1])
            g = torch.autograd.functional.jacobian(f, theta0)
            F += w * torch.outer(g, g)
            W += w
    F = F / W if reduction == "mean" else F
    return 0.5 * (F + F.T)


def _leaves(b):
    if isinstance(b, dict):
        return [x for v in b.values() for x in _leaves(v)]
    if isinstance(b, (list, tuple)):
        return [x for v in b for x in _leaves(v)]
    return [b]


def _slice(b, k):
    if isinstance(b, torch.Tensor):
        return b[k : k + 1]
    if isinstance(b, dict):
        return {key: _slice(v, k) for key, v in b.items()}
    if isinstance(b, (list, tuple)):
        return type(b)(_slice(v, k) for v in b)
    return b
