"""The fd step and its error estimate against the best step of a sweep (issue 8).

For each model: calibrate the operator's error model (``op.calibrate_fd()``), then along a
unit random probe, the top Ritz vector and Lanczos vectors 2..K of an exact Lanczos run:
sweep the step over a log grid centred on the default (``--points`` points, ±``--decades``),
measure every error against the exact (double-backward) HVP, and report the default step, its
error, the error model's estimate for that product, the sweep's best step and error, the ratio
default/best, and the fit of Thm 3.1 (``a ε² + b/ε``, slopes). Tiny models (the issue's sizes:
a 2.5k-parameter MLP, a 4.5k one-block transformer, a 3.7k CNN, float32) also get the top-1
eigenvalue error of 40 fd Lanczos steps (central and four-point) against float64 exact Lanczos,
and the time of one product of each stencil.

    python benchmarks/fd_step.py --json benchmarks/results/fd_step_tiny.json
    python benchmarks/fd_step.py --model embedded --seq-len 256 --lanczos 5 \\
        --json benchmarks/results/fd_step_smollm2.json        # SmolLM2-135M, ~30 min on 1 CPU
    python benchmarks/fd_step.py --low-precision --json benchmarks/results/fd_low_precision.json
    python benchmarks/fd_step.py --low-precision --model embedded --seq-len 256 \\
        --json benchmarks/results/fd_low_precision_smollm2.json

``--low-precision``: fd in bf16 three ways, against the exact float64 (tiny) / float32 (LLM)
HVP along a unit random probe (and, tiny, the second Lanczos vector): bf16 parameters; float32
parameters under ``torch.autocast(bfloat16)``; float32 parameters cast to bf16 for compute (what
FSDP2 ``MixedPrecisionPolicy(param_dtype=bfloat16)`` does). Per setting: the error at each step
of a sweep, the default step's error and estimate, and the fraction of the perturbation lost
to bf16 rounding (``fd_step.perturbation_rounding``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hessian_spectra as hs
from hessian_spectra.fd_step import fit_error_model, perturbation_rounding
from hessian_spectra.testing import TinyTransformer, ce_loss, lm_loss, mse_loss, perturb_
from hessian_spectra.vectors import norm


class MLP(nn.Module):
    """16 -> 48 -> 32 -> 4, tanh: 2516 parameters."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 48), nn.Linear(48, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class CNN(nn.Module):
    """conv(1->8) -> conv(8->16) -> avg-pool -> 144 -> 16 -> 10, tanh: 3738 parameters."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3)
        self.f1, self.f2 = nn.Linear(144, 16), nn.Linear(16, 10)

    def forward(self, x):  # (B, 1, 10, 10)
        h = F.avg_pool2d(torch.tanh(self.c2(torch.tanh(self.c1(x)))), 2)
        return self.f2(torch.tanh(self.f1(h.flatten(1))))


def tiny_problem(kind: str, dtype=torch.float32, seed: int = 0):
    """(model, loss_fn, batches) of the issue-sized tiny models."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "mlp":
        m, loss = MLP(), mse_loss
        bs = [(torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)) for _ in "ab"]
    elif kind == "cnn":
        m, loss = CNN(), ce_loss
        bs = [
            (torch.randn(16, 1, 10, 10, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in "ab"
        ]
    else:
        m, loss = perturb_(TinyTransformer(vocab=20, d=24, n_layer=1, max_len=16)), lm_loss
        bs = [torch.randint(0, 20, (4, 16), generator=g) for _ in "ab"]

    def cast(b):
        if isinstance(b, tuple):
            return tuple(cast(t) for t in b)
        return b.to(dtype) if b.is_floating_point() else b

    return m.to(dtype).eval(), loss, [cast(b) for b in bs]


def ritz_top(r):
    """The top Ritz vector of a Lanczos result with its basis."""
    k = len(r.alpha)
    T = np.diag(r.alpha) + np.diag(r.beta[: k - 1], 1) + np.diag(r.beta[: k - 1], -1)
    w, S = np.linalg.eigh(T)
    y = S[:, int(np.argmax(w))]
    return hs.lincomb(y.tolist(), r.basis)


def direction_row(op, u, ref, points, decades):
    """Default step vs a sweep along unit ``u`` against the exact product ``ref``."""
    rn = norm(ref)

    def err(h):
        return norm([a.double() - b.double() for a, b in zip(h, ref)]) / rn

    t0 = time.perf_counter()
    h = op.matvec(u)
    est = op.last_fd_error_estimate
    e0 = est.eps
    d = err(h)
    grid = e0 * np.logspace(-decades, decades, points)
    errs = [err(op.matvec(u, eps=float(e))) for e in grid]
    k = int(np.argmin(errs))
    try:
        fit = fit_error_model(grid, errs).to_dict()
    except ValueError as ex:
        fit = {"error": str(ex)}
    return {
        "default_eps": e0,
        "default_error": d,
        "estimate": est.rel_error,
        "estimate_over_true": est.rel_error / d,
        "best_eps": float(grid[k]),
        "best_error": errs[k],
        "default_over_best": d / errs[k],
        "sweep": {"eps": grid.tolist(), "error": errs},
        "fit": fit,
        "seconds": time.perf_counter() - t0,
    }


def run_tiny(args):
    out = {}
    for kind in ("mlp", "transformer", "cnn"):
        m, loss, bs = tiny_problem(kind)
        op = hs.HessianOperator(m, loss, bs, method="fd")
        ex = hs.HessianOperator(m, loss, bs, method="exact")
        fm = op.calibrate_fd()
        r = hs.lanczos(ex, 40, return_basis=True)
        dirs = {"random probe": hs.unit_probe(op, 1), "top Ritz vector": ritz_top(r)}
        for j in range(1, args.lanczos):
            dirs[f"Lanczos vector {j + 1}"] = r.basis[j]
        rows = {}
        for name, u in dirs.items():
            u = [t.float() for t in u]
            u = [t / norm(u) for t in u]
            rows[name] = direction_row(op, u, ex.matvec(u), args.points, args.decades)
            x = rows[name]
            print(
                f"{kind:11s} {name:18s} default {x['default_eps']:.2g} "
                f"err {x['default_error']:.2g}"
                f" (est {x['estimate']:.2g}) | best {x['best_eps']:.2g} err {x['best_error']:.2g}"
                f" | ×{x['default_over_best']:.2f}",
                flush=True,
            )
        m64, l64, b64 = tiny_problem(kind, torch.float64)
        lam = float(
            np.max(hs.lanczos(hs.HessianOperator(m64, l64, b64, method="exact"), 80).ritz_values)
        )
        top1, secs = {}, {}
        for st in ("central", "four-point"):
            o = hs.HessianOperator(m, loss, bs, method="fd", stencil=st)
            o.calibrate_fd()
            rr = hs.lanczos(o, 40)
            top1[st] = abs(float(np.max(rr.ritz_values)) - lam) / abs(lam)
            u = hs.unit_probe(o, 2)
            t0 = time.perf_counter()
            for _ in range(5):
                o.matvec(u)
            secs[st] = (time.perf_counter() - t0) / 5
        print(f"{kind:11s} top-1 rel. error (40 steps): {top1}; s/product {secs}", flush=True)
        out[kind] = {
            "num_params": op.num_params,
            "fd_model": fm.to_dict(),
            "directions": rows,
            "top1_rel_error_40_steps": top1,
            "lambda_max_float64": lam,
            "seconds_per_product": secs,
        }
    return out


def run_llm(args):
    from hessian_spectra.data import DataConfig, causal_lm_loss, make_batches
    from hessian_spectra.models import load_model

    lm = load_model(args.model)
    cfg = DataConfig(seq_len=args.seq_len, batch_size=args.batch_size, num_batches=1)
    batches = make_batches(lm.tokenizer, cfg)
    op = hs.HessianOperator(lm.model, causal_lm_loss, batches, method="fd")
    ex = hs.HessianOperator(lm.model, causal_lm_loss, batches, method="exact")
    t0 = time.perf_counter()
    fm = op.calibrate_fd()
    print(f"calibration {time.perf_counter() - t0:.0f} s: {fm}", flush=True)
    out = {
        "model": args.model,
        "tokens": args.seq_len * args.batch_size,
        "num_params": op.num_params,
        "fd_model": fm.to_dict(),
        "directions": {},
    }
    # the perturbation lost to bf16 rounding along a unit random probe (no gradient needed)
    u = hs.unit_probe(op, 1)
    out["bf16_perturbation_lost"] = {
        f"{e:g}": perturbation_rounding(op.params, u, e, torch.bfloat16)
        for e in (0.01, 0.1, 1.0, 10.0, 100.0)
    }
    print("bf16 lost fraction along a unit probe:", out["bf16_perturbation_lost"], flush=True)
    rows = out["directions"]
    rows["random probe"] = direction_row(op, u, ex.matvec(u), args.points, args.decades)
    print(
        "random probe", {k: v for k, v in rows["random probe"].items() if k != "sweep"}, flush=True
    )
    del u
    r = hs.lanczos(ex, args.lanczos, return_basis=True)
    for j in range(1, args.lanczos):
        q = [t.float() for t in r.basis[j]]
        rows[f"Lanczos vector {j + 1}"] = x = direction_row(
            op, q, ex.matvec(q), args.points, args.decades
        )
        print(f"Lanczos vector {j + 1}", {k: v for k, v in x.items() if k != "sweep"}, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    return out


class _Bound:
    def __init__(self, model, pd):
        self.model, self.pd = model, pd

    def __call__(self, *a, **k):
        return torch.func.functional_call(self.model, self.pd, a, k)

    def parameters(self):
        return iter(self.pd.values())


def _as_float(out):
    return (out[0].float(), out[1]) if isinstance(out, tuple) else out.float()


def bf16_cast_loss(loss):
    """float32 parameters cast to bf16 for the forward (FSDP2 MixedPrecisionPolicy semantics)."""

    def f(model, batch):
        pd = {n: p.to(torch.bfloat16) for n, p in model.named_parameters()}
        return _as_float(loss(_Bound(model, pd), _cast_bf16(batch)))

    return f


def autocast_loss(loss):
    """float32 parameters, bf16 compute under torch.autocast."""

    def f(model, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _as_float(loss(model, batch))

    return f


def _cast_bf16(b):
    if isinstance(b, dict):
        return {k: _cast_bf16(t) for k, t in b.items()}
    if isinstance(b, tuple):
        return tuple(_cast_bf16(t) for t in b)
    return b.to(torch.bfloat16) if b.is_floating_point() else b


def _low_precision_setups(m32, loss, b32):
    import copy

    mb = copy.deepcopy(m32).to(torch.bfloat16)
    return {
        "bf16 parameters": (mb, loss, [_cast_bf16(b) for b in b32]),
        "fp32 parameters, bf16 autocast": (m32, autocast_loss(loss), b32),
        "fp32 parameters cast to bf16 (FSDP2 MixedPrecisionPolicy)": (
            m32,
            bf16_cast_loss(loss),
            b32,
        ),
    }


def _low_precision_rows(setups, dirs, refs, grid, calibrate=True):
    import warnings

    out = {}
    for name, (m, loss, bs) in setups.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            op = hs.HessianOperator(
                m, loss, bs, method="fd", allow_low_precision_fd=True, fd_calibration=calibrate
            )
        rows = {}
        for dn, u in dirs.items():
            ref = refs[dn]
            rn = norm(ref)
            uu = [t.to(op.vector_dtype) for t in u]

            def err(h, ref=ref, rn=rn):
                return norm([a.double() - b.double() for a, b in zip(h, ref)]) / rn

            sweep = [err(op.matvec(uu, eps=float(e))) for e in grid]
            row = {
                "sweep": {"eps": list(map(float, grid)), "error": sweep},
                "lost_to_rounding": {
                    f"{e:g}": perturbation_rounding(op.params, uu, float(e), torch.bfloat16)
                    for e in grid
                },
            }
            if calibrate:
                d = err(op.matvec(uu))
                est = op.last_fd_error_estimate
                row.update(default_eps=est.eps, default_error=d, estimate=est.rel_error)
            k = int(np.argmin(sweep))
            row.update(best_eps=float(grid[k]), best_error=sweep[k])
            rows[dn] = row
            print(
                f"{name:58s} {dn:16s} best eps {grid[k]:.2g} err {sweep[k]:.2g}"
                + (
                    f" | default eps {row['default_eps']:.2g} err {row['default_error']:.2g}"
                    f" est {row['estimate']:.2g}"
                    if calibrate
                    else ""
                )
                + " | lost "
                + " ".join(f"{v:.2g}" for v in row["lost_to_rounding"].values()),
                flush=True,
            )
        out[name] = rows
    return out


def run_low_precision(args):
    if args.model != "tiny":
        from hessian_spectra.data import DataConfig, causal_lm_loss, make_batches
        from hessian_spectra.models import load_model

        lm = load_model(args.model)
        cfg = DataConfig(seq_len=args.seq_len, batch_size=args.batch_size, num_batches=1)
        bs = make_batches(lm.tokenizer, cfg)
        ex = hs.HessianOperator(lm.model, causal_lm_loss, bs, method="exact")
        u = hs.unit_probe(ex, 1)
        refs = {"random probe": ex.matvec(u)}
        grid = np.array([1.0, 3.0, 10.0, 30.0, 100.0])
        setups = _low_precision_setups(lm.model, causal_lm_loss, bs)
        return {
            "model": args.model,
            "tokens": args.seq_len * args.batch_size,
            "settings": _low_precision_rows(setups, {"random probe": u}, refs, grid),
        }
    out = {}
    for kind in ("mlp", "transformer", "cnn"):
        m64, loss, b64 = tiny_problem(kind, torch.float64)
        ex = hs.HessianOperator(m64, loss, b64, method="exact")
        r = hs.lanczos(ex, 3, return_basis=True)
        dirs = {"random probe": hs.unit_probe(ex, 1), "Lanczos vector 2": r.basis[1]}
        refs = {k: ex.matvec(v) for k, v in dirs.items()}
        m32, _, b32 = tiny_problem(kind, torch.float32)
        print(kind, flush=True)
        out[kind] = _low_precision_rows(
            _low_precision_setups(m32, loss, b32), dirs, refs, np.logspace(-3, 1, 17)
        )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (default) or a load_model spec")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lanczos", type=int, default=5, help="Lanczos vectors 2..K (default 5)")
    ap.add_argument("--points", type=int, default=13, help="sweep points per direction")
    ap.add_argument("--decades", type=float, default=1.5, help="sweep ± decades around default")
    ap.add_argument("--low-precision", action="store_true", help="the bf16 table")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.low_precision:
        out = run_low_precision(args)
    else:
        out = run_tiny(args) if args.model == "tiny" else run_llm(args)
    out["command"] = "python benchmarks/fd_step.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if v is not None and v is not False
    ).replace(" True", "")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
