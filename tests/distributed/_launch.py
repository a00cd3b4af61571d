"""Launching a test worker script in a plain process or under ``torchrun`` (CPU, gloo).

Every launch sets OMP_NUM_THREADS=1 (2 ranks x N threads on a small machine was 9x slower),
a short collective timeout, ``--standalone`` (a free port), and its own process group so that a
hang is killed whole after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAUNCH_TIMEOUT_S = 240


def launch(
    worker: Path,
    args,
    nproc: int | None,
    extra_env: dict | None = None,
    timeout: float = LAUNCH_TIMEOUT_S,
):
    """Run ``worker *args`` (under torchrun with ``nproc`` ranks, else plainly); return
    (returncode, seconds, output)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HESSIAN_SPECTRA_DIST_TIMEOUT": "60",
        **(extra_env or {}),
    }
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a plain run must not think it is under torchrun
    cmd = [sys.executable]
    if nproc is not None:
        cmd += [
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
        ]
    cmd += [str(worker), *[str(a) for a in args]]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(
            f"{' '.join(cmd)} did not finish in {timeout} s (hang?). Output:\n{output[-4000:]}"
        )
    return proc.returncode, time.monotonic() - t0, output


def launch_json(worker: Path, out: Path, nproc: int | None, timeout: float = LAUNCH_TIMEOUT_S):
    """Run ``worker OUT`` (it writes JSON to ``out``), require success, return the JSON."""
    import json

    rc, _, output = launch(worker, [out], nproc, timeout=timeout)
    assert rc == 0, output[-6000:]
    return json.loads(Path(out).read_text())
