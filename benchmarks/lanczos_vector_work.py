"""Lanczos vector work against the memory-traffic floor, and resident memory against steps.

Part 1 (issue 12 item 1): a diagonal operator (its matvec is one pass) on ``--numel`` float32
entries in ``--tensors`` tensors; for each reorth mode and basis dtype, the vector work per
Lanczos step (wall time of the run minus the time inside the matvecs, which the benchmark
measures itself so that it also runs against an older checkout without the timing split),
(steps 1 .. m−1, timed from the callbacks: the start-up and the probe are left out), in units
of one ``torch._foreach_copy_`` of a work vector measured after every step (the median of the
per-step ratios), CPU time of the one thread (the machine is shared: waiting is not counted,
memory-bandwidth contention still is), repeats
interleaved, one thread, median over repeats. The floor is what the recurrence must move:

    none: 4.5 copies (one dot, one fused update of w with q and q_prev, one norm, one scale);
    window r / full with k kept vectors: 2 (the dot for alpha, the scale) + k + 1.5 (reading a
    vector is half a copy; the three-term update is done from the basis' rows in the first
    sweep, which also takes the dots and ‖w‖, and one pass of Gram–Schmidt in the second, the
    next pass being skipped by the Kahan–Parlett test as it is on these operators: two reads
    of the k vectors, w read once and read/written once), averaged over the steps; a bf16 basis moves half the bytes per stored vector (plus the cast
    of q for the matvec). A float64 basis is measured with a float64 operator, in copies of a
    float64 vector. ``--basis-dir DIR`` adds rows with the basis in files under DIR.

Part 2 (item 2): peak RSS of full-reorth runs against the number of steps, with the basis in
memory and in files (``basis_dir``), each point in a fresh process.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lanczos_vector_work.py \\
        --out benchmarks/results/lanczos_vector_work.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

_clock = time.thread_time  # CPU time of this thread: waiting for a shared core is not counted


def _op(torch, numel: int, tensors: int, seed: int = 0, dtype=None):
    dt = dtype or torch.float32

    class Diag:
        """A diagonal operator; ``matvec_seconds`` accumulates the time inside its products."""

        def __init__(self):
            g = torch.Generator().manual_seed(seed)
            n = numel // tensors
            self.params = [torch.zeros(n, dtype=dt) for _ in range(tensors)]
            self.param_names = [f"p{i}" for i in range(tensors)]
            self.num_params = n * tensors
            self.vector_dtype = dt
            self.method = "diag"
            self.diags = [torch.rand(n, generator=g, dtype=dt) for _ in range(tensors)]
            self.matvec_seconds = 0.0

        def matvec(self, v):
            t0 = _clock()
            out = [d * x for d, x in zip(self.diags, v)]
            self.matvec_seconds += _clock() - t0
            return out

        __matmul__ = matvec

    return Diag()


def _floor(reorth, steps: int, basis_bytes: int, work_bytes: int) -> float:
    """Copies of a work vector per step that the recurrence must move (module docstring), with
    ``s`` = basis bytes / work bytes per entry."""
    s = basis_bytes / work_bytes
    none = 2.5 + 2 * s + ((s + 1) / 2 if s != 1 else 0.0)  # + the cast of q for the matvec
    if reorth == "none":
        return none
    cast = (s + 1) / 2 if s != 1 else 0.0  # q in the basis dtype to the operator's, for the matvec
    ks = [min(j + 1, steps if reorth == "full" else max(int(reorth), 2)) for j in range(1, steps)]
    return 2 + cast + statistics.mean(k * s + 1.5 for k in ks)


def _key(reorth, dtype: str, where) -> str:
    return f"{reorth}/{dtype}" + ("/files" if where else "")


def vector_work(args) -> dict:
    import torch

    import hessian_spectra as hs

    torch.set_num_threads(1)
    # (basis dtype, operator dtype): a float64 basis goes with a float64 model
    dtypes = [("float32", torch.float32), ("bfloat16", torch.float32), ("float64", torch.float64)]
    ops = {wd: _op(torch, args.numel, args.tensors, dtype=wd) for wd in {w for _, w in dtypes}}
    bufs = {
        wd: (
            [torch.randn(t.shape, dtype=wd) for t in o.params],
            [torch.empty(t.shape, dtype=wd) for t in o.params],
        )
        for wd, o in ops.items()
    }
    v0s = {wd: hs.random_probe(o, 0) for wd, o in ops.items()}
    modes = [("none", args.steps_short), (2, args.steps_short), ("full", args.steps_full)]
    cells = [(m, steps, d, wd, None) for m, steps in modes for d, wd in dtypes]
    if args.basis_dir:  # the same full-reorth runs with the basis in files
        cells += [("full", args.steps_full, d, wd, args.basis_dir) for d, wd in dtypes[:2]]
    runs = {_key(m, d, where): [] for m, _, d, _, where in cells}
    copies = {k: [] for k in runs}
    for rep in range(args.repeats):
        for m, steps, d, wd, where in cells:
            op, (src, dst), v0 = ops[wd], bufs[wd], v0s[wd]
            torch._foreach_copy_(dst, src)  # touch dst
            marks = []  # per step: (CPU time at the callback, matvec seconds, copy seconds)

            def mark(step, alpha, beta, marks=marks, op=op, src=src, dst=dst):
                t0 = _clock()
                torch._foreach_copy_(dst, src)  # the unit, measured next to every step
                t1 = _clock()
                marks.append((t0, op.matvec_seconds, t1 - t0, t1))

            key = _key(m, d, where)
            kw = {"basis_dir": where} if where else {}
            r = hs.lanczos(op, steps, reorth=m, basis_dtype=d, v0=v0, callback=mark, **kw)
            for (_, m0, _, end0), (t1, m1, c1, _) in itertools.pairwise(marks):
                runs[key].append((t1 - end0) - (m1 - m0))  # steps 1 .. m-1
                copies[key].append(c1)
            print(f"rep {rep} {key}: {runs[key][-1] * 1e3:.1f} ms/step", flush=True)
            del r
    rows = []
    for m, steps, d, wd, where in cells:
        key = _key(m, d, where)
        per_step, copy = statistics.median(runs[key]), statistics.median(copies[key])
        ratio = statistics.median(a / c for a, c in zip(runs[key], copies[key]))
        bb = torch.empty((), dtype=getattr(torch, d)).element_size()
        wb = torch.empty((), dtype=wd).element_size()
        rows.append(
            {
                "reorth": m,
                "steps": steps,
                "basis_dtype": d,
                "basis": "files" if where else "memory",
                "work_dtype": str(wd).replace("torch.", ""),
                "ms_per_step": per_step * 1e3,
                "copy_ms": copy * 1e3,
                "copies_per_step": ratio,
                "floor_copies": _floor(m, steps, bb, wb),
            }
        )
    return {"rows": rows}


def dot_accuracy(numel: int) -> list[dict]:
    """Relative error of ``hs.dot`` against a float64 reference, |err| / Σ|u_i v_i|, for a
    well-conditioned (u ≈ v) and an ill-conditioned (independent) pair, float32 and bf16 u."""
    import torch

    import hessian_spectra as hs

    g = torch.Generator().manual_seed(1)
    out = []
    for dt in (torch.float32, torch.bfloat16):
        u = torch.rand(numel, generator=g).to(dt)
        for kind in ("u≈v", "independent"):
            v = (
                u.float() + 0.1 * torch.rand(numel, generator=g)
                if kind == "u≈v"
                else (torch.randn(numel, generator=g))
            )
            ch = 1 << 22
            ref = sum(
                float(torch.dot(x.double(), y.double())) for x, y in zip(u.split(ch), v.split(ch))
            )
            ref_abs = sum(
                float(torch.dot(x.double().abs(), y.double().abs()))
                for x, y in zip(u.split(ch), v.split(ch))
            )
            t0 = time.perf_counter()
            got = hs.dot([u], [v])
            sec = time.perf_counter() - t0
            out.append(
                {
                    "u_dtype": str(dt),
                    "pair": kind,
                    "numel": numel,
                    "err_over_sum_abs": abs(got - ref) / ref_abs,
                    "plain_fp32_dot_err_over_sum_abs": abs(float(torch.dot(u.float(), v)) - ref)
                    / ref_abs,
                    "seconds": sec,
                }
            )
            print(out[-1], flush=True)
            del v
    return out


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def rss_point(args) -> None:
    """One process: a full-reorth run of ``--steps`` steps; prints its resident memory before
    the run and the peak during it (MiB; Linux VmRSS / VmHWM, the peak reset after set-up)."""
    import torch

    import hessian_spectra as hs

    torch.set_num_threads(1)
    op = _op(torch, args.numel, args.tensors)
    v0 = hs.random_probe(op, 0)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base = _status_kib("VmRSS") / 1024
    with tempfile.TemporaryDirectory() as d:
        hs.lanczos(op, args.steps, v0=v0, reorth="full", basis_dir=d if args.offload else None)
    peak = _status_kib("VmHWM") / 1024
    print(json.dumps({"peak_rss_mib": peak, "before_run_mib": base, "growth_mib": peak - base}))


def rss_curve(args) -> list[dict]:
    out = []
    for steps in args.rss_steps:
        for offload in (False, True):
            cmd = [
                sys.executable,
                __file__,
                "--rss-point",
                "--steps",
                str(steps),
                "--numel",
                str(args.rss_numel),
                "--tensors",
                str(args.tensors),
            ]
            cmd += ["--offload"] if offload else []
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row.update(steps=steps, offload=offload, vector_mib=args.rss_numel * 4 / 2**20)
            print(row, flush=True)
            out.append(row)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=20_000_000)
    p.add_argument("--tensors", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps-short", type=int, default=10)
    p.add_argument("--steps-full", type=int, default=20)
    p.add_argument("--rss-numel", type=int, default=4_000_000)
    p.add_argument("--rss-steps", type=int, nargs="*", default=[10, 20, 40, 80])
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--accuracy-numel", type=int, default=100_000_000)
    p.add_argument("--skip-work", action="store_true")
    p.add_argument("--basis-dir", help="also time full reorth with the basis in files here")
    p.add_argument("--out")
    p.add_argument("--rss-point", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_point:
        return rss_point(args)
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "numel": args.numel,
        "tensors": args.tensors,
        "note": "shared machine (other engineers' test runs): compare ratios, not times",
        "load_average": os.getloadavg(),
    }
    if not args.skip_work:
        result["vector_work"] = vector_work(args)
        print(f"\nvector work per step, in copies of a work vector ({args.numel} entries)")
        print(
            f"{'reorth':>7} {'steps':>5} {'basis':>9} {'where':>6} {'work':>8} {'ms/step':>8} "
            f"{'copy ms':>8} {'copies':>7} {'floor':>6}"
        )
        for r in result["vector_work"]["rows"]:
            print(
                f"{r['reorth']!s:>7} {r['steps']:>5} {r['basis_dtype']:>9} {r['basis']:>6} "
                f"{r['work_dtype']:>8} "
                f"{r['ms_per_step']:>8.1f} {r['copy_ms']:>8.1f} {r['copies_per_step']:>7.1f} "
                f"{r['floor_copies']:>6.1f}"
            )
    if not args.skip_rss:
        result["rss"] = rss_curve(args)
        result["rss_note"] = (
            f"full reorth, {args.rss_numel} float32 entries per vector, basis_dir on a disk "
            "(not tmpfs); growth = peak RSS during the run minus RSS before it"
        )
    if args.accuracy_numel:
        result["dot_accuracy"] = dot_accuracy(args.accuracy_numel)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
