"""RunResult <-> result.json: keys kept, estimates under their command's key, atomic writes
with the user's umask, statuses, and the negative mass with its threshold."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hessian_spectra import SpectralDensity
from hessian_spectra.lanczos import LanczosResult
from hessian_spectra.results import RunResult, load_result, negative_masses, result_key


def test_result_roundtrip_and_atomic_save(tmp_path):
    """RunResult <-> dict is lossless; NaN becomes null; no temporary file is left behind."""
    r = RunResult(command="trace", config={"probes": 2}, estimate={"estimate": 1.5},
                  summary={"trace": 1.5, "trace_std_error": float("nan")})
    path = r.save(tmp_path)
    d = json.loads(path.read_text())
    assert d["summary"]["trace_std_error"] is None and d["summary"]["lambda_max"] is None
    assert RunResult.from_dict(d).to_dict() == d
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_estimate_is_written_under_the_commands_key_and_old_keys_stay():
    """result.json keeps its keys: the estimate under density / eigs / ... / eps_sweep (the
    command name with '-' as '_'), the other commands' keys null, as files written before."""
    d = RunResult(command="eps-sweep", estimate={"rows": []}).to_dict()
    assert d["eps_sweep"] == {"rows": []}
    for k in ("density", "eigs", "trace", "blockdiag", "influence"):
        assert k in d and d[k] is None
    assert list(d).index("eps_sweep") < list(d).index("summary")
    assert result_key("grad-norm") == "grad_norm"
    assert RunResult(command="grad-norm", estimate={"v": 1}).to_dict()["grad_norm"] == {"v": 1}


def test_old_result_files_load(tmp_path):
    """A result.json written before the refactor (all estimate keys present) loads back."""
    old = {"command": "density", "status": "complete", "density": {"runs": []}, "eigs": None,
           "summary": {"lambda_max": 1.0}, "config": {"steps": 2}}
    r = RunResult.from_dict(old)
    assert r.estimate == {"runs": []} and r.summary["lambda_max"] == 1.0
    (tmp_path / "result.json").write_text(json.dumps(old))
    assert load_result(tmp_path)["command"] == "density"


def test_bad_status_and_command_are_refused():
    """A result's status is one of STATUSES and its command a command name."""
    with pytest.raises(ValueError, match="status must be one of"):
        RunResult(command="trace", status="done")
    with pytest.raises(ValueError, match="command name"):
        RunResult(command="no such command")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_result_file_mode_follows_umask(tmp_path, umask):
    """Issue 13 item 13: result.json was 0600 (mkstemp); it is 0666 & ~umask like any file."""
    old = os.umask(umask)
    try:
        p = RunResult(command="trace").save(tmp_path)
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_load_result_errors(tmp_path):
    """A folder without result.json, and invalid JSON, are one-line errors naming the file."""
    with pytest.raises(FileNotFoundError, match="no result.json"):
        load_result(tmp_path)
    (tmp_path / "result.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_result(tmp_path)


def _two_node_density(lo, hi):
    """A one-probe density with nodes lo and hi, weight 1/2 each (T = [[a, b], [b, a]])."""
    a, b = (lo + hi) / 2, (hi - lo) / 2
    return SpectralDensity([LanczosResult.from_dict({"alpha": [a, a], "beta": [b]})], 2)


def test_negative_mass_ignores_the_near_zero_node():
    """Issue 13 item 5: the headline negative_mass is the mass below -1e-3 max|λ| (the node at
    -1e-6 next to λ_max = 500 is rounding noise, not negative curvature); the raw mass below
    zero is reported as negative_mass_below_zero. A clearly negative node counts in both."""
    d = _two_node_density(-1e-6, 500.0)
    m = negative_masses(d)
    assert m["negative_mass"] == 0.0 and m["negative_mass_below_zero"] == pytest.approx(0.5)
    assert m["negative_mass_threshold"] == pytest.approx(0.5)
    d2 = _two_node_density(-3.0, 500.0)
    m2 = negative_masses(d2)
    assert m2["negative_mass"] == pytest.approx(0.5) == m2["negative_mass_below_zero"]
    nodes, weights = d2.nodes.ravel(), d2.weights.ravel()
    assert np.sum(weights[nodes < -m2["negative_mass_threshold"]]) == pytest.approx(0.5)
