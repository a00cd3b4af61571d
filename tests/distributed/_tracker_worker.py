"""One run of the tracker under FSDP2, launched by ``test_tracker_fsdp.py`` (not collected).

    python _tracker_worker.py OUT.json                               # plain, unsharded
    torchrun --standalone --nproc-per-node 2 _tracker_worker.py OUT.json

Uses ``_worker.py``'s tiny Llama and global data. Three measurements (fd HVPs), the weights
scaled by 1.01 between them; rank 0 writes the logged metrics, how many times each rank's
``log_fn`` was called, and whether the parameters were bit-identical after each measurement.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _worker import build_model, global_data, local_data, loss_fn  # noqa: E402

from hessian_spectra import CurvatureTracker  # noqa: E402
from hessian_spectra import distributed as D  # noqa: E402


def main(out_path):
    D.setup()
    model = D.shard_model(build_model())
    batches = local_data(global_data())
    logged = []
    tracker = CurvatureTracker(
        loss_fn, batches, every_n_steps=1, method="fd", tol=1e-4, cold_every=0, log_fn=logged.append
    )
    rows, same = [], []
    for step in range(1, 4):
        before = [D.local(p).detach().clone() for p in model.parameters()]
        m = tracker.step(model, step)
        same.append(all(torch.equal(b, D.local(p)) for b, p in zip(before, model.parameters())))
        rows.append({k: m[k] for k in ("lambda_max", "warm", "converged", "matvecs")})
        with torch.no_grad():
            for p in model.parameters():
                D.local(p).mul_(1.01)
    res = {
        "world_size": D.world_size(),
        "rows": rows,
        "log_calls": D.all_gather_object(len(logged)),
        "params_unchanged": D.all_gather_object(all(same)),
        "lambda_agree": D.all_gather_object([r["lambda_max"] for r in rows]),
    }
    if D.is_rank0():
        Path(out_path).write_text(json.dumps(res))
    D.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
