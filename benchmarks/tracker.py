"""CurvatureTracker: warm vs cold Lanczos, and the tracker's overhead on a training run.

A tiny character-level causal transformer (``testing.TinyTransformer``, d=16, 2 layers, the
embedded ``pydoc_data`` prose, 96 characters + 1 unknown) is trained with SGD (momentum 0.9)
for ``--steps`` steps, float32, one thread. Two probe batches (16 × 32 characters, fixed) define
the Hessian the tracker measures (exact HVPs).

1. **Matvecs to 1e-2 relative accuracy.** At every ``cadence``-th step (10 and 100) the
   reference λ_max is a cold Lanczos run of ``--ref-steps`` steps (full reorthogonalisation;
   its residual bound is reported). From a cold start (a Rademacher probe) and from a warm
   start (the previous measurement's top Ritz vector + 1% random, as the tracker does), one
   Lanczos run records its top Ritz value after every step; the count is the first step at
   which it is within 1e-2 of the reference. Medians over the measurements (the first, which
   has no warm vector, excluded).
2. **Overhead.** Wall time of the training run with ``CurvatureTracker(every_n_steps=N)``
   (defaults: k=1, tol=1e-3, cold every 10th measurement) against the same run without, for
   N = 10 and 100; also with ``cold_every=1`` (every measurement cold) at N = 10. Median of
   ``--repeats`` runs each. The tracker's own logged matvecs are summed.

    python benchmarks/tracker.py                    # writes benchmarks/results/tracker.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hessian_spectra import CurvatureTracker
from hessian_spectra.data import default_texts
from hessian_spectra.lanczos import lanczos, tridiagonal_eigh
from hessian_spectra.operators import HessianOperator
from hessian_spectra.testing import TinyTransformer
from hessian_spectra.vectors import axpy, norm, random_probe, scale

SEQ, BATCH, VOCAB = 32, 16, 97


def corpus() -> torch.Tensor:
    text = "\n".join(default_texts())
    ids = [min(max(ord(c) - 31, 0), VOCAB - 1) if c != "\n" else 0 for c in text]
    return torch.tensor(ids, dtype=torch.long)


def batch_at(data: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - SEQ, (BATCH,), generator=g)
    return torch.stack([data[s : s + SEQ] for s in starts.tolist()])


def loss_fn(model, idx):
    logits = model(idx)[:, :-1]
    tgt = idx[:, 1:]
    return F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1)), tgt.numel()


def new_model():
    torch.manual_seed(0)
    return TinyTransformer(vocab=VOCAB, d=16, n_layer=2, max_len=SEQ)


def probes(data):
    g = torch.Generator().manual_seed(123)
    return [batch_at(data, g) for _ in range(2)]


def train(data, steps: int, lr: float, tracker=None, on_measure=None):
    """Train; returns (seconds, model, metrics logged)."""
    model = new_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    logs = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss, _ = loss_fn(model, batch_at(data, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_measure is not None:
            on_measure(model, step)
        if tracker is not None:
            m = tracker.step(model, step, optimizer=opt)
            if m is not None:
                logs.append(m)
    return time.perf_counter() - t0, model, logs


def ritz_trajectory(op, v0, m):
    """Top Ritz value after each of ``m`` steps, and the top Ritz vector at the end."""
    res = lanczos(op, m, v0=v0, return_basis=True)
    top = [tridiagonal_eigh(res.alpha[: j + 1], res.beta[:j])[0][-1] for j in range(res.num_steps)]
    return np.array(top), res.ritz_vectors([res.num_steps - 1])[0]


def first_within(traj, ref, rel):
    ok = np.nonzero(np.abs(traj - ref) <= rel * abs(ref))[0]
    return int(ok[0]) + 1 if ok.size else None


def warm_vs_cold(data, steps, lr, cadence, ref_steps, probe_b, rel=1e-2):
    rows, prev = [], None

    def on_measure(model, step):
        nonlocal prev
        if step % cadence:
            return
        op = HessianOperator(model, loss_fn, probe_b, method="exact")
        ref_run = lanczos(op, ref_steps, seed=10_000 + step)
        ref = float(ref_run.ritz_values[-1])
        cold, vec = ritz_trajectory(op, random_probe(op, step), ref_steps)
        row = {
            "step": step,
            "lambda_max": ref,
            "reference_residual": float(ref_run.residual_bounds()[-1]),
            "cold": first_within(cold, ref, rel),
        }
        if prev is not None:
            v0 = scale(1.0 / norm(prev), prev)
            r = random_probe(op, 7919 + step)
            axpy(1e-2 / norm(r), r, v0)
            warm, _ = ritz_trajectory(op, v0, ref_steps)
            row["warm"] = first_within(warm, ref, rel)
        prev = vec
        rows.append(row)

    train(data, steps, lr, on_measure=on_measure)
    warm = [r["warm"] for r in rows if r.get("warm") is not None]
    cold = [r["cold"] for r in rows[1:] if r["cold"] is not None]
    return {
        "cadence": cadence,
        "relative_accuracy": rel,
        "measurements": rows,
        "median_cold_matvecs": statistics.median(cold) if cold else None,
        "median_warm_matvecs": statistics.median(warm) if warm else None,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--ref-steps", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tracker.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = corpus()
    probe_b = probes(data)
    num_params = sum(p.numel() for p in new_model().parameters())
    print(f"TinyTransformer d=16 x2, {num_params} parameters, {a.steps} steps", flush=True)

    accuracy = [warm_vs_cold(data, a.steps, a.lr, c, a.ref_steps, probe_b) for c in (10, 100)]
    for acc in accuracy:
        print(
            f"every {acc['cadence']}: matvecs to 1e-2: cold {acc['median_cold_matvecs']}, "
            f"warm {acc['median_warm_matvecs']}",
            flush=True,
        )

    settings = {
        "none": None,
        "every_10": dict(every_n_steps=10),
        "every_100": dict(every_n_steps=100),
        "every_10_all_cold": dict(every_n_steps=10, cold_every=1),
    }
    times = {k: [] for k in settings}
    logged = {}
    for _ in range(a.repeats):
        for name, kw in settings.items():
            tr = None if kw is None else CurvatureTracker(loss_fn, probe_b, method="exact", **kw)
            sec, _, logs = train(data, a.steps, a.lr, tracker=tr)
            times[name].append(sec)
            logged[name] = logs
    base = statistics.median(times["none"])
    overhead = {}
    for name in settings:
        t = statistics.median(times[name])
        logs = logged[name]
        overhead[name] = {
            "seconds": t,
            "seconds_all": times[name],
            "overhead_fraction": (t - base) / base,
            "measurements": len(logs),
            "matvecs": sum(m["matvecs"] for m in logs),
            "warm_measurements": sum(bool(m["warm"]) for m in logs),
            "mean_matvecs_warm": (
                statistics.mean([m["matvecs"] for m in logs if m["warm"]])
                if any(m["warm"] for m in logs)
                else None
            ),
            "mean_matvecs_cold": (
                statistics.mean([m["matvecs"] for m in logs if not m["warm"]])
                if any(not m["warm"] for m in logs)
                else None
            ),
            "all_converged": all(m["converged"] for m in logs),
        }
        print(
            f"{name:>18}: {t:7.2f} s, overhead {overhead[name]['overhead_fraction']:+.1%}, "
            f"{overhead[name]['matvecs']} matvecs in {len(logs)} measurements",
            flush=True,
        )
    out = {
        "model": f"TinyTransformer(vocab={VOCAB}, d=16, n_layer=2), {num_params} params, float32",
        "data": f"pydoc_data prose, batches {BATCH}x{SEQ}, 2 probe batches",
        "train": {"steps": a.steps, "optimizer": "SGD momentum 0.9", "lr": a.lr},
        "hvp": "exact",
        "threads": 1,
        "repeats": a.repeats,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "warm_vs_cold": accuracy,
        "overhead": overhead,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
