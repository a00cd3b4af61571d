"""One run of the HSDP / data-parallel checks, launched by ``test_parallel.py`` (not collected).

    python _parallel_worker.py OUT.json none                          # one plain process
    torchrun --nproc-per-node 4 _parallel_worker.py OUT.json hsdp 2   # a 2 x 2 mesh
    torchrun --nproc-per-node 2 _parallel_worker.py OUT.json dp       # replicated, + errors

The model, loss and GLOBAL data are ``_worker.py``'s (tiny float64 Llama, 3 batches with unequal
target tokens); the batches are split over ALL ranks with ``partition.shard_batches`` (at world
size 4 rank 3 runs a zero-weight pad, at world size 2 rank 1 does). The fd step is fixed
(``eps=1e-4``), so every product is the same function of the same vector at every world size
and the runs may differ by float64 rounding only. Rank 0 writes full (gathered) vectors.
"""

from __future__ import annotations

import sys
import time

import torch

torch.set_num_threads(1)

from _worker import build_model, full, global_data, loss_fn

from hessian_spectra import HessianOperator, lanczos, random_probe, top_eigenvalues, trace
from hessian_spectra import distributed as D
from hessian_spectra import vectors as V
from hessian_spectra.partition import shard_batches

EPS = 1e-4


def run_main(out_path, parallel="none", replicate=None):
    t0 = time.perf_counter()
    replicate = int(replicate) if replicate not in (None, "-") else None
    model = build_model()
    if parallel != "none":
        model = D.parallelize(model, parallel, replicate=replicate)
    batches = shard_batches(global_data(), D.rank(), D.world_size())
    op = HessianOperator(model, loss_fn, batches, eps=EPS)
    lay = op.objective.layout
    res = {
        "world_size": D.world_size(),
        "layout": [lay.parallel, lay.shard_size, lay.replicate_size],
        "placements": [str(p.placements) for p in op.params[:1] if D.is_sharded(p)],
        "num_params": op.num_params,
        "local_numel": D.all_gather_object(sum(D.local(p).numel() for p in op.params)),
        "grad_scale": op.objective.grad_scale,
    }
    before = [D.local(p).detach().clone() for p in op.params]

    # probes: the same global vector; dots and norms count every entry once
    z = random_probe(op, 5, dtype=torch.float64)
    res["probe"] = full(op, z)
    saved_block = V._PROBE_BLOCK
    V._PROBE_BLOCK = 7  # blocks that straddle the shard boundaries
    res["probe_block7"] = full(op, random_probe(op, 5))
    V._PROBE_BLOCK = saved_block
    loss, g = op.gradient()
    res["loss"], res["grad"] = loss, full(op, g)
    res["norm_probe"] = V.norm(z)  # sqrt(num_params) for a Rademacher probe
    res["dot_probe_grad"] = V.dot(z, g)
    res["dots"] = V.dots([z, g], g).tolist()
    res["tensor_norms"] = V.tensor_norms(g)
    res["unit_norm"] = V.norm(V.unit_probe(op, 2))
    res["theta_norms"] = op.objective.theta_norms()

    # products and the solvers built on them
    v = random_probe(op, 11, dtype=torch.float64)
    res["hvp"] = full(op, op.matvec(v))
    r = lanczos(op, 6, seed=3)  # full reorthogonalisation: the basis dots reduce too
    res["lanczos_full"] = [r.alpha.tolist(), r.beta.tolist()]
    res["eigs"] = top_eigenvalues(op, 1, num_steps=6, seed=1).largest.tolist()
    res["trace"] = float(trace(op, 2, seed=9)[0])

    same = all(torch.equal(a, D.local(p)) for a, p in zip(before, op.params))
    res["params_identical"] = D.all_gather_object(same)
    if op.sharded:
        try:
            op.matvec(v, method="exact")
            res["exact_error"] = None
        except NotImplementedError as e:
            res["exact_error"] = str(e)
        from hessian_spectra import EmpiricalFisherOperator

        try:
            EmpiricalFisherOperator(model, loss_fn, batches)
            res["ef_error"] = None
        except (ValueError, NotImplementedError) as e:
            res["ef_error"] = str(e)
    if parallel == "dp":
        res["errors"] = errors()
    res["seconds"] = time.perf_counter() - t0
    D.write_json0(out_path, res)


def _error(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def errors() -> dict:
    """Settings that cannot work raise a clear ValueError on every rank (world size 2)."""
    res = {
        "hsdp_not_divisible": _error(lambda: D.parallelize(build_model(), "hsdp", replicate=3)),
        "hsdp_no_replicate": _error(lambda: D.parallelize(build_model(), "hsdp")),
        "dp_replicate": _error(lambda: D.parallelize(build_model(), "dp", replicate=1)),
        "unknown": _error(lambda: D.parallelize(build_model(), "zero3")),
    }
    # a model sharded by hand on a 2 x 1 mesh whose replicas hold different weights (each rank
    # seeded its own): no shard_model check ran, so the operator's replica check must refuse
    from torch.distributed.fsdp import fully_shard

    mesh = D.make_mesh("dp")
    model = fully_shard(build_model(seed=D.rank()), mesh=mesh)
    batches = shard_batches(global_data(), D.rank(), D.world_size())
    op = HessianOperator(model, loss_fn, batches, eps=EPS)
    res["replicas_differ"] = _error(lambda: op.matvec(random_probe(op, 1)))
    return {k: D.all_gather_object(v) for k, v in res.items()}


if __name__ == "__main__":
    out, *rest = sys.argv[1:]
    sys.exit(D.launch(run_main, out, *rest))
