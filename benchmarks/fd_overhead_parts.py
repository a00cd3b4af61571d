"""Where an fd product's time goes beyond its two gradient passes, part by part.

Wraps the parts of one default fd product (``HessianOperator.matvec`` with the calibrated step)
in wall-clock timers and prints the mean milliseconds per product of each over ``--products``
products on one of ``benchmarks/hvp_cost.py``'s tiny problems (one thread):

    python benchmarks/fd_overhead_parts.py --problem tiny-transformer

``grad_pass`` is the two gradient passes; the rest is what the guards (snapshot, restore,
finite and weight checks), the step and the error estimate cost. Timers nest (``grad_pass``
includes the forward's and backward's own work only).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--problem", default="tiny-transformer", choices=["tiny-mlp", "tiny-transformer"]
    )
    ap.add_argument("--products", type=int, default=200)
    args = ap.parse_args(argv)

    import hvp_cost

    import hessian_spectra.fd_step as fd
    import hessian_spectra.hvp as hvp
    import hessian_spectra.objective as objective
    import hessian_spectra.operators as operators

    acc: dict[str, float] = {}

    def timed(owner, name):
        f = getattr(owner, name)

        @functools.wraps(f)
        def w(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t

        setattr(owner, name, w)

    def timed_cm(owner, name):
        f = getattr(owner, name)

        @contextlib.contextmanager
        def w(*a, **k):
            t = time.perf_counter()
            cm = f(*a, **k)
            cm.__enter__()
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
            try:
                yield
            finally:
                t = time.perf_counter()
                cm.__exit__(None, None, None)
                acc[name] += time.perf_counter() - t

        setattr(owner, name, w)

    for n in ["revalidate", "sample", "even_norm", "move"]:
        timed(hvp.FDBuffers, n)
    for n in ["theta_key", "theta_norms", "normaliser", "read_grads", "grad_pass"]:
        timed(objective.Objective, n)
    for n in ["stash_grads", "mode"]:
        timed_cm(objective.Objective, n)
    for n in ["_norms", "_norm"]:
        timed(operators, n)
    for n in ["estimate", "best_eps"]:
        timed(fd.FDModel, n)

    ns = argparse.Namespace(
        problem=args.problem, threads=1, device="cpu", dtype="float32", batch=1, seq=64,
        num_batches=1, model="none", attn="default", measures=["fd"], measure=["fd"], steps=4,
        lanczos_plain=False,
    )  # fmt: skip
    _, call, _, info, _ = hvp_cost._setup(ns)
    for _ in range(5):
        call("fd")
    acc.clear()
    t0 = time.perf_counter()
    for _ in range(args.products):
        call("fd")
    total = (time.perf_counter() - t0) / args.products * 1e3
    print(f"{args.problem}: {info['description']}, {info['num_params']:,} parameters")
    print(f"  one fd product: {total:.3f} ms")
    for k, v in sorted(acc.items(), key=lambda x: -x[1]):
        print(f"  {k:<14}{v / args.products * 1e3:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
