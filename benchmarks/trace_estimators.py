"""Which trace estimator, at equal matvecs? Hutchinson vs Hutch++ vs XTrace on known traces.

Cases (all with exact traces):

- dense matrices ``Q diag(λ) Q^T`` (n = 300) with a flat spectrum (λ in [0.5, 1.5]), a
  power-law decay (λ_i = i^-2), and a Hessian-like spectrum (a bulk in [−1, 1] plus five
  outliers 8 ... 50);
- the dense float64 Hessians (``testing.dense_hessian``) of the tiny MLP (51 parameters, MSE),
  CNN (59, cross-entropy) and two-layer LayerNorm transformer (``transformer2``), and the GGN of
  that transformer (``testing.dense_ggn``), each as a ``DenseOperator`` (the estimators only see
  products; these are the operators' own matrices).

For each case, method and budget ``m`` (matvecs) it runs ``--repeats`` seeds and reports the
relative RMSE ``sqrt(mean (est − tr)²) / |tr|``, the bias in units of its standard error, and
the coverage of ``|est − tr| ≤ 2·std_error``. Writes ``benchmarks/results/trace_estimators.json``
and prints a table of RMSE ratios to Hutchinson's.

    python benchmarks/trace_estimators.py               # ~2 min on one CPU core
    python benchmarks/trace_estimators.py --repeats 50 --budgets 12 30
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import hessian_spectra as hs
from hessian_spectra.testing import dense_ggn, dense_hessian, known_spectrum_matrix, make_problem

METHODS = ("hutchinson", "hutch++", "xtrace")


def cases(n: int) -> dict[str, torch.Tensor]:
    """name -> dense symmetric float64 matrix."""
    out = {
        "flat": known_spectrum_matrix(np.linspace(0.5, 1.5, n)),
        "decay_i^-2": known_spectrum_matrix(1.0 / np.arange(1, n + 1) ** 2),
        "bulk+outliers": known_spectrum_matrix(
            np.concatenate([np.linspace(-1.0, 1.0, n - 5), [8.0, 10.0, 20.0, 30.0, 50.0]])
        ),
    }
    for kind in ("mlp", "cnn", "transformer2"):
        m, loss_fn, batches = make_problem(kind)
        out[f"hessian_{kind}"] = dense_hessian(m, loss_fn, batches)
    m, _, batches = make_problem("transformer2")

    def fwd(model, b):
        return model(b)[:, :-1]  # (B, T-1, V)

    def lof(o, b):
        t = b[:, 1:]
        return F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1)), t.numel()

    out["ggn_transformer2"] = dense_ggn(m, fwd, lof, batches)
    return out


def run(H: torch.Tensor, method: str, m: int, repeats: int) -> dict:
    tr = float(H.trace())
    op = hs.DenseOperator(H)
    est, se = [], []
    t0 = time.perf_counter()
    for r in range(repeats):
        e = hs.trace(op, m, method=method, seed=10_000 * r)
        est.append(e.estimate)
        se.append(e.std_error)
    secs = (time.perf_counter() - t0) / repeats
    est, se = np.asarray(est), np.asarray(se)
    err = est - tr
    sd = err.std(ddof=1)
    return {
        "trace": tr,
        "rel_rmse": float(np.sqrt(np.mean(err**2)) / abs(tr)),
        "bias_in_se": float(err.mean() / (sd / np.sqrt(repeats))) if sd > 0 else 0.0,
        "coverage_2se": float(np.mean(np.abs(err) <= 2 * se)),
        "median_std_error_over_rmse": float(np.median(se) / max(np.sqrt(np.mean(err**2)), 1e-300)),
        "seconds_per_estimate": secs,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="dimension of the synthetic matrices")
    ap.add_argument("--budgets", type=int, nargs="+", default=[12, 30, 60])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "trace_estimators.json")
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, H in cases(args.n).items():
        for m in args.budgets:
            res = {meth: run(H, meth, m, args.repeats) for meth in METHODS}
            base = res["hutchinson"]["rel_rmse"]
            for meth in METHODS:
                rows.append(
                    {
                        "case": name,
                        "dim": int(H.shape[0]),
                        "matvecs": m,
                        "method": meth,
                        **res[meth],
                    }
                )
            ratio = "  ".join(f"{k}={res[k]['rel_rmse'] / base:6.3f}" for k in METHODS[1:])
            cov = " ".join(f"{res[k]['coverage_2se']:.2f}" for k in METHODS)
            print(
                f"{name:18s} P={H.shape[0]:4d} m={m:3d}  hutchinson rel_rmse={base:.2e}  "
                f"RMSE ratio: {ratio}   2SE coverage (h, h++, x): {cov}",
                flush=True,
            )
    # Which method has the smallest RMSE in each (case, budget)?
    wins = {k: 0 for k in METHODS}
    for i in range(0, len(rows), len(METHODS)):
        group = rows[i : i + len(METHODS)]
        wins[min(group, key=lambda r: r["rel_rmse"])["method"]] += 1
    print("best RMSE count:", wins)
    out = {
        "what": "relative RMSE, bias and 2-SE coverage of trace estimators at equal matvecs",
        "command": "python benchmarks/trace_estimators.py " + " ".join(argv or []),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "best_rmse_count": wins,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
