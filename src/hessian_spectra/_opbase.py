"""What every curvature operator built on an :class:`~.objective.Objective` shares.

The objective's facts (``params``, ``param_names``, ``num_params``, ``vector_dtype``, ...) as
read-only properties, ``shape``, ``op @ v``, the product statistics, ``gradient()`` and
``to_scipy()``. A subclass sets ``self.objective`` and ``self.method`` and defines
``matvec``; the result meets the operator contract :class:`~.linop.Operator`.
"""

from __future__ import annotations

import time

import torch

from .vectors import Vector

__all__ = ["ObjectiveOperator"]


class ObjectiveOperator:
    """Base of the operators over an objective (module docstring); not used on its own."""

    objective = None  # set by the subclass
    method = "custom"

    def _init_stats(self) -> None:
        self.stats = {"matvecs": 0, "matvec_seconds": 0.0, "gradients": 0, "gradient_seconds": 0.0}

    # ------------------------------------------------------------------ the objective's facts
    model = property(lambda self: self.objective.model, doc="The model.")
    batches = property(lambda self: self.objective.batches, doc="The batches.")
    params = property(lambda self: self.objective.params, doc="The parameters acted on.")
    param_names = property(lambda self: self.objective.param_names, doc="Their names.")
    num_params = property(lambda self: self.objective.num_params, doc="Global number of scalars.")
    param_dtype = property(
        lambda self: self.objective.param_dtype, doc="The lowest-precision parameter dtype."
    )
    vector_dtype = property(
        lambda self: self.objective.vector_dtype, doc="The dtype of the vectors matvec returns."
    )
    sharded = property(lambda self: self.objective.sharded, doc="FSDP2-sharded parameters.")
    train_mode = property(lambda self: self.objective.train_mode, doc="Train-mode objective.")
    reduction = property(lambda self: self.objective.reduction, doc="'mean' or 'sum'.")
    progress = property(lambda self: self.objective.progress, doc="Progress bars on rank 0.")

    @property
    def shape(self) -> tuple[int, int]:
        """``(num_params, num_params)``."""
        return (self.num_params, self.num_params)

    def __matmul__(self, v: Vector) -> Vector:
        return self.matvec(v)

    def matvec(self, v: Vector) -> Vector:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _count(self, t0: float) -> None:
        self.stats["matvecs"] += 1
        self.stats["matvec_seconds"] += time.perf_counter() - t0

    def gradient(self) -> tuple[float, Vector]:
        """``(L(θ), ∇L(θ))`` of the objective; the user's ``.grad`` are left as they were."""
        t0 = time.perf_counter()
        out = self.objective.gradient()
        self.stats["gradients"] += 1
        self.stats["gradient_seconds"] += time.perf_counter() - t0
        return out

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` on flat float64 numpy vectors (one process)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        if self.sharded:
            raise NotImplementedError(
                "to_scipy() needs the whole vector in one process; the model is sharded"
            )
        shapes = [p.shape for p in self.params]
        sizes = [p.numel() for p in self.params]

        def mv(x):
            x = np.asarray(x, dtype=np.float64).reshape(-1)
            parts = torch.from_numpy(x).split(sizes)
            v = [
                t.reshape(s).to(device=p.device, dtype=self.vector_dtype)
                for t, s, p in zip(parts, shapes, self.params)
            ]
            hv = self.matvec(v)
            return torch.cat([t.reshape(-1).double().cpu() for t in hv]).numpy()

        return LinearOperator(
            (self.num_params, self.num_params), matvec=mv, rmatvec=mv, dtype=np.float64
        )
