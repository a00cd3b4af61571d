"""One run of the distributed checks, launched by ``test_fsdp.py`` (not collected by pytest).

    python _worker.py main OUT.json                         # plain single process, unsharded
    torchrun --standalone --nproc-per-node N _worker.py main OUT.json   # FSDP2, N ranks
    torchrun ... _worker.py fail OUT.json                    # rank 1 raises inside an HVP
    torchrun ... _worker.py hang OUT.json                    # rank 1 never joins (timeout)
    torchrun ... _worker.py weights OUT.json                 # each rank seeds its own model
    torchrun ... _worker.py uneven OUT.json                  # 3 whole batches over N ranks

The model is a tiny float64 Llama (2 decoder layers, vocab 61 so that rows shard unevenly)
built from a config with a fixed seed, so every run holds the same parameters. The GLOBAL data
is 3 batches of 2 sequences; with N ranks, rank r reads rows [2r/N, 2(r+1)/N) of each batch,
and the labels (-100 = no target) give the ranks unequal numbers of target tokens. The loss of
a batch is its mean token cross-entropy with weight = its number of target tokens, so the
operator's objective is the mean over all target tokens of the global data at every N.

Rank 0 writes everything as full (gathered) flat vectors to OUT.json; the test compares runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from hessian_spectra import (
    HessianOperator,
    block_diagonal_test,
    cg_solve,
    lanczos,
    random_probe,
    slq,
    top_eigenvalues,
    trace,
)
from hessian_spectra import distributed as D
from hessian_spectra import vectors as V

VOCAB, SEQ, ROWS, NUM_BATCHES = 61, 10, 2, 3


def build_model(dtype=torch.float64, tied=False, seed=0):
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
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def global_data():
    """3 batches of (input_ids (2, SEQ), labels (2, SEQ)); row 1 has few targets."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (NUM_BATCHES, ROWS, SEQ), generator=g)
    labels = ids.clone()
    labels[:, 1, : SEQ - 3] = -100  # row 1: 2 targets per batch (after the shift) vs row 0: 9
    labels[1, 0, :4] = -100  # and batch 1's row 0 only 5
    return [(ids[b], labels[b]) for b in range(NUM_BATCHES)]


def local_data(batches):
    n, r = D.world_size(), D.rank()
    lo, hi = ROWS * r // n, ROWS * (r + 1) // n
    return [(ids[lo:hi], lab[lo:hi]) for ids, lab in batches]


def loss_fn(model, batch):
    ids, labels = batch  # (B, T)
    logits = model(input_ids=ids).logits  # (B, T, V)
    tgt = labels[:, 1:].reshape(-1)
    n = (tgt != -100).sum()
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tgt, ignore_index=-100, reduction="sum"
    )
    return loss / n.clamp_min(1), n


def full(op, vec):
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


def run_main(out_path):
    res = {"world_size": D.world_size(), "initialized": D.is_initialized()}
    t0 = time.perf_counter()
    model = D.shard_model(build_model())
    batches = local_data(global_data())
    op = HessianOperator(model, loss_fn, batches)
    res["sharded"] = op.sharded
    res["param_names"] = op.param_names
    res["num_params"] = op.num_params
    res["grad_scale"] = op.objective.grad_scale
    res["local_numel"] = D.all_gather_object(sum(D.local(p).numel() for p in op.params))

    # -- probes: the same global vector at every world size (also with tiny blocks that
    #    straddle shard boundaries)
    res["probe_rademacher"] = full(op, random_probe(op, 5))
    res["probe_gaussian"] = full(op, random_probe(op, 6, kind="gaussian", dtype=torch.float64))
    saved_block = V._PROBE_BLOCK
    V._PROBE_BLOCK = 7
    res["probe_block7"] = full(op, random_probe(op, 5))
    V._PROBE_BLOCK = saved_block
    # DTensor's private placement helper unavailable (a future torch): local_flat_range gives
    # None and the probe is cut from a full draw instead, the same vector
    from hessian_spectra.distributed import shards

    saved_helper = shards.local_shape_and_offset
    shards.local_shape_and_offset = lambda p: None
    try:
        res["flat_ranges_fallback"] = [D.local_flat_range(p) for p in op.params]
        res["probe_rademacher_fallback"] = full(op, random_probe(op, 5))
    finally:
        shards.local_shape_and_offset = saved_helper

    # -- HVPs and gradient; parameters bit-identical afterwards (local shards on every rank,
    #    and the loss of a forward pass, which all-gathers them again)
    before = [D.local(p).detach().clone() for p in op.params]
    with torch.no_grad():
        loss_before = float(loss_fn(model, batches[0])[0])
    v = random_probe(op, 11, dtype=torch.float64)
    res["hvp_eps1e-4"] = full(op, op.matvec(v, eps=1e-4))
    res["hvp_default"] = full(op, op.matvec(v))
    res["eps_default"] = op.eps_for(v)
    loss, g = op.gradient()
    res["loss"], res["grad"] = loss, full(op, g)
    same = all(torch.equal(a, D.local(p)) for a, p in zip(before, op.params))
    with torch.no_grad():
        loss_after = float(loss_fn(model, batches[0])[0])
    res["params_identical"] = D.all_gather_object(bool(same and loss_after == loss_before))
    if not op.sharded:
        res["hvp_exact"] = full(op, op.matvec(v, method="exact"))

    # -- blocks kept gathered after forward: the FD step must still reach them
    model2 = D.shard_model(build_model(), reshard_after_forward=False)
    op2 = HessianOperator(model2, loss_fn, batches)
    res["hvp_no_reshard"] = full(op2, op2.matvec(v, eps=1e-4))
    del model2, op2

    # -- tied input/output embeddings (SmolLM2 and most small LLMs): one shared parameter
    model3 = D.shard_model(build_model(tied=True))
    op3 = HessianOperator(model3, loss_fn, batches)
    res["tied_num_tensors"] = len(op3.params)
    res["hvp_tied"] = full(op3, op3.matvec(random_probe(op3, 11, dtype=torch.float64), eps=1e-4))
    del model3, op3

    # -- part of the model frozen (requires_grad=False): sharded too, and left out of op.params
    model4 = build_model()
    model4.model.embed_tokens.weight.requires_grad_(False)
    model4 = D.shard_model(model4)
    op4 = HessianOperator(model4, loss_fn, batches)
    res["frozen_param_names"] = op4.param_names
    res["hvp_frozen"] = full(op4, op4.matvec(random_probe(op4, 11, dtype=torch.float64), eps=1e-4))
    del model4, op4

    # -- Lanczos (full / window 2 + bf16 basis), checkpoint resume, SLQ, trace, eigs
    r = lanczos(op, 6, seed=3)
    res["lanczos_full"] = [r.alpha.tolist(), r.beta.tolist()]
    r = lanczos(op, 6, seed=3, reorth=2, basis_dtype=torch.bfloat16)
    res["lanczos_window_bf16"] = [r.alpha.tolist(), r.beta.tolist()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = D.broadcast_object(tmp)  # the same path on every rank (rank 0's directory)
        ck = os.path.join(tmp, "lz.pt")

        class Stop(Exception):
            pass

        def stop_at_3(j, a, b):
            if j == 3:
                raise Stop

        try:
            lanczos(op, 6, seed=3, checkpoint=ck, callback=stop_at_3)
        except Stop:
            pass
        res["checkpoint_files"] = D.all_gather_object(
            sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []
        )
        r = lanczos(op, 6, seed=3, checkpoint=ck)
        res["lanczos_resumed"] = [r.alpha.tolist(), r.beta.tolist()]
        D.barrier()  # every rank is done with rank 0's directory before it goes
    dens = slq(op, 5, 2, seed=7)
    res["slq_nodes"], res["slq_weights"] = dens.nodes.tolist(), dens.weights.tolist()
    res["trace"] = float(trace(op, 2, seed=9)[0])
    res["eigs"] = top_eigenvalues(op, 2, num_steps=8, seed=1).largest.tolist()
    rep = block_diagonal_test(op, num_probes=1, seed=2)
    res["blockdiag"] = [
        [row.block, row.num_params, row.rel_error, row.cosine] for row in rep.blocks
    ]
    x, _ = cg_solve(op, g, damping=1.0, max_iter=4)
    res["cg_x"] = full(op, x)

    # -- what must fail, and fail clearly on every rank
    if op.sharded:
        try:
            HessianOperator(model, loss_fn, batches, method="exact")
            res["exact_error"] = None
        except NotImplementedError as e:
            res["exact_error"] = str(e)
        try:
            op.matvec(v, method="jvp")
            res["jvp_error"] = None
        except NotImplementedError as e:
            res["jvp_error"] = str(e)
        uneven = batches + batches[:1] if D.rank() == 1 else batches
        try:
            HessianOperator(model, loss_fn, uneven).matvec(v)
            res["uneven_error"] = None
        except ValueError as e:
            res["uneven_error"] = str(e)
        res["uneven_errors_all_ranks"] = D.all_gather_object(res["uneven_error"] is not None)
        # a user-chosen FSDP2 gradient divide factor (here: plain sums) is accounted for
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
        op3 = HessianOperator(model, loss_fn, batches)
        res["grad_scale_factor1"] = op3.objective.grad_scale
        res["hvp_factor1"] = full(op3, op3.matvec(v, eps=1e-4))
        # FSDP2's private state unreadable (a future torch): the default is assumed, with a warning
        import warnings

        from hessian_spectra.distributed import _private

        saved = _private.gradient_divide_factors
        _private.gradient_divide_factors = lambda module: None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res["grad_scale_unreadable"] = D.gradient_scale(model)
        finally:
            _private.gradient_divide_factors = saved
        res["grad_scale_unreadable_warnings"] = [
            f"{w.category.__name__}: {w.message}" for w in caught
        ]
        # factors that differ between FSDP modules: refused (the operator needs one)
        next(m for m in model.modules() if isinstance(m, FSDPModule)).set_gradient_divide_factor(
            3.0
        )
        try:
            D.gradient_scale(model)
            res["grad_scale_mixed_error"] = None
        except ValueError as e:
            res["grad_scale_mixed_error"] = str(e)

    res["seconds"] = time.perf_counter() - t0
    D.write_json0(out_path, res)


def run_fail(out_path):
    """Rank 1 raises in the middle of the second HVP while rank 0 is inside a collective."""
    model = D.shard_model(build_model())
    batches = local_data(global_data())
    calls = {"n": 0}

    def bad_loss(model, batch):
        calls["n"] += 1
        if D.rank() == 1 and calls["n"] == 8:
            raise RuntimeError("deliberate failure on rank 1")
        return loss_fn(model, batch)

    op = HessianOperator(model, bad_loss, batches)
    v = random_probe(op, 1)
    for _ in range(3):
        op.matvec(v)
    D.write_json0(out_path, {"finished": True})  # must not get here


def run_hang(out_path):
    """Rank 1 never reaches the first collective: rank 0 must time out, not wait forever."""
    model = D.shard_model(build_model())
    batches = local_data(global_data())
    if D.rank() == 1:
        time.sleep(300)
    op = HessianOperator(model, loss_fn, batches)
    op.matvec(random_probe(op, 1))
    D.write_json0(out_path, {"finished": True})


def run_weights(out_path):
    """Every rank seeds its own model (seed = rank), as an unseeded factory would do: sharding
    must refuse on every rank; with broadcast_from_rank0=True it must shard rank 0's model."""
    import logging

    res = {}
    try:
        D.shard_model(build_model(seed=D.rank()))
        res["refused"] = None
    except ValueError as e:
        res["refused"] = str(e)
    res["refused_all_ranks"] = D.all_gather_object(res["refused"])

    # ranks that build different architectures are refused before any per-tensor collective
    try:
        D.shard_model(torch.nn.Linear(2, 3 + D.rank()))
        res["layout_refused"] = None
    except ValueError as e:
        res["layout_refused"] = str(e)
    res["layout_refused_all_ranks"] = D.all_gather_object(res["layout_refused"])

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("hessian_spectra.distributed")
    logger.addHandler(Keep())
    model = D.shard_model(build_model(seed=D.rank()), broadcast_from_rank0=True)
    res["broadcast_logs"] = D.all_gather_object(records)
    batches = local_data(global_data())
    op = HessianOperator(model, loss_fn, batches)
    v = random_probe(op, 11, dtype=torch.float64)
    res["hvp_broadcast"] = full(op, op.matvec(v, eps=1e-4))
    loss, g = op.gradient()
    res["loss_broadcast"], res["grad_broadcast"] = loss, full(op, g)
    D.write_json0(out_path, res)


def run_uneven(out_path):
    """The global data's 3 whole batches split over the ranks with partition.shard_batches
    (at world size 2: rank 0 gets 2 batches, rank 1 one and a ZeroWeight pad)."""
    from hessian_spectra.partition import shard_batches

    model = D.shard_model(build_model())
    batches = shard_batches(global_data(), D.rank(), D.world_size())
    res = {"world_size": D.world_size(), "num_local_batches": D.all_gather_object(len(batches))}
    op = HessianOperator(model, loss_fn, batches)
    v = random_probe(op, 11, dtype=torch.float64)
    res["hvp_eps1e-4"] = full(op, op.matvec(v, eps=1e-4))
    loss, g = op.gradient()
    res["loss"], res["grad"] = loss, full(op, g)
    r = lanczos(op, 6, seed=3)
    res["lanczos_full"] = [r.alpha.tolist(), r.beta.tolist()]
    D.write_json0(out_path, res)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    fn = {
        "main": run_main,
        "fail": run_fail,
        "hang": run_hang,
        "weights": run_weights,
        "uneven": run_uneven,
    }[mode]
    sys.exit(D.launch(fn, out))
