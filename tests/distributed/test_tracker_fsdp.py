"""CurvatureTracker under FSDP2 (CPU, gloo): every rank calls it, the ranks agree, only rank 0
logs, the parameters are untouched, and λ_max is what one plain process measures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _launch import launch_json

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_tracker_worker.py")


def _launch(out: Path, nproc: int | None):
    return launch_json(WORKER, out, nproc, timeout=300)


def test_tracker_under_fsdp2_matches_one_process(tmp_path):
    """With 2 ranks: both get the same λ_max at every measurement, log_fn is called on rank 0
    only, the parameters are bit-identical after each measurement, later measurements are warm,
    and each λ_max is within 2·tol of the unsharded single-process run's."""
    plain = _launch(tmp_path / "plain.json", None)
    ws2 = _launch(tmp_path / "ws2.json", 2)
    assert ws2["world_size"] == 2
    assert ws2["log_calls"] == [3, 0]
    assert ws2["params_unchanged"] == [True, True]
    assert ws2["lambda_agree"][0] == ws2["lambda_agree"][1]
    assert [r["warm"] for r in ws2["rows"]] == [False, True, True]
    for a, b in zip(plain["rows"], ws2["rows"]):
        assert a["converged"] and b["converged"]
        assert b["lambda_max"] == pytest.approx(a["lambda_max"], rel=2e-4)
