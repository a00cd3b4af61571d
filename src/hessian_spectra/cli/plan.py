"""``hessian-spectra plan``: memory per rank and time per Lanczos step, before a run.

A thin command over :mod:`hessian_spectra.plan`; it loads nothing and runs in a second.
"""

from __future__ import annotations

import json
import re
import sys
import traceback

from .errors import EXIT_OK, EXIT_USAGE, PROG, CliError
from .options import positive_float, positive_int, reorth

__all__ = ["add_plan_parser", "run_plan"]

_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_BYTES = {"": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6}
_BYTES |= {"gb": 1e9, "tb": 1e12}


def count(s: str) -> int:
    """A parameter count: ``135M``, ``7B``, ``7e9``, ``1_000_000``.

    >>> count("135M"), count("7b"), count("2.5e6")
    (135000000, 7000000000, 2500000)
    """
    m = re.fullmatch(r"\s*([0-9_.]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", s.lower())
    if not m:
        raise ValueError(f"expected a parameter count such as 135M, 7B or 7e9, got {s!r}")
    n = int(float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2)])
    if n < 1:
        raise ValueError(f"expected a positive parameter count, got {s!r}")
    return n


def size(s: str) -> int:
    """A memory size: ``80GiB``, ``24GB``, ``512MiB``, or bytes.

    >>> size("80GiB"), size("512 MiB")
    (85899345920, 536870912)
    """
    m = re.fullmatch(r"\s*([0-9_.]+)\s*([a-z]*)\s*", s.lower())
    if not m or m.group(2) not in _BYTES:
        raise ValueError(f"expected a size such as 80GiB, 24GB or 512MiB, got {s!r}")
    return int(float(m.group(1).replace("_", "")) * _BYTES[m.group(2)])


def _typed(fn):
    import argparse

    def parse(s):
        try:
            return fn(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def add_plan_parser(sub) -> None:
    """The ``plan`` sub-command's options."""
    p = sub.add_parser(
        "plan",
        help="memory per rank and time per Lanczos step of a run, before running it",
        description="Predicts what one rank holds during a Lanczos run (parameters, gradients, "
        "FD snapshot, HVP vectors, Krylov basis, FSDP buffers, activations if given) and, "
        "with --gradient-seconds and --copy-bandwidth, the time per step (HVP gradients, fd "
        "retries, vector work, scalar all-reduces with --allreduce-seconds). With "
        "--device-memory, recommends a layout (dp, hsdp or fsdp). Loads nothing.",
        epilog="example: hessian-spectra plan --params 7B --layers 32 --world-size 8 "
        "--steps 80 --basis-dtype bfloat16 --device-memory 80GiB",
    )
    p.add_argument("--params", type=_typed(count), required=True, help="e.g. 135M, 7B, 7e9")
    p.add_argument("--layers", type=positive_int, default=32, help="FSDP blocks (default: 32)")
    p.add_argument("--world-size", type=positive_int, default=1, help="ranks (default: 1)")
    p.add_argument(
        "--parallel", choices=("fsdp", "hsdp", "dp"), default="fsdp", help="(default: fsdp)"
    )
    p.add_argument(
        "--replicate", type=positive_int, default=1, help="HSDP replica groups (default: 1)"
    )
    p.add_argument("--steps", type=positive_int, default=16, help="Lanczos steps (default: 16)")
    p.add_argument("--reorth", type=reorth, default="full", help="full, none or a window")
    p.add_argument("--basis-dtype", choices=("float32", "bfloat16", "float64"), default="float32")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32")
    p.add_argument("--method", choices=("fd", "exact", "jvp"), default="fd")
    p.add_argument(
        "--basis", choices=("memory", "files"), default="memory", help="--basis-dir: files"
    )
    p.add_argument("--activations", type=_typed(size), default=0, help="activation memory per rank")
    p.add_argument("--gradient-seconds", type=positive_float, default=None)
    p.add_argument("--copy-bandwidth", type=positive_float, default=None, help="bytes/s")
    p.add_argument(
        "--fd-retry-rate",
        type=float,
        default=0.0,
        help="fraction of fd products whose step is redone, 2 more gradients each "
        "(op.stats['fd_retries'] / matvecs of a short run; default: 0)",
    )
    p.add_argument(
        "--allreduce-seconds",
        type=positive_float,
        default=None,
        help="one scalar all-reduce at this world size (time per step on more than one rank)",
    )
    p.add_argument("--device-memory", type=_typed(size), default=None, help="e.g. 80GiB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--debug", action="store_true", help="full tracebacks")


def run_plan(ns) -> int:
    """Print the plan (and the recommendation); bad combinations exit 2 with one line."""
    from ..plan import plan_run, recommend_parallel

    kw = dict(
        num_steps=ns.steps,
        reorth=ns.reorth,
        basis_dtype=ns.basis_dtype,
        param_dtype=ns.dtype,
        method=ns.method,
        basis=ns.basis,
        num_blocks=ns.layers,
        activation_bytes=ns.activations,
    )
    try:
        plan = plan_run(
            ns.params,
            world_size=ns.world_size,
            parallel=ns.parallel,
            replicate=ns.replicate,
            gradient_seconds=ns.gradient_seconds,
            copy_bandwidth=ns.copy_bandwidth,
            fd_retry_rate=ns.fd_retry_rate,
            allreduce_seconds=ns.allreduce_seconds,
            **kw,
        )
        rec = None
        if ns.device_memory is not None:
            try:
                rec = recommend_parallel(
                    ns.params, world_size=ns.world_size, device_bytes=ns.device_memory, **kw
                )
            except ValueError as e:
                rec = f"none ({e})"
    except (ValueError, CliError) as e:
        if ns.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if ns.json:
        print(json.dumps({**plan.to_dict(), "recommended_parallel": rec}, indent=2))
        return EXIT_OK
    i = plan.inputs
    print(
        f"{ns.params:,} parameters, {i['parallel']} over {i['world_size']} rank(s) (shard "
        f"group {i['shard_size']}), {i['num_steps']} Lanczos steps, reorth {i['reorth']}, "
        f"{i['basis_dtype']} basis in {i['basis']}, method {i['method']}; per rank:"
    )
    print(plan.table())
    if rec is not None:
        print(f"recommended layout for {ns.device_memory / 2**30:.1f} GiB per device: {rec}")
    return EXIT_OK
