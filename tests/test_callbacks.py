"""The training callbacks: HF Trainer logs the tracker's metrics into ``state.log_history`` and
Lightning into ``callback_metrics``, without changing training; without Lightning the callback
says what to install."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from hessian_spectra import CurvatureTracker, top_eigenvalues  # noqa: E402
from hessian_spectra.callbacks import HFCurvatureCallback, scalar_metrics  # noqa: E402
from hessian_spectra.operators import HessianOperator  # noqa: E402


class Reg(nn.Module):
    """A 4 -> 5 -> 2 tanh regressor returning ``{"loss": ...}`` as Trainer expects."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x, labels=None):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}


class DS(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def loss_fn(model, batch):
    return model(**batch)["loss"], batch["x"].shape[0]


def _probe():
    d = DS(8)
    return [{"x": d.x, "labels": d.y}]


def _train(tmp_path, tracker, attach=True):
    torch.manual_seed(0)
    model = Reg()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=100,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DS())
    cb = None
    if tracker is not None:
        cb = HFCurvatureCallback(tracker, trainer if attach else None)
        if not attach:
            trainer.add_callback(cb)
    trainer.train()
    return trainer, model, cb


def test_hf_trainer_logs_curvature_and_training_is_unchanged(tmp_path):
    """With the callback attached (every 2 steps), ``trainer.state.log_history`` has
    ``curvature/lambda_max`` at steps 2, 4, 6; the last equals a cold converged
    ``top_eigenvalues`` on the final weights within tol; ``two_over_lr`` is 2/lr of the
    scheduled lr (AdamW: no ``stability_threshold`` without ``preconditioned=True``); the
    trained weights are bit-identical to a run without the callback."""
    tr = CurvatureTracker(loss_fn, _probe(), every_n_steps=2, method="exact", tol=1e-4)
    trainer, model, cb = _train(tmp_path / "a", tr)
    rows = [r for r in trainer.state.log_history if "curvature/lambda_max" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    op = HessianOperator(model, loss_fn, _probe(), method="exact")
    ref = top_eigenvalues(op, 1, num_steps=op.num_params).eigenvalues[0]
    assert abs(rows[-1]["curvature/lambda_max"] - ref) <= 1e-4 * abs(ref)
    assert rows[-1]["curvature/converged"] == 1.0
    # the linear schedule's lr after 2 of 6 steps: 0.05 · (1 − 2/6)
    assert rows[0]["curvature/two_over_lr"] == pytest.approx(2 / (0.05 * 4 / 6))
    assert "curvature/stability_threshold" not in rows[0]
    _, plain, _ = _train(tmp_path / "b", None)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_hf_callback_without_trainer_fills_log_history(tmp_path):
    """Passed only in the callback list, the callback still puts the metrics into
    ``state.log_history`` (and warns that reporters will not see them)."""
    tr = CurvatureTracker(loss_fn, _probe(), every_n_steps=3, method="exact")
    with pytest.warns(UserWarning, match="reporters"):
        trainer, _, cb = _train(tmp_path, tr, attach=False)
    rows = [r for r in trainer.state.log_history if "curvature/lambda_max" in r]
    assert [r["step"] for r in rows] == [3, 6]
    assert rows[-1] == {**scalar_metrics(cb.last), "step": 6}


def test_hf_callback_refuses_a_non_tracker():
    """The callback needs a CurvatureTracker and says so."""
    with pytest.raises(TypeError, match="CurvatureTracker"):
        HFCurvatureCallback(object())


def test_lightning_callback_without_lightning_says_what_to_install(monkeypatch):
    """Without Lightning (imports made to fail), asking for the Lightning callback raises
    ImportError naming the package to install (Lightning is optional, not a dependency)."""
    import sys

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    import hessian_spectra.callbacks as cbs

    with pytest.raises(ImportError, match="pip install lightning"):
        cbs.LightningCurvatureCallback  # noqa: B018


def _lightning_fit(tracker, pl):
    """Train ``Reg`` for 6 optimizer steps with Lightning (CPU, no logger or checkpoints)."""
    from hessian_spectra.callbacks import LightningCurvatureCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Reg()

        def training_step(self, batch, batch_idx):
            return self.net(**batch)["loss"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    module = Module()
    callbacks = [] if tracker is None else [LightningCurvatureCallback(tracker)]
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    loader = torch.utils.data.DataLoader(DS(), batch_size=4, shuffle=False)
    trainer.fit(module, loader)
    return trainer, module


def test_lightning_trainer_logs_curvature_and_training_is_unchanged():
    """With real Lightning: the callback measures at optimizer steps 2, 4, 6, the metrics reach
    ``trainer.callback_metrics`` (``pl_module.log_dict``), the last λ_max equals a cold converged
    ``top_eigenvalues`` on the final weights within tol, 2/lr is SGD's threshold, and the trained
    weights are bit-identical to a run without the callback."""
    pl = pytest.importorskip("lightning.pytorch")

    def lf(model, batch):  # the tracker sees the LightningModule
        return model.net(**batch)["loss"], batch["x"].shape[0]

    tr = CurvatureTracker(lf, _probe(), every_n_steps=2, method="exact", tol=1e-4)
    trainer, module = _lightning_fit(tr, pl)
    assert [m["step"] for m in tr.history] == [2, 4, 6]
    assert "curvature/lambda_max" in trainer.callback_metrics
    op = HessianOperator(module, lf, _probe(), method="exact")
    ref = top_eigenvalues(op, 1, num_steps=op.num_params).eigenvalues[0]
    assert abs(tr.history[-1]["lambda_max"] - ref) <= 1e-4 * abs(ref)
    assert float(trainer.callback_metrics["curvature/stability_threshold"]) == pytest.approx(40.0)
    _, plain = _lightning_fit(None, pl)
    for a, b in zip(module.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_lightning_callback_logic_against_a_stand_in(monkeypatch):
    """Against a stand-in ``lightning.pytorch`` (only its ``Callback`` base; real Lightning is
    not installed, so this checks our logic, not Lightning's calling convention): the callback
    measures once per due optimizer step even when several batches end at that step (gradient
    accumulation), skips step 0, logs the scalars with ``log_dict(rank_zero_only=True)`` and
    its state round-trips through the tracker's."""
    import sys
    import types

    pl = types.ModuleType("lightning.pytorch")
    pl.Callback = type("Callback", (), {})
    monkeypatch.setitem(sys.modules, "lightning", types.ModuleType("lightning"))
    monkeypatch.setitem(sys.modules, "lightning.pytorch", pl)
    import hessian_spectra.callbacks as cbs

    tr = CurvatureTracker(loss_fn, _probe(), every_n_steps=2, method="exact")
    cb = cbs.LightningCurvatureCallback(tr)
    model = Reg()
    logged = []
    model.log_dict = lambda d, **kw: logged.append((d, kw))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = types.SimpleNamespace(global_step=0, optimizers=[opt])
    for step in (0, 1, 2, 2, 3, 4):  # two batches end at step 2 (accumulation)
        trainer.global_step = step
        cb.on_train_batch_end(trainer, model, None, None, 0)
    assert [m["step"] for m in tr.history] == [2, 4]
    assert len(logged) == 2 and logged[0][1] == {"rank_zero_only": True}
    assert logged[1][0]["curvature/stability_threshold"] == pytest.approx(20.0)  # plain SGD
    tr2 = CurvatureTracker(loss_fn, _probe(), every_n_steps=2, method="exact")
    cbs.LightningCurvatureCallback(tr2).load_state_dict(cb.state_dict())
    assert tr2.measurements == 2
