"""``module:factory`` models for the ``--curvature`` command-line tests: ``factories.mlp`` with
its loss given as a ``SplitLoss`` (outputs, then the loss of the outputs), so that
``--curvature ggn`` can take the GGN of it."""

from __future__ import annotations

import torch

from factories import _mlp
from hessian_spectra.ggn import SplitLoss


def forward(model, batch):
    return model(batch[0])  # (B, 2)


def loss_of_output(out, batch):
    return ((out - batch[1]) ** 2).mean(), batch[0].shape[0]


def mlp_split():
    """factories.mlp's model and data; MSE loss as forward + loss of outputs (44 parameters)."""
    model, batches = _mlp()
    return model, SplitLoss(forward, loss_of_output), batches


def dense_ggn_of_mlp() -> torch.Tensor:
    from hessian_spectra.testing import dense_ggn

    model, _, batches = mlp_split()
    return dense_ggn(model, forward, loss_of_output, batches)
