"""FSDP2 under torchrun (CPU, gloo) gives what one plain process gives on the same global data.

Three runs of ``_worker.py main`` (each checks many things and writes one JSON):
a plain single process (unsharded), ``torchrun --nproc-per-node 1`` (sharded by FSDP2 on one
rank) and ``--nproc-per-node 2`` (every parameter split by rows, unevenly; the two ranks hold
unequal numbers of target tokens). Two more runs check that a failing or missing rank ends
the job with a clear error in bounded time instead of hanging.

Every launch sets OMP_NUM_THREADS=1 (2 ranks x N threads on a small machine was 9x slower),
uses ``--standalone`` (a free port) and a timeout; the file takes well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _launch import LAUNCH_TIMEOUT_S, launch

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_worker.py")


def _launch(
    mode: str,
    out: Path,
    nproc: int | None,
    extra_env: dict | None = None,
    timeout: float = LAUNCH_TIMEOUT_S,
):
    """Run the worker (under torchrun when ``nproc``); return (returncode, seconds, output)."""
    return launch(WORKER, [mode, out], nproc, extra_env, timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{'plain': ..., 'ws1': ..., 'ws2': ...}: the JSON each main run wrote."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = {}
    for key, nproc in (("plain", None), ("ws1", 1), ("ws2", 2)):
        path = tmp / f"{key}.json"
        rc, _, log = _launch("main", path, nproc)
        assert rc == 0, f"{key} run failed (rc={rc}):\n{log[-6000:]}"
        out[key] = json.loads(path.read_text())
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


SHARDED = ("ws1", "ws2")


def test_runs_are_what_they_claim(runs):
    """The plain run is unsharded in one process; the torchrun runs are FSDP2-sharded with the
    right world size, and at world size 2 each rank holds only part of the parameters."""
    assert runs["plain"]["world_size"] == 1 and not runs["plain"]["sharded"]
    assert runs["ws1"]["world_size"] == 1 and runs["ws1"]["sharded"]
    assert runs["ws2"]["world_size"] == 2 and runs["ws2"]["sharded"]
    total = runs["plain"]["num_params"]
    assert runs["ws2"]["num_params"] == total == runs["ws1"]["num_params"]
    local = runs["ws2"]["local_numel"]
    assert (
        sum(local) == total and all(n < total for n in local) and local[0] != local[1]
    )  # uneven rows
    assert runs["ws2"]["grad_scale"] == 2.0  # FSDP2 averages over 2 ranks; the operator undoes it


@pytest.mark.parametrize("key", ["probe_rademacher", "probe_gaussian", "probe_block7"])
def test_probes_identical_at_every_world_size(runs, key):
    """random_probe gives bit-identical global vectors at world sizes 1 and 2 (each rank draws
    only the blocks overlapping its rows; block7 makes blocks straddle shard boundaries)."""
    for ws in SHARDED:
        assert runs[ws][key] == runs["plain"][key], ws


def test_hvp_and_gradient_match_single_process(runs):
    """FD HVPs (fixed and default eps), the gradient and the loss agree with the plain run on
    the same global data to float64 rounding, although the ranks hold unequal token counts."""
    P = runs["plain"]
    for ws in SHARDED:
        R = runs[ws]
        assert R["eps_default"] == pytest.approx(P["eps_default"], rel=1e-12)
        assert _rel(R["hvp_eps1e-4"], P["hvp_eps1e-4"]) < 1e-10, ws
        assert _rel(R["hvp_default"], P["hvp_default"]) < 1e-8, ws
        assert _rel(R["grad"], P["grad"]) < 1e-12, ws
        assert R["loss"] == pytest.approx(P["loss"], rel=1e-13)
    # and the FD HVP is the Hessian's: against exact double backward in the plain run
    assert _rel(P["hvp_eps1e-4"], P["hvp_exact"]) < 1e-3


def test_tied_embeddings(runs):
    """A model whose input and output embeddings share one parameter (tie_word_embeddings)
    gives the plain run's HVP when sharded."""
    for ws in SHARDED:
        assert runs[ws]["tied_num_tensors"] == runs["plain"]["tied_num_tensors"]
        assert _rel(runs[ws]["hvp_tied"], runs["plain"]["hvp_tied"]) < 1e-10, ws


def test_user_gradient_divide_factor(runs):
    """After model.set_gradient_divide_factor(1.0) (FSDP2 then sums instead of averaging) the
    operator scales by 1 instead of the world size and the HVP is unchanged."""
    for ws in SHARDED:
        assert runs[ws]["grad_scale_factor1"] == 1.0
        assert _rel(runs[ws]["hvp_factor1"], runs["plain"]["hvp_eps1e-4"]) < 1e-10, ws


def test_fd_reaches_parameters_fsdp_keeps_gathered(runs):
    """With reshard_after_forward=False FSDP2 keeps gathered copies after forward; the FD step
    must still perturb what the forward uses (the operator reshards before perturbing)."""
    for ws in SHARDED:
        assert _rel(runs[ws]["hvp_no_reshard"], runs["plain"]["hvp_eps1e-4"]) < 1e-10, ws
    assert _rel(runs["plain"]["hvp_no_reshard"], runs["plain"]["hvp_eps1e-4"]) == 0.0


def test_parameters_bit_identical_after_hvps(runs):
    """After HVPs and a gradient every rank's local shards are bit-for-bit unchanged, and a
    forward pass (which all-gathers them again) gives exactly the loss it gave before."""
    for key in ("plain",) + SHARDED:
        assert all(runs[key]["params_identical"]), key


def test_lanczos_slq_trace_eigs_match_single_process(runs):
    """Lanczos tridiagonals (full reorth; window 2 with a bf16 basis; resumed from per-rank
    checkpoints), SLQ nodes and weights, Hutchinson trace and top eigenvalues are the same
    sharded as in one process."""
    P = runs["plain"]
    for ws in SHARDED:
        R = runs[ws]
        for key in ("lanczos_full", "lanczos_window_bf16", "lanczos_resumed"):
            (a, b), (a0, b0) = R[key], P[key]
            assert _rel(a, a0) < 1e-8 and _rel(b, b0) < 1e-8, (ws, key)
        assert _rel(R["slq_nodes"], P["slq_nodes"]) < 1e-8, ws
        assert _rel(R["slq_weights"], P["slq_weights"]) < 1e-8, ws
        assert R["trace"] == pytest.approx(P["trace"], rel=1e-8)
        assert _rel(R["eigs"], P["eigs"]) < 1e-8, ws
    # resuming from the checkpoint reproduces the uninterrupted run
    assert _rel(P["lanczos_resumed"][0], P["lanczos_full"][0]) < 1e-12
    assert runs["ws2"]["checkpoint_files"] == [["lz.pt.rank0", "lz.pt.rank1"]] * 2


def test_blockdiag_and_cg_match_single_process(runs):
    """The analyses built on the operator (block-diagonal test, CG inverse-HVP) run unchanged
    on the sharded operator and give the plain run's numbers."""
    P = runs["plain"]
    for ws in SHARDED:
        R = runs[ws]
        assert [r[:2] for r in R["blockdiag"]] == [r[:2] for r in P["blockdiag"]], ws
        assert _rel([r[2:] for r in R["blockdiag"]], [r[2:] for r in P["blockdiag"]]) < 1e-6, ws
        assert _rel(R["cg_x"], P["cg_x"]) < 1e-8, ws


def test_sharded_errors_are_clear(runs):
    """On a sharded model: exact/jvp raise NotImplementedError pointing to method='fd'
    (PyTorch issue 172543); ranks with different numbers of batches raise on every rank
    instead of deadlocking in FSDP's collectives."""
    for ws in SHARDED:
        R = runs[ws]
        for key in ("exact_error", "jvp_error"):
            assert R[key] and "method='fd'" in R[key] and "172543" in R[key], (ws, key)
    R = runs["ws2"]
    assert "same number of batches" in R["uneven_error"]
    assert R["uneven_errors_all_ranks"] == [True, True]


def test_failing_rank_ends_the_job(tmp_path):
    """Rank 1 raises inside an HVP while rank 0 waits in a collective: the job exits non-zero
    in bounded time and the output shows rank 1's error."""
    rc, seconds, out = _launch("fail", tmp_path / "fail.json", 2, timeout=120)
    assert rc != 0
    assert "deliberate failure on rank 1" in out
    assert not (tmp_path / "fail.json").exists()
    assert seconds < 90, seconds


def test_missing_rank_times_out(tmp_path):
    """Rank 1 never joins a collective: rank 0 raises after HESSIAN_SPECTRA_DIST_TIMEOUT
    seconds (here 5) and the job ends instead of waiting forever."""
    rc, seconds, out = _launch(
        "hang", tmp_path / "hang.json", 2, {"HESSIAN_SPECTRA_DIST_TIMEOUT": "5"}, timeout=120
    )
    assert rc != 0
    assert "Timed out" in out or "timed out" in out
    assert seconds < 90, seconds


def test_partly_frozen_model(runs):
    """A model with a frozen parameter (requires_grad=False) shards; the operator acts on the
    trainable parameters only and gives the plain run's HVP."""
    names = runs["plain"]["frozen_param_names"]
    assert "model.embed_tokens.weight" not in names
    assert len(names) == len(runs["plain"]["param_names"]) - 1
    for ws in SHARDED:
        assert runs[ws]["frozen_param_names"] == names, ws
        assert _rel(runs[ws]["hvp_frozen"], runs["plain"]["hvp_frozen"]) < 1e-10, ws


def test_gradient_scale_falls_back_when_fsdp_state_is_unreadable(runs):
    """If FSDP2's private state cannot be read (a future torch), gradient_scale assumes FSDP2's
    default divisor (the world size) and says so in a RuntimeWarning instead of failing."""
    for ws, n in (("ws1", 1), ("ws2", 2)):
        assert runs[ws]["grad_scale_unreadable"] == float(n), ws
        warned = runs[ws]["grad_scale_unreadable_warnings"]
        assert len(warned) == 1 and warned[0].startswith("RuntimeWarning"), (ws, warned)
        assert "gradient divide factor" in warned[0] and f"world size {n}" in warned[0], warned


def test_gradient_scale_refuses_mixed_factors(runs):
    """FSDP modules that divide gradients by different factors (set_gradient_divide_factor
    called on one of them) are refused with a ValueError that says how to set them all."""
    for ws in SHARDED:
        msg = runs[ws]["grad_scale_mixed_error"]
        assert msg and "different factors [1.0, 3.0]" in msg and "every FSDP module" in msg, msg


def test_shard_geometry_fallback_gives_the_same_probe(runs):
    """Without DTensor's private placement helper, local_flat_range says None for sharded
    parameters and random_probe cuts its pieces from a full draw: the same global vector."""
    for ws in SHARDED:
        assert all(r is None for r in runs[ws]["flat_ranges_fallback"]), ws
        assert runs[ws]["probe_rademacher_fallback"] == runs["plain"]["probe_rademacher"], ws
    n = runs["plain"]["num_params"]
    assert sum(b - a for a, b in runs["plain"]["flat_ranges_fallback"]) == n  # plain: whole


@pytest.fixture(scope="module")
def weights_run(tmp_path_factory):
    """The JSON of ``_worker.py weights`` at world size 2 (every rank seeds its own model)."""
    path = tmp_path_factory.mktemp("weights") / "weights.json"
    rc, _, log = _launch("weights", path, 2)
    assert rc == 0, f"weights run failed (rc={rc}):\n{log[-6000:]}"
    return json.loads(path.read_text())


def test_ranks_with_different_weights_are_refused(weights_run):
    """Issue 13 item 2: a model seeded per rank is refused by shard_model on every rank with the
    same ValueError, naming the first differing parameter and both remedies (and the job goes
    on: no rank hangs). Ranks that build different architectures are refused too."""
    msgs = weights_run["refused_all_ranks"]
    assert msgs[0] is not None and msgs == [msgs[0]] * 2, msgs
    assert "'model.embed_tokens.weight'" in msgs[0]  # the first parameter of the model
    assert "differ between ranks" in msgs[0]
    assert "torch.manual_seed" in msgs[0] and "broadcast_from_rank0=True" in msgs[0]
    layout = weights_run["layout_refused_all_ranks"]
    assert layout[0] is not None and layout == [layout[0]] * 2, layout
    assert "different models" in layout[0]


def test_broadcast_from_rank0_shards_rank0s_model(weights_run, runs):
    """With broadcast_from_rank0=True the per-rank-seeded models become rank 0's (seed 0, the
    plain run's model): the sharded HVP, gradient and loss equal the plain run's, and rank 0
    (only) logs that the weights were copied."""
    P = runs["plain"]
    assert _rel(weights_run["hvp_broadcast"], P["hvp_eps1e-4"]) < 1e-10
    assert _rel(weights_run["grad_broadcast"], P["grad"]) < 1e-12
    assert weights_run["loss_broadcast"] == pytest.approx(P["loss"], rel=1e-13)
    logs0, logs1 = weights_run["broadcast_logs"]
    assert logs1 == [] and len(logs0) == 1 and "copied rank 0's" in logs0[0], (logs0, logs1)


def test_batch_count_not_divisible_by_world_size(runs, tmp_path):
    """Issue 13 item 1 (README: "what changes between one process and many: nothing"): the 3
    global batches split over 2 ranks by partition.shard_batches (one rank runs a ZeroWeight
    pad) give the plain run's FD HVP, gradient, loss and Lanczos coefficients on all 3
    batches. Needs the operator to weigh ZeroWeight batches 0 (partition.ZeroWeight)."""
    path = tmp_path / "uneven.json"
    rc, _, log = _launch("uneven", path, 2)
    assert rc == 0, f"uneven run failed (rc={rc}):\n{log[-6000:]}"
    R, P = json.loads(path.read_text()), runs["plain"]
    assert R["world_size"] == 2 and R["num_local_batches"] == [2, 2]
    assert _rel(R["hvp_eps1e-4"], P["hvp_eps1e-4"]) < 1e-10
    assert _rel(R["grad"], P["grad"]) < 1e-10
    assert R["loss"] == pytest.approx(P["loss"], rel=1e-10)
    (a, b), (a0, b0) = R["lanczos_full"], P["lanczos_full"]
    assert _rel(a, a0) < 1e-10 and _rel(b, b0) < 1e-10
