"""One gradient and one FD HVP under FSDP2 at several world sizes: time, memory, bytes moved.

    python benchmarks/scaling.py                       # world sizes 1 and 2, prints a table
    python benchmarks/scaling.py --world-sizes 1 2 4 --hidden 512 --layers 8 --out scaling.json
    python benchmarks/scaling.py --world-sizes 2 --parallel dp     # a whole replica per rank

Every world size is a ``torchrun --standalone`` launch of this file (``--worker``) on the same
GLOBAL data (``--rows`` sequences per batch, split by rows over the ranks), with
OMP_NUM_THREADS=1 per rank. The model is a Llama built from a config (float32, random
weights, seed 0) and spread with ``hessian_spectra.distributed.parallelize(model, --parallel,
replicate=--replicate)`` (FSDP2 per decoder layer, then the root; default fsdp). Measured per rank, after one warm-up call of each:

- seconds of ``op.gradient()`` and of ``op.matvec(v)`` (median of ``--repeats``);
- bytes handed to ``torch.distributed`` collectives during one call, by kind: every
  collective function is wrapped (outermost call counted once); an all-gather counts its
  gathered output, a reduce-scatter its full input, an all-reduce its tensor. A ring moves
  about (N-1)/N of that per rank. An all-reduce of at most 1 KiB counts as a scalar
  all-reduce (dots, weights), a larger one (``dp``/``hsdp`` gradients) as model traffic. The claim checked: an FD HVP moves exactly what two
  gradient passes move, plus a few float64 scalars (global dot products / weights);
- peak resident memory of the rank (``ru_maxrss``) above what it used before building the
  model, and the bytes of its local parameter shards.

With ``--lanczos-steps N`` it also runs an N-step Lanczos run per world size and prints two
tables: the peak memory per rank against ``hessian_spectra.plan`` and the seconds per step
(the products, the vector work and the scalar all-reduces) against the plan from inputs
measured in the same run (one gradient's seconds, the copy bandwidth, one scalar all-reduce's
seconds, the fd retry rate; ``_time_table``).

On CPU ranks share the machine's cores: timings say what the cores allow, not what GPUs
would; the bytes and their ratios do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "_all_gather_base",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "_reduce_scatter_base",
    "all_reduce",
    "broadcast",
    "all_to_all_single",
    "all_gather_object",
    "broadcast_object_list",
)


class CollectiveCounter:
    """Wraps ``torch.distributed`` collectives and adds up the bytes each call hands over."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.local = threading.local()
        self.reset()
        self._orig = {}
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._orig[name] = fn
                setattr(dist, name, self._wrap(name, fn))

    def reset(self):
        self.bytes, self.calls = {}, {}

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            depth = getattr(self.local, "depth", 0)
            if depth == 0:
                n = self._payload(name, args, kwargs)
                kind = self._kind(name)
                if kind == "all_reduce" and n > 1024:
                    kind = "all_reduce_model"  # a gradient (dp / hsdp), not a scalar
                self.bytes[kind] = self.bytes.get(kind, 0) + n
                self.calls[kind] = self.calls.get(kind, 0) + 1
            self.local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.local.depth = depth

        return wrapper

    @staticmethod
    def _kind(name):
        for k in ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "all_to_all"):
            if k in name:
                return k
        return name

    @staticmethod
    def _nbytes(t):
        import torch

        if isinstance(t, torch.Tensor):
            return t.numel() * t.element_size()
        if isinstance(t, (list, tuple)):
            return sum(CollectiveCounter._nbytes(x) for x in t)
        return 0

    def _payload(self, name, args, kwargs):
        if name.startswith("all_gather") or name == "_all_gather_base":
            return self._nbytes(
                args[0] if args else kwargs.get("output_tensor", kwargs.get("tensor_list"))
            )
        if name.startswith("reduce_scatter") or name == "_reduce_scatter_base":
            return self._nbytes(
                args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_list"))
            )
        return self._nbytes(args[0] if args else next(iter(kwargs.values()), None))

    def snapshot(self):
        return {"bytes": dict(self.bytes), "calls": dict(self.calls)}


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


COPY_PROBE_BYTES = 64 * 2**20


def _time_inputs(op, ws: int, D, repeats: int = 7) -> dict:
    """What the time plan takes, measured as a user would before a run, on this rank.

    ``copy_bandwidth``: bytes per second (read + write) of ``b.copy_(a)`` in the operator's
    dtype over the larger of one local vector and ``COPY_PROBE_BYTES`` (out of this machine's
    32 MiB L3, as the kept basis is), all ranks at once after a barrier (they share the
    memory system, as in the run); median of ``repeats``. ``allreduce_seconds``: one float64
    scalar all-reduce at this world size (mean of 20 after a barrier; 0 for one rank).
    """
    import torch

    n = sum(D.local(p).numel() for p in op.params)
    item = torch.empty(0, dtype=op.vector_dtype).element_size()
    a = torch.ones(max(n, COPY_PROBE_BYTES // item), dtype=op.vector_dtype)
    b = torch.empty_like(a)
    b.copy_(a)  # touch the pages
    D.barrier()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    bw = 2 * a.numel() * a.element_size() / statistics.median(times)
    del a, b
    lat = 0.0
    if ws > 1:
        import torch.distributed as dist

        x = torch.zeros(1, dtype=torch.float64)
        dist.all_reduce(x)
        D.barrier()
        t0 = time.perf_counter()
        for _ in range(20):
            dist.all_reduce(x)
        lat = (time.perf_counter() - t0) / 20
    return {"copy_bandwidth": bw, "allreduce_seconds": lat, "local_numel": n}


def worker(args) -> int:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from hessian_spectra import HessianOperator, random_probe
    from hessian_spectra import distributed as D

    def main():
        from transformers import LlamaConfig, LlamaForCausalLM

        counter = CollectiveCounter()
        rss0 = _rss_bytes()  # after the imports: what the model, data and calls add

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 8 // 3,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64),
            num_key_value_heads=max(1, args.hidden // 64),
            max_position_embeddings=args.seq,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
        model = D.parallelize(
            LlamaForCausalLM(cfg).float().eval(), args.parallel, replicate=args.replicate
        )
        g = torch.Generator().manual_seed(1)
        ws, r = D.world_size(), D.rank()
        if args.rows % ws:
            raise ValueError(f"--rows {args.rows} must be divisible by the world size {ws}")
        lo, hi = args.rows * r // ws, args.rows * (r + 1) // ws
        batches = []
        for _ in range(args.batches):
            ids = torch.randint(0, args.vocab, (args.rows, args.seq), generator=g)
            batches.append(ids[lo:hi])  # (rows / ws, seq): this rank's rows of the global batch

        def loss_fn(model, ids):
            logits = model(input_ids=ids).logits  # (B, T, V)
            tgt = ids[:, 1:].reshape(-1)
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt), tgt.numel()

        op = HessianOperator(model, loss_fn, batches)
        v = random_probe(op, 0)
        rss_built = _rss_bytes() - rss0  # model shards, data, one probe
        op.gradient()  # warm-up (and the operator's one-time checks)
        peak_gradient = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        op.matvec(v)
        out = {"rank": r, "world_size": ws}
        for what, call in (("gradient", op.gradient), ("hvp", lambda: op.matvec(v))):
            times = []
            for i in range(args.repeats):
                counter.reset()
                D.barrier()
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
                if i == 0:
                    out[f"{what}_comm"] = counter.snapshot()
            out[f"{what}_seconds"] = statistics.median(times)
        out["local_param_bytes"] = sum(
            D.local(p).numel() * D.local(p).element_size() for p in op.params
        )
        out["num_params"] = op.num_params
        out["rss_after_build_bytes"] = rss_built
        out["peak_gradient_above_start_bytes"] = peak_gradient
        out["peak_hvp_above_start_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        )
        if args.lanczos_steps:
            from hessian_spectra import lanczos

            reorth = int(args.reorth) if args.reorth.isdigit() else args.reorth
            out.update(_time_inputs(op, ws, D))
            stats0 = dict(op.stats)
            counter.reset()
            D.barrier()
            t0 = time.perf_counter()
            res = lanczos(op, args.lanczos_steps, reorth=reorth, basis_dtype=args.basis_dtype)
            out["lanczos_seconds"] = time.perf_counter() - t0
            out["lanczos_comm"] = counter.snapshot()
            out["lanczos_steps_done"] = res.num_steps
            out["lanczos_vector_seconds"] = res.vector_seconds
            out["lanczos_matvec_seconds"] = res.matvec_seconds
            out["lanczos_io_seconds"] = res.io_seconds
            for k in ("matvecs", "fd_retries", "fd_calibration_gradients"):
                out[f"lanczos_{k}"] = op.stats.get(k, 0) - stats0.get(k, 0)
        if torch.cuda.is_available():  # the allocator's own peak, where there is one
            out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_rss_above_start_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        )
        per_rank = D.all_gather_object(out)
        D.write_json0(args.worker_out, per_rank)
        return 0

    return D.launch(main)


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def launcher(args) -> int:
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    passthrough = [
        "--hidden",
        str(args.hidden),
        "--layers",
        str(args.layers),
        "--vocab",
        str(args.vocab),
        "--seq",
        str(args.seq),
        "--rows",
        str(args.rows),
        "--batches",
        str(args.batches),
        "--repeats",
        str(args.repeats),
        "--lanczos-steps",
        str(args.lanczos_steps),
        "--reorth",
        args.reorth,
        "--basis-dtype",
        args.basis_dtype,
        "--parallel",
        args.parallel,
        *(["--replicate", str(args.replicate)] if args.replicate else []),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for ws in args.world_sizes:
            out = Path(tmp) / f"ws{ws}.json"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={ws}",
                "--max-restarts=0",
                __file__,
                "--worker",
                "--worker-out",
                str(out),
                *passthrough,
            ]
            print(f"world size {ws}: {' '.join(cmd[1:4])} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(
                cmd, env=env, timeout=args.timeout, capture_output=True, text=True
            )
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
                return proc.returncode
            results[ws] = json.loads(out.read_text())

    import torch

    rows, base = [], None
    for ws, ranks in results.items():
        gb = [sum(rk["gradient_comm"]["bytes"].values()) for rk in ranks]
        hb = [sum(rk["hvp_comm"]["bytes"].values()) for rk in ranks]
        g_big = [
            sum(b for k, b in rk["gradient_comm"]["bytes"].items() if k != "all_reduce")
            for rk in ranks
        ]
        h_big = [
            sum(b for k, b in rk["hvp_comm"]["bytes"].items() if k != "all_reduce") for rk in ranks
        ]
        h_small = [rk["hvp_comm"]["bytes"].get("all_reduce", 0) for rk in ranks]
        g_small = [rk["gradient_comm"]["bytes"].get("all_reduce", 0) for rk in ranks]
        h_ar_calls = [rk["hvp_comm"]["calls"].get("all_reduce", 0) for rk in ranks]
        row = {
            "world_size": ws,
            "gradient_s": max(rk["gradient_seconds"] for rk in ranks),
            "hvp_s": max(rk["hvp_seconds"] for rk in ranks),
            "gradient_comm_bytes_per_rank": max(gb),
            "hvp_comm_bytes_per_rank": max(hb),
            "fsdp_bytes_gradient": max(g_big),
            "fsdp_bytes_hvp": max(h_big),
            "scalar_allreduce_bytes_gradient": max(g_small),
            "scalar_allreduce_bytes_hvp": max(h_small),
            "scalar_allreduce_calls_hvp": max(h_ar_calls),
            "scalar_allreduce_calls_gradient": max(
                rk["gradient_comm"]["calls"].get("all_reduce", 0) for rk in ranks
            ),
            "peak_rss_above_start_bytes": max(rk["peak_rss_above_start_bytes"] for rk in ranks),
            "rss_after_build_bytes": max(rk["rss_after_build_bytes"] for rk in ranks),
            "local_param_bytes": max(rk["local_param_bytes"] for rk in ranks),
            "per_rank": ranks,
        }
        row["hvp_over_gradient_time"] = row["hvp_s"] / row["gradient_s"]
        row["hvp_over_gradient_fsdp_bytes"] = (
            (row["fsdp_bytes_hvp"] / row["fsdp_bytes_gradient"])
            if row["fsdp_bytes_gradient"]
            else None
        )
        if base is None:
            base = row
        row["hvp_speedup_vs_first"] = base["hvp_s"] / row["hvp_s"]
        rows.append(row)

    num_params = results[args.world_sizes[0]][0]["num_params"]
    print(
        f"\nLlama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {num_params / 1e6:.2f} M params (fp32); "
        f"{args.batches} batches x {args.rows} rows x {args.seq} tokens, global; --parallel {args.parallel}; torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS=1 per rank\n"
    )
    hdr = (
        "ws",
        "grad s",
        "HVP s",
        "HVP/grad",
        "speedup",
        "FSDP bytes grad",
        "FSDP bytes HVP",
        "HVP/grad bytes",
        "scalar all-reduce grad",
        "scalar all-reduce HVP",
        "local params",
        "RSS+ built",
        "peak RSS+",
    )
    lines = [hdr]
    for r in rows:
        lines.append(
            (
                str(r["world_size"]),
                f"{r['gradient_s']:.3f}",
                f"{r['hvp_s']:.3f}",
                f"{r['hvp_over_gradient_time']:.2f}",
                f"{r['hvp_speedup_vs_first']:.2f}",
                _fmt_bytes(r["fsdp_bytes_gradient"]),
                _fmt_bytes(r["fsdp_bytes_hvp"]),
                "-"
                if r["hvp_over_gradient_fsdp_bytes"] is None
                else f"{r['hvp_over_gradient_fsdp_bytes']:.4f}",
                f"{r['scalar_allreduce_bytes_gradient']} B / {r['scalar_allreduce_calls_gradient']} calls",
                f"{r['scalar_allreduce_bytes_hvp']} B / {r['scalar_allreduce_calls_hvp']} calls",
                _fmt_bytes(r["local_param_bytes"]),
                _fmt_bytes(r["rss_after_build_bytes"]),
                _fmt_bytes(r["peak_rss_above_start_bytes"]),
            )
        )
    _print_table(lines)
    print(
        "\nbytes: per rank, per call, handed to collectives (all-gather: gathered output; reduce-scatter: input);\n"
        f"time: slowest rank, median of {args.repeats}; speedup: HVP time of the first world size / this one;\n"
        "RSS+: resident memory of the busiest rank above its size after imports (built: model, data, probe;"
        " peak: during the calls)"
    )
    plans = _plan_table(args, results, num_params) if args.lanczos_steps else None
    times = _time_table(args, results, num_params) if args.lanczos_steps else None
    record = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out")},
        "num_params": num_params,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "plan_vs_measured": plans,
        "plan_time_vs_measured": times,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _plan_table(args, results, num_params) -> list[dict]:
    """Predicted (``hessian_spectra.plan``) against measured peak memory per rank of the run.

    The activations are the plan's one input measured here: what one gradient adds above the
    built model, less the gradient itself and FSDP's buffers as the plan counts them. The rest
    (parameters, gradients, snapshot, HVP vectors, Krylov basis, FSDP buffers) is predicted;
    ``other`` is what the built model holds beyond its parameters (data, probe), measured.
    """
    from hessian_spectra.plan import plan_run

    reorth = int(args.reorth) if args.reorth.isdigit() else args.reorth
    mem_keys = ("params", "grads", "snapshot", "hvp_out", "basis", "fsdp", "activations")
    out = []
    print(
        f"\nmemory per rank: hessian_spectra.plan against measured, Lanczos {args.lanczos_steps} "
        f"steps, reorth {args.reorth}, basis {args.basis_dtype} (busiest rank)"
    )
    hdr = ("ws", "params", "grads", "snapshot", "hvp_out", "basis", "fsdp", "activ.", "other")
    hdr += ("predicted", "measured", "pred/meas")
    lines = [hdr]
    for ws, ranks in results.items():
        rk = max(ranks, key=lambda r: r["peak_rss_above_start_bytes"])
        parallel = args.parallel if ws > 1 else "fsdp"
        kw = dict(
            world_size=ws,
            parallel=parallel,
            replicate=(args.replicate or 1) if parallel == "hsdp" else 1,
            num_steps=args.lanczos_steps,
            reorth=reorth,
            basis_dtype=args.basis_dtype,
            num_blocks=args.layers + 1,
        )
        base = plan_run(num_params, **kw)
        grad_extra = rk["peak_gradient_above_start_bytes"] - rk["rss_after_build_bytes"]
        act = max(0, grad_extra - base.memory["grads"] - base.memory["fsdp"])
        plan = plan_run(num_params, activation_bytes=act, **kw)
        other = max(0, rk["rss_after_build_bytes"] - rk["local_param_bytes"])
        predicted = plan.total_bytes + other
        measured = rk["peak_rss_above_start_bytes"]
        row = {
            "world_size": ws,
            "plan": plan.to_dict(),
            "other_bytes": other,
            "predicted_bytes": predicted,
            "measured_bytes": measured,
        }
        out.append(row)
        lines.append(
            (str(ws),)
            + tuple(_fmt_bytes(plan.memory[k]) for k in mem_keys)
            + (_fmt_bytes(other), _fmt_bytes(predicted), _fmt_bytes(measured))
            + (f"{predicted / measured:.2f}",)
        )
    _print_table(lines)
    print(
        "activ.: one gradient's peak above the built model less its gradient and FSDP buffers "
        "(measured); other: the built model beyond its parameters (measured); the rest predicted"
    )
    return out


def _print_table(lines) -> None:
    """Print rows of strings right-aligned in columns, the first row a header with a rule."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    for i, row in enumerate(lines):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _time_table(args, results, num_params) -> list[dict]:
    """Predicted (``hessian_spectra.plan``) against measured seconds per Lanczos step.

    The plan's inputs, measured on the slowest rank as a user would before a run: one
    gradient's seconds at that world size (FSDP's collectives included), the copy bandwidth
    and one scalar all-reduce's seconds (``_time_inputs``); the fd retry rate is read off
    this run's operator (``op.stats``). Predicted twice: without retries (2 gradients per
    product) and with the measured rate. Measured: the Lanczos run's seconds per step and its
    split (``matvec_seconds``: the products; ``vector_seconds``: the recurrence, its dots'
    all-reduces included).
    """
    from hessian_spectra.plan import plan_run

    reorth = int(args.reorth) if args.reorth.isdigit() else args.reorth
    cores = os.cpu_count() or 1
    out = []
    print(
        f"\ntime per Lanczos step: hessian_spectra.plan against measured, {args.lanczos_steps} "
        f"steps, reorth {args.reorth}, basis {args.basis_dtype} (slowest rank; inputs measured "
        "in the same run: grad s, copy GB/s, all-reduce µs, retries)"
    )
    hdr = ("ws", "grad s", "copy GB/s", "all-red. µs", "retries", "grads/step")
    hdr += ("HVP pred", "HVP meas", "p/m", "vec+AR pred", "vec meas", "p/m")
    hdr += ("AR/step p/c", "step pred", "step meas", "p/m", "p/m no retry")
    lines = [hdr]
    for ws, ranks in results.items():
        rk = max(ranks, key=lambda r: r["lanczos_seconds"])
        n = rk["lanczos_steps_done"]
        rate = rk["lanczos_fd_retries"] / max(rk["lanczos_matvecs"], 1)
        parallel = args.parallel if ws > 1 else "fsdp"
        kw = dict(
            world_size=ws,
            parallel=parallel,
            replicate=(args.replicate or 1) if parallel == "hsdp" else 1,
            num_steps=n,
            reorth=reorth,
            basis_dtype=args.basis_dtype,
            num_blocks=args.layers + 1,
            gradient_seconds=rk["gradient_seconds"],
            copy_bandwidth=rk["copy_bandwidth"],
            allreduce_seconds=rk["allreduce_seconds"],
        )
        plain = plan_run(num_params, **kw).step_seconds
        pred = plan_run(num_params, fd_retry_rate=rate, **kw).step_seconds
        meas = {
            "hvp": rk["lanczos_matvec_seconds"] / n,
            "vectors": rk["lanczos_vector_seconds"] / n,
            "io": rk["lanczos_io_seconds"] / n,
            "total": rk["lanczos_seconds"] / n,
            "scalar_allreduces_per_step": rk["lanczos_comm"]["calls"].get("all_reduce", 0) / n,
        }
        row = {
            "world_size": ws,
            "oversubscribed": ws > cores,
            "inputs": {
                "gradient_seconds": rk["gradient_seconds"],
                "copy_bandwidth": rk["copy_bandwidth"],
                "allreduce_seconds": rk["allreduce_seconds"],
                "fd_retry_rate": rate,
            },
            "predicted_no_retries": plain,
            "predicted": pred,
            "measured": meas,
            "hvp_seconds_outside_lanczos": rk["hvp_seconds"],
        }
        out.append(row)
        vec_pred = pred["vectors"] + pred["collectives"]
        lines.append(
            (
                f"{ws}{'*' if ws > cores else ''}",
                f"{rk['gradient_seconds']:.3f}",
                f"{rk['copy_bandwidth'] / 1e9:.1f}",
                f"{rk['allreduce_seconds'] * 1e6:.0f}",
                f"{rk['lanczos_fd_retries']}/{rk['lanczos_matvecs']}",
                f"{pred['gradients_per_step']:.2f}",
                f"{pred['hvp']:.3f}",
                f"{meas['hvp']:.3f}",
                f"{pred['hvp'] / meas['hvp']:.2f}",
                f"{vec_pred:.3f}",
                f"{meas['vectors']:.3f}",
                f"{vec_pred / meas['vectors']:.2f}",
                f"{pred['scalar_allreduces_per_step']:.1f}/"
                f"{meas['scalar_allreduces_per_step']:.1f}",
                f"{pred['total']:.3f}",
                f"{meas['total']:.3f}",
                f"{pred['total'] / meas['total']:.2f}",
                f"{plain['total'] / meas['total']:.2f}",
            )
        )
    _print_table(lines)
    print(
        "seconds per step; HVP meas: the Lanczos run's products; vec meas: its recurrence (dots' "
        "all-reduces included); AR/step: scalar all-reduces predicted/counted; p/m no retry: "
        "the plan with 2 gradients per product"
    )
    if any(r["oversubscribed"] for r in out):
        print(
            f"*: {max(results)} ranks on {cores} cores (OMP_NUM_THREADS=1 each): the ranks take "
            "turns on the cores; the inputs are measured under the same sharing"
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--rows", type=int, default=4, help="sequences per global batch (split over ranks)"
    )
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--parallel", choices=["fsdp", "dp", "hsdp"], default="fsdp")
    ap.add_argument("--replicate", type=int, default=None, help="replicas for --parallel hsdp")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument(
        "--lanczos-steps",
        type=int,
        default=0,
        help="also run a Lanczos run of this many steps and compare its peak memory per rank "
        "and its seconds per step with hessian_spectra.plan's prediction (0: skip)",
    )
    ap.add_argument("--reorth", default="full", help="Lanczos reorthogonalisation (full|none|r)")
    ap.add_argument("--basis-dtype", default="float32", help="Lanczos basis dtype")
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return worker(args) if args.worker else launcher(args)


if __name__ == "__main__":
    sys.exit(main())
