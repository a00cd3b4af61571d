"""HSDP (a 2 x 2 mesh at world size 4) and plain data parallelism (world size 2) under torchrun
(CPU, gloo) give what one plain process gives on the same global data.

Three runs of ``_parallel_worker.py``: a plain process, ``torchrun --nproc-per-node 4`` with
``parallelize(model, "hsdp", replicate=2)`` (2 replicas x 2 shards: ranks 0 and 2 hold the
same rows, as do 1 and 3) and ``--nproc-per-node 2`` with ``parallelize(model, "dp")`` (every
rank holds the whole model). The data is split over all ranks in both. With the fd step fixed,
every number is the same function of the same vectors, so the runs agree to float64 rounding;
a dot or norm that counted the replicated entries twice would be off by a factor 2 (sqrt 2).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _launch import launch

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_parallel_worker.py")
SETUPS = {"plain": (None, ["none"]), "hsdp": (4, ["hsdp", 2]), "dp": (2, ["dp"])}
SPREAD = ("hsdp", "dp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{'plain': ..., 'hsdp': ..., 'dp': ...}: the JSON each run wrote."""
    tmp = tmp_path_factory.mktemp("parallel")
    out = {}
    for key, (nproc, args) in SETUPS.items():
        path = tmp / f"{key}.json"
        rc, _, log = launch(WORKER, [path, *args], nproc)
        assert rc == 0, f"{key} run failed (rc={rc}):\n{log[-6000:]}"
        out[key] = json.loads(path.read_text())
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def test_runs_are_what_they_claim(runs):
    """The hsdp run holds every parameter split over 2 ranks and copied twice (ranks 0 and 2 the
    same rows, 1 and 3 the others); the dp run holds the whole model on both ranks; FSDP2
    averages gradients over all ranks in both (the operator multiplies back)."""
    P, H, D = runs["plain"], runs["hsdp"], runs["dp"]
    total = P["num_params"]
    assert P["layout"] == ["none", 1, 1] and P["world_size"] == 1
    assert H["world_size"] == 4 and H["layout"] == ["hsdp", 2, 2]
    assert H["placements"] == ["(Replicate(), Shard(dim=0))"]
    n0, n1, n2, n3 = H["local_numel"]
    assert n0 == n2 and n1 == n3 and n0 + n1 == total and n0 < total
    assert D["world_size"] == 2 and D["layout"] == ["dp", 1, 2]
    assert D["local_numel"] == [total, total]
    assert H["num_params"] == D["num_params"] == total
    assert H["grad_scale"] == 4.0 and D["grad_scale"] == 2.0


@pytest.mark.parametrize("key", ["probe", "probe_block7"])
def test_probes_are_the_one_process_vector(runs, key):
    """random_probe draws the same global vector under hsdp and dp as in one process (also with
    probe blocks of 7 entries that straddle the shard boundaries)."""
    for s in SPREAD:
        assert runs[s][key] == runs["plain"][key], s


def test_dots_and_norms_count_every_entry_once(runs):
    """The norm of a Rademacher probe is sqrt(num_params) exactly (a reduction over all 4 hsdp
    ranks would give sqrt(2) times that); dots, batched dots, per-tensor norms, the unit
    probe and the parameter norms equal the one-process values to float64 rounding."""
    P = runs["plain"]
    for s in SPREAD:
        R = runs[s]
        assert R["norm_probe"] == P["norm_probe"] == math.sqrt(P["num_params"]), s
        assert R["dot_probe_grad"] == pytest.approx(P["dot_probe_grad"], rel=1e-10, abs=0)
        assert _rel(R["dots"], P["dots"]) < 1e-10, s
        assert _rel(R["tensor_norms"], P["tensor_norms"]) < 1e-10, s
        assert _rel(R["theta_norms"], P["theta_norms"]) < 1e-10, s
        assert R["unit_norm"] == pytest.approx(1.0, abs=1e-14), s


def test_gradient_and_hvp_match_one_process(runs):
    """Loss, gradient and an fd HVP (fixed step): the data is split over all ranks and FSDP2's
    average over all of them (reduce-scatter in the shard group, all-reduce over replicas)
    is undone exactly."""
    P = runs["plain"]
    for s in SPREAD:
        R = runs[s]
        assert R["loss"] == pytest.approx(P["loss"], rel=1e-12), s
        assert _rel(R["grad"], P["grad"]) < 1e-10, s
        assert _rel(R["hvp"], P["hvp"]) < 1e-10, s


def test_lanczos_eigenvalue_and_trace_match_one_process(runs):
    """Lanczos tridiagonal (full reorthogonalisation: the basis dots reduce too), the top
    eigenvalue and a Hutchinson trace equal the one-process values to 1e-10."""
    P = runs["plain"]
    for s in SPREAD:
        R = runs[s]
        (a, b), (a0, b0) = R["lanczos_full"], P["lanczos_full"]
        assert _rel(a, a0) < 1e-10 and _rel(b, b0) < 1e-10, s
        assert _rel(R["eigs"], P["eigs"]) < 1e-10, s
        assert R["trace"] == pytest.approx(P["trace"], rel=1e-10), s


def test_parameters_bit_identical_on_every_rank(runs):
    """After gradients, fd HVPs (which perturb the local shards in place) and Lanczos, every
    rank's local parameters are bit-for-bit what they were."""
    for s in SPREAD:
        assert all(runs[s]["params_identical"]), s


def test_what_cannot_work_is_refused(runs):
    """exact HVPs and the empirical Fisher are refused under hsdp and dp with the fix named;
    a world size not divisible by replicate, hsdp without replicate, a replicate that dp
    contradicts and an unknown setup raise the same one-line ValueError on every rank; and
    replicas that hold different weights (a model sharded by hand, seeded per rank) are
    refused by the operator before any product."""
    for s in SPREAD:
        assert "method='fd'" in runs[s]["exact_error"], s
        assert "empirical Fisher" in runs[s]["ef_error"], s
    E = runs["dp"]["errors"]
    for key, words in {
        "hsdp_not_divisible": "world size 2 is not divisible by replicate=3",
        "hsdp_no_replicate": "needs replicate=R",
        "dp_replicate": "use parallel='hsdp' with replicate=1",
        "unknown": "parallel must be one of fsdp, hsdp, dp; got 'zero3'",
        "replicas_differ": "differ between replicas under dp (replicate 2 x shard 1)",
    }.items():
        a, b = E[key]
        assert a is not None and a == b and words in a and "\n" not in a, (key, a, b)
