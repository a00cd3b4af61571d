"""Training-loop callbacks around :class:`~hessian_spectra.tracker.CurvatureTracker`.

- :class:`HFCurvatureCallback` for ``transformers.Trainer``: measures at ``on_step_end`` (after
  the optimizer step) and logs through ``Trainer.log``, so the metrics land in
  ``trainer.state.log_history`` and every reporter (TensorBoard, W&B, …) gets them.
- ``LightningCurvatureCallback`` for Lightning (``lightning`` or ``pytorch_lightning``,
  imported only when the name is used; Lightning is not a dependency): measures at
  ``on_train_batch_end`` and logs with ``pl_module.log_dict``.

Only scalars are logged, as ``curvature/<name>`` (:func:`scalar_metrics`).
"""

from __future__ import annotations

import warnings

from .tracker import CurvatureTracker

# and LightningCurvatureCallback, made on first access (module __getattr__)
__all__ = ["HFCurvatureCallback", "scalar_metrics"]


def scalar_metrics(metrics: dict, prefix: str = "curvature/") -> dict:
    """The tracker's metrics as flat numbers for a logger: ``lambda_max``, ``lambda_2`` …,
    ``residual_max``, ``converged`` and ``warm`` (0/1), ``matvecs``, ``seconds``,
    ``two_over_lr``, ``stability_threshold`` and the trace where measured.

    >>> scalar_metrics({"lambda_max": 2.0, "eigenvalues": [2.0, 1.0], "residuals": [0.0, 1e-5],
    ...                 "converged": True, "warm": False, "matvecs": 9, "seconds": 0.5})
    ... # doctest: +NORMALIZE_WHITESPACE
    {'curvature/lambda_max': 2.0, 'curvature/lambda_2': 1.0, 'curvature/residual_max': 1e-05,
     'curvature/converged': 1.0, 'curvature/warm': 0.0, 'curvature/matvecs': 9.0,
     'curvature/seconds': 0.5}
    """
    out = {f"{prefix}lambda_max": float(metrics["lambda_max"])}
    for i, x in enumerate(metrics.get("eigenvalues", [])[1:], start=2):
        out[f"{prefix}lambda_{i}"] = float(x)
    if metrics.get("residuals"):
        out[f"{prefix}residual_max"] = float(max(metrics["residuals"]))
    for key in (
        "converged",
        "warm",
        "matvecs",
        "seconds",
        "two_over_lr",
        "stability_threshold",
        "trace",
        "trace_std_error",
    ):
        if metrics.get(key) is not None:
            out[f"{prefix}{key}"] = float(metrics[key])
    return out


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's / Lightning's wrappers."""
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "param_groups"):
        optimizer = optimizer.optimizer
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None and hasattr(inner, "state") else optimizer


def _hf_base():
    try:
        from transformers import TrainerCallback
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ImportError("HFCurvatureCallback needs transformers: pip install transformers") from e
    return TrainerCallback


class HFCurvatureCallback(_hf_base()):
    """Measure curvature during ``transformers.Trainer`` training.

    Args:
        tracker: the :class:`~hessian_spectra.tracker.CurvatureTracker` (its ``every_n_steps``
            counts optimizer steps, ``state.global_step``).
        trainer: the Trainer: the callback adds itself to it and logs through
            ``trainer.log`` (``state.log_history`` and every reporter). Without it (passed in
            ``Trainer(callbacks=[...])``), the metrics are appended to ``state.log_history``
            only, and reporters do not see them.
        prefix: prefix of the logged names.

    Usage::

        tracker = CurvatureTracker(loss_fn, probe_batches, every_n_steps=50)
        trainer = Trainer(model=model, args=args, train_dataset=ds)
        HFCurvatureCallback(tracker, trainer)
        trainer.train()   # trainer.state.log_history has "curvature/lambda_max" every 50 steps
    """

    def __init__(self, tracker: CurvatureTracker, trainer=None, prefix: str = "curvature/"):
        if not isinstance(tracker, CurvatureTracker):
            raise TypeError(
                f"HFCurvatureCallback expects a CurvatureTracker, got {type(tracker).__name__}"
            )
        self.tracker, self.trainer, self.prefix = tracker, trainer, prefix
        self.last = None
        self._warned = False
        if trainer is not None:
            trainer.add_callback(self)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Measure after the optimizer step when ``state.global_step`` is due; log it."""
        if model is None or not self.tracker.should_measure(state.global_step):
            return control
        m = self.tracker.step(model, state.global_step, optimizer=_unwrap_optimizer(optimizer))
        self.last = m
        logs = scalar_metrics(m, self.prefix)
        if self.trainer is not None:
            self.trainer.log(logs)
        elif state.is_world_process_zero:
            if not self._warned:
                warnings.warn(
                    "HFCurvatureCallback without trainer=: the metrics go to state.log_history "
                    "only; pass the Trainer (HFCurvatureCallback(tracker, trainer)) for its "
                    "reporters to get them too",
                    stacklevel=2,
                )
                self._warned = True
            state.log_history.append({**logs, "step": state.global_step})
        return control


def _lightning_callback_class():
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError as e:
            raise ImportError(
                "LightningCurvatureCallback needs Lightning, which hessian-spectra does not "
                "install: pip install lightning (or pytorch_lightning)"
            ) from e

    class LightningCurvatureCallback(pl.Callback):
        """Measure curvature after every Lightning optimizer step (``trainer.global_step``)
        and log the scalars with ``pl_module.log_dict``.
        """

        def __init__(self, tracker: CurvatureTracker, prefix: str = "curvature/"):
            super().__init__()
            self.tracker, self.prefix, self.last = tracker, prefix, None
            self._done = None  # the last step measured (accumulation: several batches a step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step == 0 or step == self._done or not self.tracker.should_measure(step):
                return
            self._done = step
            opts = trainer.optimizers
            opt = _unwrap_optimizer(opts[0]) if opts else None
            self.last = self.tracker.step(pl_module, step, optimizer=opt)
            pl_module.log_dict(scalar_metrics(self.last, self.prefix), rank_zero_only=True)

        def state_dict(self):
            return self.tracker.state_dict()

        def load_state_dict(self, state_dict):
            self.tracker.load_state_dict(state_dict)

    return LightningCurvatureCallback


def __getattr__(name):
    if name == "LightningCurvatureCallback":
        return _lightning_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
