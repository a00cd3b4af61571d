"""`--parallel dp|fsdp|hsdp` and `--replicate R` on the command line.

`torchrun ... -m hessian_spectra density --parallel dp` (world size 2) and `--parallel hsdp
--replicate 2` (world size 4: a 2 x 2 mesh) on the float64 factory MLP (3 batches, so a rank
runs a zero-weight pad) give the one-process run's loss and Lanczos coefficients, and record
the setup in result.json. Settings that cannot work exit 2 with one line naming the flag.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # tests/: factories.py for --model factories:mlp

from hessian_spectra.cli import EXIT_OK, EXIT_USAGE, main
from hessian_spectra.results import load_result

pytestmark = pytest.mark.distributed

COMMON = [
    "density",
    "--quiet",
    "--method",
    "fd",
    "--eps",
    "1e-4",
    "--model",
    "factories:mlp",
    "--steps",
    "4",
    "--probes",
    "1",
]


def _torchrun(nproc: int, args) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m hessian_spectra ARGS`` (one thread per rank, this
    checkout and tests/ importable, a short collective timeout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HESSIAN_SPECTRA_DIST_TIMEOUT": "60"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1] / "src"), str(HERE.parent)])
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "hessian_spectra"]
    cmd += [str(a) for a in args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_dp_and_hsdp_equal_one_process(tmp_path):
    """dp at world size 2 and hsdp 2 x 2 at world size 4: the one-process loss and Lanczos
    tridiagonal to 1e-10, and config.parallel / config.replicate / world_size say what ran."""
    assert main([*COMMON, "--out", str(tmp_path / "one")]) == EXIT_OK
    one = load_result(tmp_path / "one")
    assert one["config"]["parallel"] == "none" and one["config"]["replicate"] is None
    a0 = one["density"]["runs"][0]["alpha"]
    b0 = one["density"]["runs"][0]["beta"]
    for name, nproc, flags, replicate in (
        ("dp", 2, ["--parallel", "dp"], 2),
        ("hsdp", 4, ["--parallel", "hsdp", "--replicate", "2"], 2),
    ):
        proc = _torchrun(nproc, [*COMMON, *flags, "--out", tmp_path / name])
        assert proc.returncode == EXIT_OK, proc.stdout[-3000:] + proc.stderr[-3000:]
        r = load_result(tmp_path / name)
        assert r["world_size"] == nproc, name
        assert r["config"]["parallel"] == name and r["config"]["replicate"] == replicate
        assert r["data"]["num_batches"] == one["data"]["num_batches"] == 3
        assert r["operator"]["loss"] == pytest.approx(one["operator"]["loss"], rel=1e-12)
        run = r["density"]["runs"][0]
        np.testing.assert_allclose(run["alpha"], a0, rtol=1e-10)
        np.testing.assert_allclose(run["beta"], b0, rtol=1e-10)
        assert f"parallel: {name} over {nproc} ranks" in (tmp_path / name / "log.txt").read_text()


@pytest.mark.parametrize(
    "flags, words",
    [
        (
            ["--parallel", "hsdp", "--replicate", "2"],
            "world size 1 is not divisible by --replicate 2",
        ),
        (["--parallel", "hsdp"], "--parallel hsdp needs --replicate R"),
        (["--replicate", "2"], "--replicate 2 applies to --parallel hsdp"),
        (["--parallel", "dp", "--replicate", "2"], "--replicate 2 applies to --parallel hsdp"),
    ],
)
def test_settings_that_cannot_work_exit_2_with_one_line(tmp_path, capsys, flags, words):
    """In one process (world size 1): hsdp with 2 copies cannot be honoured, hsdp needs
    --replicate, and --replicate belongs to hsdp only."""
    capsys.readouterr()
    assert main([*COMMON, *flags, "--out", str(tmp_path / "x")]) == EXIT_USAGE
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0], err


def test_exact_under_torchrun_names_the_setting(tmp_path):
    """`--method exact --parallel dp` under torchrun exits 2 before loading anything, naming
    the method, the setup and the fix, without a traceback of ours."""
    args = [*COMMON, "--method", "exact", "--parallel", "dp", "--out", tmp_path / "x"]
    proc = _torchrun(2, args)
    assert proc.returncode != EXIT_OK
    lines = [ln for ln in proc.stderr.splitlines() if "--method exact is not available" in ln]
    assert lines and all("--parallel dp" in ln and "--method fd" in ln for ln in lines), (
        proc.stderr[-3000:]
    )
    # (torchrun prints its own traceback of the failed child; none of ours)
    assert not any("File" in ln and "hessian_spectra" in ln for ln in proc.stderr.splitlines())
