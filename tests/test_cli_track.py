"""``hessian-spectra track``: every checkpoint's λ_max against a dense reference, in step order,
HF ``checkpoint-*`` folders with the learning rate, and bad folders refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hessian_spectra.cli import EXIT_OK, EXIT_USAGE, main

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402
from conftest import dense_hessian  # noqa: E402


def _train_and_save(save, steps=(4, 8, 12)):
    """Train factories.mlp with SGD; ``save(step, state_dict)`` at the given steps; returns the
    dense Hessian's top eigenvalue at each saved step."""
    model, loss_fn, batches = factories.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ref = {}
    for step in range(1, max(steps) + 1):
        loss = sum(loss_fn(model, b)[0] for b in batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in steps:
            save(step, {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
            ref[step] = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batches))[-1].item()
    return ref


def _run(ckpts, out, *extra):
    return main(
        [
            "track",
            "--model",
            "factories:mlp",
            "--checkpoints",
            str(ckpts),
            "--out",
            str(out),
            "--quiet",
            *map(str, extra),
        ]
    )


def test_track_over_safetensors_files_matches_dense_lambda_max(tmp_path):
    """Over ``step_N.safetensors`` files (written out of order), track.json has one row per
    checkpoint in step order, each λ_max within tol of the dense Hessian's at those weights,
    later ones warm-started; track.png is drawn."""
    d = tmp_path / "ckpts"
    d.mkdir()
    ref = _train_and_save(lambda s, sd: save_file(sd, str(d / f"step_{s}.safetensors")))
    assert _run(d, tmp_path / "out", "--tol", "1e-6") == EXIT_OK
    rows = json.loads((tmp_path / "out" / "track.json").read_text())["measurements"]
    assert [r["step"] for r in rows] == [4, 8, 12]
    for r in rows:
        assert abs(r["lambda_max"] - ref[r["step"]]) <= 1e-6 * abs(ref[r["step"]])
        assert "two_over_lr" not in r
    assert [r["warm"] for r in rows] == [False, True, True]
    assert (tmp_path / "out" / "track.png").stat().st_size > 0


def test_track_over_hf_checkpoint_folders_reads_the_learning_rate(tmp_path):
    """HF ``checkpoint-<step>`` folders: the learning rate logged in trainer_state.json at (or
    before) each step gives two_over_lr = 2/lr."""
    d = tmp_path / "run"

    def save(step, sd):
        c = d / f"checkpoint-{step}"
        c.mkdir(parents=True)
        save_file(sd, str(c / "model.safetensors"))
        hist = [{"step": s, "learning_rate": 0.1 / s, "loss": 1.0} for s in range(1, step + 1)]
        (c / "trainer_state.json").write_text(json.dumps({"log_history": hist}))

    _train_and_save(save, steps=(4, 8))
    assert _run(d, tmp_path / "out", "--trace-matvecs", "10") == EXIT_OK
    rows = json.loads((tmp_path / "out" / "track.json").read_text())["measurements"]
    assert [r["two_over_lr"] for r in rows] == pytest.approx([2 / (0.1 / 4), 2 / (0.1 / 8)])
    assert all("trace" in r for r in rows)


def test_track_refuses_a_folder_without_checkpoints_or_a_wrong_model(tmp_path, capsys):
    """An empty folder, and weights that do not fit --model, are usage errors naming the
    folder / file."""
    (tmp_path / "empty").mkdir()
    assert _run(tmp_path / "empty", tmp_path / "o1") == EXIT_USAGE
    assert "no checkpoints found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"w": torch.zeros(3)}, str(bad / "step_1.safetensors"))
    assert _run(bad, tmp_path / "o2") == EXIT_USAGE
    assert "does not fit --model" in capsys.readouterr().err
