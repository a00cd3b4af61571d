"""`--basis-dir` / `--basis-device` on the command line, and the Lanczos time split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from hessian_spectra.cli import EXIT_OK, main

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

FAST = ["--quiet", "--model", "factories:mlp", "--method", "exact"]


def _run(args) -> dict:
    out = args[args.index("--out") + 1]
    assert main([str(a) for a in args]) == EXIT_OK
    return json.loads((Path(out) / "result.json").read_text())


@pytest.mark.parametrize("command", ["density", "eigs"])
def test_basis_dir_gives_the_in_memory_numbers_and_leaves_no_file(command, tmp_path):
    """`--basis-dir DIR` (vectors in files) and `--basis-device cpu` give the in-memory run's
    tridiagonal bit for bit, and no basis file is left under DIR when the run ends."""
    steps = ["--steps", 10] + (["--probes", 2] if command == "density" else ["-k", 2])
    mem = _run([command, *FAST, *steps, "--out", tmp_path / "mem"])
    basis = tmp_path / "basis"
    files = _run([command, *FAST, *steps, "--basis-dir", basis, "--out", tmp_path / "files"])
    host = _run([command, *FAST, *steps, "--basis-device", "cpu", "--out", tmp_path / "host"])

    def tridiagonals(r):
        runs = r["density"]["runs"] if command == "density" else [r["eigs"]["run"]]
        return [(x["alpha"], x["beta"]) for x in runs]

    assert tridiagonals(files) == tridiagonals(mem) == tridiagonals(host)
    assert not basis.exists() or not any(p.is_file() for p in basis.rglob("*"))
    assert files["config"]["basis_dir"] == str(basis)


def test_summary_splits_lanczos_time(tmp_path):
    """The summary of a density run says how much of Lanczos was matvecs and how much vector work:
    the matvec seconds cover most of the HVP time the run measured, the overhead is their ratio."""
    r = _run(["density", *FAST, "--steps", 8, "--probes", 2, "--out", tmp_path / "t"])
    s = r["summary"]
    assert s["lanczos_matvec_seconds"] > 0 and s["lanczos_vector_seconds"] >= 0
    assert s["lanczos_matvec_seconds"] <= r["timings"]["hvp_seconds"] * 1.01 + 1e-3
    assert s["lanczos_overhead_percent"] == pytest.approx(
        100 * s["lanczos_vector_seconds"] / s["lanczos_matvec_seconds"]
    )


def test_warnings_of_a_run_reach_its_log(tmp_path):
    """A library warning during a run (ghosts of `--reorth none` past convergence) is written to
    log.txt, not only to stderr."""
    out = tmp_path / "ghosts"
    r = _run(["density", *FAST, "--reorth", "none", "--steps", 40, "--probes", 2, "--out", out])
    assert r["summary"]["num_ghosts"] > 0
    assert "GhostWarning" in (out / "log.txt").read_text()
