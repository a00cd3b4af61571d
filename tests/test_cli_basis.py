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


@pytest.mark.parametrize("command", ["density", "eigs"])
def test_basis_beyond_max_memory_goes_to_files_with_the_same_numbers(command, tmp_path):
    """With the kept vectors larger than --max-basis-memory (here 1 KB; the MLP's 10 vectors
    take 10 x 4 bytes x its parameters) they go to files under OUT/basis: the log says so, the
    tridiagonals are the in-memory run's bit for bit, and OUT/basis is gone afterwards;
    `--max-basis-memory inf` keeps them in memory."""
    steps = ["--steps", 10] + (["--probes", 2] if command == "density" else ["-k", 2])
    mem = _run([command, *FAST, *steps, "--max-basis-memory", "inf", "--out", tmp_path / "m"])
    out = tmp_path / "f"
    files = _run([command, *FAST, *steps, "--max-basis-memory", "1KB", "--out", out])

    def runs(r):
        rs = r["density"]["runs"] if command == "density" else [r["eigs"]["run"]]
        return [(x["alpha"], x["beta"], x["config"].get("basis_storage")) for x in rs]

    assert [(a, b) for a, b, _ in runs(files)] == [(a, b) for a, b, _ in runs(mem)]
    assert {s for _, _, s in runs(files)} == {"files"} and {s for *_, s in runs(mem)} == {None}
    assert f"Lanczos vectors in files under {out / 'basis'}" in (out / "log.txt").read_text()
    assert not (out / "basis").exists()
    assert files["config"]["max_basis_memory"] == "1KB"


def test_default_max_basis_memory_keeps_a_small_basis_in_memory(tmp_path):
    """The default limit (2GiB) keeps the MLP's few vectors in memory: no file storage, and
    the log says nothing of files."""
    r = _run(["density", *FAST, "--steps", 6, "--probes", 1, "--out", tmp_path / "d"])
    assert r["config"]["max_basis_memory"] == "2GiB"
    assert "basis_storage" not in r["density"]["runs"][0]["config"]
    assert "in files under" not in (tmp_path / "d" / "log.txt").read_text()


@pytest.mark.parametrize("value", ["2XB", "-1GiB", "lots", "inf GB"])
def test_bad_max_basis_memory_is_one_line_exit_2(value, tmp_path, capsys):
    """A size that is not one (--max-basis-memory 2XB) exits 2 with one line naming the option
    and the accepted forms, no traceback."""
    code = main(["density", *FAST, f"--max-basis-memory={value}", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "--max-basis-memory" in last and "2GiB" in last, last
