"""The shard-local fd GGN against the exact GGN: error and cost.

For each problem this measures, on the same data and unit Rademacher directions ``v``:

- error: ``||G_fd v − G_ref v|| / ||G_ref v||`` with ``G_ref`` the exact GGN product
  (``GGNOperator(method="exact")``; on the tiny float64 transformer also the dense
  ``testing.dense_ggn``), for the default ε and a few multiples of it;
- cost: median seconds of one gradient, one fd Hessian product (``HessianOperator``), one fd GGN
  product and one exact GGN product, after a warm-up call, and their ratios to the gradient.

Problems: ``tiny`` (the two-layer LayerNorm transformer of ``testing.make_problem``, in float32
against its float64 dense GGN) and ``llm`` (the embedded SmolLM2-135M, float32, eager attention,
``--batch`` x ``--seq`` tokens of the embedded text, ``causal_lm_forward`` /
``causal_lm_loss_of_logits``).

    python benchmarks/ggn_fd_vs_exact.py                 # tiny + embedded LLM (~3 min, 1 CPU)
    python benchmarks/ggn_fd_vs_exact.py --problems tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hessian_spectra as hs
from hessian_spectra.ggn import causal_lm_forward, causal_lm_loss_of_logits
from hessian_spectra.testing import dense_ggn, flatten, make_problem


def _tiny():
    def fwd(model, b):
        return model(b)[:, :-1]  # (B, T-1, V)

    def lof(o, b):
        t = b[:, 1:]
        return F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1)), t.numel()

    m64, _, b64 = make_problem("transformer2")
    m32, _, b32 = make_problem("transformer2", dtype=torch.float32)
    G = dense_ggn(m64, fwd, lof, b64)
    return m32, fwd, lof, b32, G, "transformer2 (328 params), float32 vs dense float64 GGN"


def _llm(args):
    from hessian_spectra.data import DataConfig, make_batches
    from hessian_spectra.models import load_model

    lm = load_model(None, dtype="float32", attn_implementation="eager")
    cfg = DataConfig(seq_len=args.seq, batch_size=args.batch, num_batches=1)
    batches = make_batches(lm.tokenizer, cfg)
    n = sum(p.numel() for p in lm.model.parameters())
    desc = f"embedded SmolLM2 ({n / 1e6:.0f}M, float32, eager), 1x{args.batch}x{args.seq} tokens"
    return lm.model, causal_lm_forward, causal_lm_loss_of_logits, batches, None, desc


def _timed(fn, repeats):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _rel(a, b):
    return float((flatten(a) - flatten(b)).norm() / flatten(b).norm())


def measure(name, problem, args) -> dict:
    model, fwd, lof, batches, G, desc = problem
    fd = hs.GGNOperator(model, fwd, lof, batches, method="fd")
    ex = hs.GGNOperator(model, fwd, lof, batches, method="exact")
    hess = hs.HessianOperator(model, lambda m, b: lof(fwd(m, b), b), batches, method="fd")
    errors = []
    for s in range(args.directions):
        v = hs.unit_probe(fd, seed=s)
        ref = ex @ v
        row = {"seed": s, "eps_default": fd.eps_for(v)}
        for mult in (0.1, 1.0, 10.0, 100.0):
            e = fd.eps_for(v) * mult
            row[f"rel_error_fd_eps_x{mult:g}"] = _rel(fd.matvec(v, eps=e), ref)
        if G is not None:
            gv = G @ flatten(v)
            row["rel_error_exact_vs_dense"] = float((flatten(ref) - gv).norm() / gv.norm())
            row["rel_error_fd_vs_dense"] = float((flatten(fd @ v) - gv).norm() / gv.norm())
        errors.append(row)
        print(name, row, flush=True)
    v = hs.unit_probe(fd, seed=0)
    secs = {
        "grad": _timed(fd.gradient, args.repeats),
        "hessian_fd": _timed(lambda: hess @ v, args.repeats),
        "ggn_fd": _timed(lambda: fd @ v, args.repeats),
        "ggn_exact": _timed(lambda: ex @ v, args.repeats),
    }
    ratios = {k: secs[k] / secs["grad"] for k in secs}
    print(
        name,
        "seconds",
        {k: round(x, 4) for k, x in secs.items()},
        "x grad",
        {k: round(x, 2) for k, x in ratios.items()},
        flush=True,
    )
    return {
        "problem": name,
        "description": desc,
        "num_params": fd.num_params,
        "errors": errors,
        "seconds_median": secs,
        "ratio_to_grad": ratios,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=["tiny", "llm"], choices=["tiny", "llm"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--directions", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "ggn_fd_vs_exact.json")
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.problems:
        problem = _tiny() if name == "tiny" else _llm(args)
        results.append(measure(name, problem, args))
    meta = {
        "command": "python benchmarks/ggn_fd_vs_exact.py " + " ".join(argv or []),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": args.threads,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
