"""One run of the distributed GGN checks, launched by ``test_ggn_fsdp.py`` (not collected).

    python _ggn_worker.py OUT.json                                   # plain, unsharded
    torchrun --standalone --nproc-per-node N _ggn_worker.py OUT.json # FSDP2, N ranks

The model, global data and per-rank split are those of ``_worker.py`` (a tiny float64 Llama,
rows of 3 batches split over the ranks with unequal target-token counts). Rank 0 writes the
full (gathered) vectors of the fd GGN product (and, unsharded, the exact one), the per-block
SLQ nodes and the trace estimates.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from _worker import build_model, full, global_data, local_data

from hessian_spectra import GGNOperator, per_block_slq, random_probe, trace
from hessian_spectra import distributed as D


def forward_fn(model, batch):
    return model(input_ids=batch[0]).logits  # (B, T, V)


def loss_of_output_fn(logits, batch):
    tgt = batch[1][:, 1:].reshape(-1)
    n = (tgt != -100).sum()
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tgt, ignore_index=-100, reduction="sum"
    )
    return loss / n.clamp_min(1), n


def run(out_path):
    model = D.shard_model(build_model())
    batches = local_data(global_data())
    op = GGNOperator(model, forward_fn, loss_of_output_fn, batches, method="fd")
    before = [D.local(p).detach().clone() for p in op.params]
    v = random_probe(op, 11, dtype=torch.float64)
    res = {"world_size": D.world_size(), "sharded": op.sharded, "num_params": op.num_params}
    res["ggn_fd_eps1e-4"] = full(op, op.matvec(v, eps=1e-4))
    res["ggn_fd_default"] = full(op, op.matvec(v))
    res["params_identical"] = D.all_gather_object(
        all(torch.equal(a, D.local(p)) for a, p in zip(before, op.params))
    )
    if not op.sharded:
        res["ggn_exact"] = full(op, op.matvec(v, method="exact"))
    res["trace_xtrace"] = list(trace(op, 6, method="xtrace", seed=3))
    res["trace_hutchpp"] = list(trace(op, 6, method="hutch++", seed=3))
    dens = per_block_slq(op, 4, 1, blocks={"layer0": ["model.layers.0.*"], "head": ["lm_head.*"]})
    res["per_block_nodes"] = {k: d.nodes.tolist() for k, d in dens.items()}
    D.write_json0(out_path, res)


if __name__ == "__main__":
    sys.exit(D.launch(run, sys.argv[1]))
