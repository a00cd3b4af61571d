"""RunResult <-> result.json: keys kept, estimates under their command's key, atomic writes
with the user's umask, and statuses."""

from __future__ import annotations

import json
import os

import pytest

from hessian_spectra.results import RunResult, load_result, result_key


def test_result_roundtrip_and_atomic_save(tmp_path):
    """RunResult <-> dict is lossless; NaN becomes null; no temporary file is left behind."""
    r = RunResult(
        command="trace",
        config={"probes": 2},
        estimate={"estimate": 1.5},
        summary={"trace": 1.5, "trace_std_error": float("nan")},
    )
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
    old = {
        "command": "density",
        "status": "complete",
        "density": {"runs": []},
        "eigs": None,
        "summary": {"lambda_max": 1.0},
        "config": {"steps": 2},
    }
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
