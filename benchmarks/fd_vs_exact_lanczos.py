"""FD vs exact HVPs along Lanczos vectors of a real LLM (default: the embedded SmolLM2-135M).

Runs `--steps` exact Lanczos steps keeping the basis, measures the relative error of the
default-step fd HVP along every Lanczos vector (against the exact HVP), then runs fd Lanczos
from the same probe and prints the relative gaps of alpha and beta.

    python benchmarks/fd_vs_exact_lanczos.py [--model SPEC] [--seq-len 64] [--steps 5]
"""

import argparse
import json

import numpy as np
import torch

import hessian_spectra as hs
from hessian_spectra.data import DataConfig, causal_lm_loss, make_batches
from hessian_spectra.models import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model(args.model)
    batches = make_batches(
        lm.tokenizer, DataConfig(seq_len=args.seq_len, batch_size=args.batch_size, num_batches=1)
    )
    exact = hs.HessianOperator(lm.model, causal_lm_loss, batches, method="exact")
    fd = hs.HessianOperator(lm.model, causal_lm_loss, batches, method="fd")
    r = hs.lanczos(exact, args.steps, return_basis=True)
    rows = []
    for j, q in enumerate(r.basis):
        q = [t.float() for t in q]
        eps = fd.eps_for(q)
        err = fd.eps_sweep([eps], q)[0].rel_error
        rows.append({"vector": j, "eps": eps, "rel_error": err})
        print(f"q_{j}: default eps {eps:.2e}, fd relative error {err:.1e}", flush=True)
    rf = hs.lanczos(fd, args.steps)
    da = (np.abs(rf.alpha - r.alpha) / np.abs(r.alpha)).tolist()
    db = (np.abs(rf.beta - r.beta) / np.abs(r.beta)).tolist()
    print(
        "alpha exact",
        r.alpha,
        "\nalpha fd   ",
        rf.alpha,
        "\nrelative gap alpha",
        np.round(da, 6),
        "\nrelative gap beta ",
        np.round(db, 6),
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "vectors": rows,
                    "alpha_exact": r.alpha.tolist(),
                    "alpha_fd": rf.alpha.tolist(),
                    "beta_exact": r.beta.tolist(),
                    "beta_fd": rf.beta.tolist(),
                    "gap_alpha": da,
                    "gap_beta": db,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
