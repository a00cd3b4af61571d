"""How many CPU threads should a run use when another process is busy on the machine?

Issue 13 item 14: torch's default (one thread per core) ran a Lanczos step 3.5x slower with one
busy single-threaded neighbour on 2 cores. This measures, in ONE run with interleaved repeats
(every configuration once per round, rounds in a shuffled order), the time of a Lanczos step
(exact HVPs, full reorthogonalisation) of a float32 MLP under:

- threads: 1, the number of usable cores, and ``auto`` (the CLI's default, ``choose_threads``:
  one per free core, decided when the worker starts);
- ``OMP_WAIT_POLICY``: unset, ``PASSIVE`` in the environment (before torch starts: OpenMP
  threads then sleep instead of spinning while they wait), or ``late``: PASSIVE set by the
  worker after ``import torch`` (what a command line could do by itself; it changes nothing
  when OpenMP reads its environment at load time);
- neighbour: none, or one busy single-threaded process (a Python spin loop) started before the
  worker and stopped after it.

Each configuration runs in a fresh subprocess (thread pools and OMP variables are per process).
Reported: median ms per step per configuration over the rounds, and its ratio to the
"cores threads, no neighbour" configuration of the same round (ratios within one round, so slow
drifts of the machine's load cancel), plus the load average seen during each round. Note the
machine may be shared: other users' processes are a neighbour this script does not control; the
JSON records the 1-minute load average at every measurement.

    python benchmarks/threads.py                    # 3 rounds, writes benchmarks/results/threads.json
    python benchmarks/threads.py --rounds 5 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(threads: str, steps: int, late: bool = False) -> None:
    """One measurement (runs in its own process): print {"ms_per_step", "threads"} as JSON."""
    import torch

    if late:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

    from hessian_spectra import HessianOperator, lanczos
    from hessian_spectra.cli.threads import choose_threads

    chosen = choose_threads(None if threads == "auto" else int(threads))
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512),
        torch.nn.Tanh(),
        torch.nn.Linear(512, 512),
        torch.nn.Tanh(),
        torch.nn.Linear(512, 10),
    )
    batches = [
        (torch.randn(512, 256, generator=g), torch.randint(0, 10, (512,), generator=g))
        for _ in range(2)
    ]

    def loss(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    op = HessianOperator(model, loss, batches, method="exact")
    lanczos(op, 2)  # warm-up
    t0 = time.perf_counter()
    lanczos(op, steps)
    dt = (time.perf_counter() - t0) / steps
    print(
        json.dumps(
            {
                "ms_per_step": 1e3 * dt,
                "threads": chosen["num_threads"],
                "busy_cores_seen": chosen["busy_cores"],
            }
        )
    )


SPIN = "import time\nt = time.time()\nwhile time.time() - t < 600: pass\n"


def measure(threads: str, policy: str, neighbour: bool, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT / "src")
    if policy == "PASSIVE":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    spin = subprocess.Popen([sys.executable, "-c", SPIN]) if neighbour else None
    try:
        if spin:
            time.sleep(0.5)  # the neighbour is running before the worker starts
        load = os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--worker", threads, "--steps", str(steps)]
        out = subprocess.run(
            cmd + (["--late"] if policy == "late" else []),
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if spin:
            spin.kill()
            spin.wait()
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load1": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--late", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/threads.json"))
    a = ap.parse_args()
    if a.worker is not None:
        worker(a.worker, a.steps, a.late)
        return
    cores = len(os.sched_getaffinity(0))
    c = str(cores)
    per = [
        ("1", "unset"),
        (c, "unset"),
        (c, "PASSIVE"),
        (c, "late"),
        ("auto", "unset"),
        ("auto", "PASSIVE"),
    ]
    configs = [(t, p, n) for n in (False, True) for t, p in per]
    base = (c, "unset", False)
    rows = {c: [] for c in configs}
    ratios = {c: [] for c in configs}
    rng = random.Random(0)
    for r in range(a.rounds):
        order = configs[:]
        rng.shuffle(order)
        got = {c: measure(*c, a.steps) for c in order}
        for c in configs:
            rows[c].append(got[c])
            ratios[c].append(got[c]["ms_per_step"] / got[base]["ms_per_step"])
        print(f"round {r + 1}/{a.rounds} done (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    name = {"unset": "", "PASSIVE": " PASSIVE", "late": " late"}
    print(
        f"{cores} usable cores; {a.rounds} rounds x {a.steps} Lanczos steps; base = {cores} "
        f"threads, no neighbour"
    )
    print(
        f"{'neighbour':>9}  {'threads':>12}  {'ms/step':>8}  {'x base':>7}  {'chosen':>6}  "
        "load1 per round"
    )
    table = []
    for c in configs:
        t, p, n = c
        ms = statistics.median(x["ms_per_step"] for x in rows[c])
        ratio = statistics.median(ratios[c])
        chosen = sorted({x["threads"] for x in rows[c]})
        loads = [round(x["load1"], 2) for x in rows[c]]
        print(
            f"{'busy' if n else 'none':>9}  {t + name[p]:>12}  {ms:8.1f}  {ratio:7.2f}  "
            f"{','.join(map(str, chosen)):>6}  {loads}"
        )
        table.append(
            {
                "threads": t,
                "omp_wait_policy": p,
                "neighbour": n,
                "ms_per_step_median": ms,
                "ratio_to_base_median": ratio,
                "threads_chosen": chosen,
                "runs": rows[c],
            }
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps(
            {
                "cores": cores,
                "rounds": a.rounds,
                "steps": a.steps,
                "loadavg_at_end": os.getloadavg(),
                "base": "cores threads, no neighbour",
                "rows": table,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
