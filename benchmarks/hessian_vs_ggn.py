"""The Hessian next to its Gauss–Newton approximation on the embedded SmolLM2-135M.

One SLQ run of each operator on the same data and probe (exact products, float32, eager
attention, ``--batch`` x ``--seq`` tokens of the embedded prose): the Hessian
(``HessianOperator``) and the generalised Gauss–Newton of the logits and their next-token loss
(``GGNOperator`` with ``causal_lm_forward`` / ``causal_lm_loss_of_logits``). Prints and saves
(``benchmarks/results/hessian_vs_ggn_smollm2.json``) their top Ritz values, λ_min, negative mass
and SLQ trace, and overlays the two densities in ``hessian_vs_ggn_smollm2.png``.

    python benchmarks/hessian_vs_ggn.py                    # ~4 min on one CPU core
    python benchmarks/hessian_vs_ggn.py --steps 30 --probes 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import hessian_spectra as hs
from hessian_spectra.data import DataConfig, causal_lm_loss, make_batches
from hessian_spectra.ggn import causal_lm_forward, causal_lm_loss_of_logits
from hessian_spectra.models import load_model
from hessian_spectra.plots import plot_density


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--probes", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(None, dtype="float32", attn_implementation="eager")
    batches = make_batches(
        lm.tokenizer, DataConfig(seq_len=args.seq, batch_size=args.batch, num_batches=1)
    )
    ops = {
        "hessian": hs.HessianOperator(lm.model, causal_lm_loss, batches, method="exact"),
        "ggn": hs.GGNOperator(
            lm.model, causal_lm_forward, causal_lm_loss_of_logits, batches, method="exact"
        ),
    }
    rows, results = {}, []
    for name, op in ops.items():
        t0 = time.perf_counter()
        dens = hs.slq(op, args.steps, args.probes, seed=0, basis_dtype=torch.bfloat16)
        s = dens.summary()
        top = sorted(dens.nodes.reshape(-1).tolist(), reverse=True)[:5]
        rows[name] = {
            "summary": s,
            "top_ritz_values": top,
            "seconds": time.perf_counter() - t0,
            "density": dens.to_dict(),
        }
        print(
            f"{name:8s} λ_max {s['lambda_max']:.5g}  λ_min {s['lambda_min']:.5g}  "
            f"negative mass {s['negative_mass']:.3g}  trace {s['trace']:.5g}  "
            f"top Ritz {[round(x, 3) for x in top]}  ({rows[name]['seconds']:.0f} s)",
            flush=True,
        )
        results.append({"density": dens.to_dict()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_density(
        results,
        out / "hessian_vs_ggn_smollm2.png",
        labels=list(ops),
        title=f"SmolLM2-135M, {args.batch}x{args.seq} tokens: Hessian vs GGN "
        f"(SLQ, {args.probes} probe(s) x {args.steps} steps, exact)",
    )
    meta = {
        "command": "python benchmarks/hessian_vs_ggn.py " + " ".join(argv or []),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "tokens": args.batch * args.seq,
        "steps": args.steps,
        "probes": args.probes,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = out / "hessian_vs_ggn_smollm2.json"
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print("wrote", path, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
