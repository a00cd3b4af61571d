"""The fd even part read from a sample against the whole even part, on an LLM.

``info["d2"] = ||∇L(θ+εv) + ∇L(θ−εv) − 2∇L(θ)||`` is read by ``hessian_spectra.hvp.FDBuffers``
from every entry of the tensors of up to ``EVEN_FULL`` entries and every ``EVEN_STRIDE``-th
entry of the larger ones. This runs the same product twice along each direction (a random
probe, and ``Hv/||Hv||``, a power-iteration direction like the second Lanczos vector), once
with the sample and once reading every entry, and prints both norms.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fd_even_sample.py \\
        --json benchmarks/results/fd_even_sample_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import hvp_cost  # noqa: E402  (the LLM problem, one definition)

import hessian_spectra as hs  # noqa: E402
from hessian_spectra import hvp as H  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.dtype, args.attn, args.num_batches = "float32", None, 1
    model, loss_fn, batches, desc = hvp_cost._llm(args, torch)
    op = hs.HessianOperator(model, loss_fn, batches, check_determinism=False)
    obj = op.objective
    op.calibrate_fd()
    g0 = op.gradient()[1]
    v = hs.random_probe(op, 0)
    w = op.matvec(v)
    n = hs.norm(w)
    w = [t / n for t in w]
    out = []
    sampled_full = H.EVEN_FULL
    for name, d in (("random probe", v), ("H v / ||H v||", w)):
        e = op.eps_for(d)
        res = {"direction": name, "eps": e}
        for mode, full in (("sampled", sampled_full), ("whole", 10**12)):
            H.EVEN_FULL = full
            info: dict = {}
            H.hvp_fd(obj, d, e, g0=g0, info=info, buffers=H.FDBuffers())
            res[mode] = info["d2"]
        H.EVEN_FULL = sampled_full
        res["sampled_over_whole"] = res["sampled"] / res["whole"]
        print(json.dumps(res), flush=True)
        out.append(res)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"description": desc, "command": " ".join(sys.argv), "rows": out}, indent=1)
        )


if __name__ == "__main__":
    main()
