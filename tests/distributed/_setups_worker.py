"""The FSDP2 setups real training stacks use, launched by ``test_setups.py`` (not collected).

    python _setups_worker.py ref OUT.json                              # one plain process
    torchrun --standalone --nproc-per-node 2 _setups_worker.py sharded OUT.json

``ref`` computes, unsharded, what every setup must reproduce: for the tiny transformer (3 blocks
in ``blocks``, vocab 11 and width 6 so that rows shard unevenly) and a tiny Hugging Face Llama
(2 decoder layers, hidden 16, in training mode so that its checkpointing is active), an fd
HVP at a fixed step, the exact HVP, and the Ritz values of a short Lanczos run.

``sharded`` builds the same models at world size 2 in each setup (one launch: torchrun starts
once) and records the same quantities, the parameters' bit-for-bit identity after the products,
and which modules ended up as FSDP2 modules:

- ``shard_model``: the library's default sharding (the baseline);
- ``offload``: the user's ``fully_shard(..., offload_policy=CPUOffloadPolicy(pin_memory=False))``
  per block and on the root (pinned memory needs an accelerator: FSDP2 refuses it on CPU);
- ``no_reshard``: ``shard_model(model, reshard_after_forward=False)``;
- ``ckpt``, ``ckpt_reentrant``: ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=...)``
  around each (sharded) block's call, so FSDP2's hooks run again in the recomputation;
- ``ckpt_inner``: the checkpoint inside each block's ``forward`` (FSDP2's hooks outside it, the
  ``checkpoint_wrapper`` layout);
- ``user_every_other``: the user's own ``fully_shard`` on blocks 0 and 2 only, then the root,
  on a named mesh of their own;
- ``user_linear``: the user's own ``fully_shard`` on every ``nn.Linear`` (a finer block choice),
  then the root, with ``reshard_after_forward=False`` on the root only;
- ``hf_ckpt``: the Llama with ``gradient_checkpointing_enable()`` (non-reentrant, HF's default),
  sharded by ``shard_model``, in training mode.

Every rank reads row ``rank`` of each 2-row batch of the global data; rank 0 writes full
(gathered) vectors. Sharded setups that must be refused are recorded with their error text.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch.utils.checkpoint import checkpoint

torch.set_num_threads(1)

from hessian_spectra import HessianOperator, lanczos, random_probe
from hessian_spectra import distributed as D
from hessian_spectra.testing import Block, TinyTransformer, hf_loss, lm_loss, perturb_

VOCAB, WIDTH, LAYERS, SEQ, ROWS, NUM_BATCHES = 11, 6, 3, 6, 2, 2
EPS = 1e-4
LANCZOS_STEPS = 5


class CkptTransformer(TinyTransformer):
    """The tiny transformer with every block call under ``torch.utils.checkpoint``."""

    def __init__(self, use_reentrant: bool, **kw):
        super().__init__(**kw)
        self.use_reentrant = use_reentrant

    def forward(self, idx):
        """The next-token logits (B, T, V); block activations recomputed in backward."""
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=self.use_reentrant)
        return self.head(self.ln_f(x))


class CkptBlock(Block):
    """A block that checkpoints its own body (hooks on the block stay outside the checkpoint)."""

    def forward(self, x):
        """The block's output, its activations recomputed in backward."""
        return checkpoint(super().forward, x, use_reentrant=False)


def build(kind: str = "plain", seed: int = 0) -> torch.nn.Module:
    """The same parameters (same seed, same creation order) for every ``kind``."""
    torch.manual_seed(seed)
    kw = {"vocab": VOCAB, "d": WIDTH, "n_layer": LAYERS, "max_len": SEQ}
    if kind == "plain":
        model = TinyTransformer(**kw)
    elif kind in ("ckpt", "ckpt_reentrant"):
        model = CkptTransformer(use_reentrant=kind == "ckpt_reentrant", **kw)
    elif kind == "ckpt_inner":
        model = TinyTransformer(**kw)
        for b in model.blocks:
            b.__class__ = CkptBlock
    else:
        raise ValueError(kind)
    return perturb_(model).double().eval()


def build_hf(checkpointing: bool, seed: int = 0, use_reentrant: bool = False) -> torch.nn.Module:
    """A tiny float64 Llama (2 layers, hidden 16), optionally with HF activation checkpointing
    (``gradient_checkpointing_enable()``: non-reentrant unless ``use_reentrant``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=SEQ,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).to(torch.float64)
    perturb_(model)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5
            kwargs = {"use_reentrant": True} if use_reentrant else None
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def global_data() -> list[torch.Tensor]:
    """``NUM_BATCHES`` batches of token ids, each (ROWS, SEQ)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (ROWS, SEQ), generator=g) for _ in range(NUM_BATCHES)]


def local_data() -> list[torch.Tensor]:
    """This rank's rows of every global batch (all of them in one process)."""
    n, r = D.world_size(), D.rank()
    return [b[ROWS * r // n : ROWS * (r + 1) // n] for b in global_data()]


def full(op, vec) -> list[float]:
    """The whole vector (concatenated, flattened, float64) from its local shards."""
    from torch.distributed.tensor import DTensor

    out = []
    for p, t in zip(op.params, vec):
        if D.is_sharded(p):
            t = DTensor.from_local(
                t.to(p.dtype), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            ).full_tensor()
        out.append(t.detach().double().reshape(-1).cpu())
    return torch.cat(out).tolist()


def inner_module(model) -> torch.nn.Module:
    """A module inside the first block: it starts twice per batch in a gradient pass when the
    block is checkpointed (forward, then the recomputation in backward), else once. (A forward
    *pre*-hook counts it: the recomputation may stop early, inside the module, once it has
    every tensor backward needs.)"""
    if hasattr(model, "blocks"):
        return model.blocks[0].qkv
    return model.model.layers[0].mlp


def measure(model, loss_fn, *, methods=("fd",), train_mode=False) -> dict:
    """HVPs (fd at ``EPS``; ``exact``/``jvp`` where asked), Ritz values of a short Lanczos run
    on the fd operator, whether the parameters and the loss are bit-for-bit unchanged, and how
    often the first block's inside ran per batch in a gradient pass (2: checkpointed)."""
    batches = local_data()
    op = HessianOperator(
        model, loss_fn, batches, eps=EPS, fd_calibration=False, train_mode=train_mode
    )
    before = [D.local(p).detach().clone() for p in op.params]
    with torch.no_grad():
        loss_before = float(loss_fn(model, batches[0])[0])
    v = random_probe(op, 11, dtype=torch.float64)
    res = {"sharded": op.sharded, "num_params": op.num_params}
    for method in methods:
        res[f"hvp_{method}"] = full(op, op.matvec(v, method=method))
    res["ritz"] = lanczos(op, LANCZOS_STEPS, seed=3).ritz_values.tolist()
    calls = []
    hook = inner_module(model).register_forward_pre_hook(lambda *a: calls.append(1))
    op.gradient()
    hook.remove()
    res["forwards_per_batch"] = len(calls) / len(batches)
    same = all(torch.equal(a, D.local(p)) for a, p in zip(before, op.params))
    with torch.no_grad():
        same = same and float(loss_fn(model, batches[0])[0]) == loss_before
    res["params_identical"] = D.all_gather_object(bool(same))
    return res


def fsdp_module_names(model) -> list[str]:
    """The names of the modules that are FSDP2 modules ("" for the root)."""
    from torch.distributed.fsdp import FSDPModule

    return [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]


def reference() -> dict:
    """Everything one plain process gives (module docstring)."""
    res = {"world_size": D.world_size()}
    res["plain"] = measure(build("plain"), lm_loss, methods=("fd", "exact", "jvp"))
    for kind in ("ckpt", "ckpt_inner"):
        res[kind] = measure(build(kind), lm_loss, methods=("fd", "exact"))
    res["ckpt_reentrant"] = measure(build("ckpt_reentrant"), lm_loss)
    res["hf"] = measure(build_hf(False), hf_loss, methods=("fd", "exact"), train_mode=True)
    res["hf_ckpt"] = measure(build_hf(True), hf_loss, methods=("fd", "exact"), train_mode=True)
    return res


def frozen_inputs(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze the embeddings, so that no input of the first checkpointed block requires grad."""
    model.tok.weight.requires_grad_(False)
    model.pos.requires_grad_(False)
    return model


def error_of(fn) -> str | None:
    """The ``TypeName: message`` that ``fn()`` raised (None if it returned)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        return f"{type(e).__name__}: {e}"
    return None


def run_ref(out_path):
    """Write :func:`reference` as JSON."""
    D.write_json0(out_path, reference())


def run_sharded(out_path):
    """Every setup at this world size (module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    res = {"world_size": D.world_size()}

    def record(name, model, loss_fn=lm_loss, **kw):
        r = measure(model, loss_fn, **kw)
        r["fsdp_modules"] = fsdp_module_names(model)
        res[name] = r

    record("shard_model", D.shard_model(build("plain")))

    model = build("plain")
    for b in model.blocks:
        fully_shard(b, offload_policy=CPUOffloadPolicy(pin_memory=False))
    fully_shard(model, offload_policy=CPUOffloadPolicy(pin_memory=False))
    record("offload", model)
    res["offload"]["param_devices"] = sorted({str(D.local(p).device) for p in model.parameters()})

    record("no_reshard", D.shard_model(build("plain"), reshard_after_forward=False))
    for kind in ("ckpt", "ckpt_reentrant", "ckpt_inner"):
        record(kind, D.shard_model(build(kind)))

    model = build("plain")
    mesh = init_device_mesh("cpu", (D.world_size(),), mesh_dim_names=("dp_shard",))
    fully_shard(model.blocks[0], mesh=mesh)
    fully_shard(model.blocks[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    record("user_every_other", model)

    model = build("plain")
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    fully_shard(model, reshard_after_forward=False)
    record("user_linear", model)

    record("hf_ckpt", D.shard_model(build_hf(True)), hf_loss, train_mode=True)

    # -- what cannot work must say so, on every rank
    model = build("plain")
    for b in model.blocks:  # no fully_shard on the root: its parameters stay plain tensors
        fully_shard(b)
    res["rootless_error"] = D.all_gather_object(
        error_of(lambda: HessianOperator(model, lm_loss, local_data()))
    )
    model = D.shard_model(frozen_inputs(build("ckpt_reentrant")))
    op = HessianOperator(model, lm_loss, local_data(), eps=EPS, fd_calibration=False)
    v = random_probe(op, 11, dtype=torch.float64)
    before = [D.local(p).detach().clone() for p in op.params]
    res["reentrant_frozen_error"] = D.all_gather_object(error_of(lambda: op.matvec(v)))
    res["reentrant_frozen_params_identical"] = D.all_gather_object(
        all(torch.equal(a, D.local(p)) for a, p in zip(before, op.params))
    )
    D.write_json0(out_path, res)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    sys.exit(D.launch({"ref": run_ref, "sharded": run_sharded}[mode], out))
