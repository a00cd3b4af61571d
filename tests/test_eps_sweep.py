"""The FD error sweep against the dense Hessian: the errors it reports are the true errors."""

import numpy as np
import pytest
import torch

import hessian_spectra as hs


def test_eps_sweep_reports_true_fd_errors(mlp64):
    """Each FDError.rel_error equals ||H_eps v - H v|| / ||H v|| with H the dense float64 Hessian,
    and the error is V-shaped in eps (truncation for large eps, rounding for tiny eps; Thm 3.1)."""
    model, loss_fn, batches, H = mlp64
    op = hs.HessianOperator(model, loss_fn, batches, method="fd")
    v = hs.random_probe(op, 1, kind="gaussian")
    hs.scale(1.0 / hs.norm(v), v)
    eps_values = [1e-12, 1e-6, 1e-1]
    rows = op.eps_sweep(eps_values, v)
    ref = H @ torch.cat([t.reshape(-1) for t in v])
    for e, r in zip(eps_values, rows):
        h = torch.cat([t.reshape(-1) for t in op.matvec(v, eps=e)])
        assert r.eps == e
        assert r.rel_error == pytest.approx(float((h - ref).norm() / ref.norm()), rel=1e-6, abs=1e-14)
    errs = [r.rel_error for r in rows]
    assert errs[1] < errs[0] and errs[1] < errs[2]
    assert errs[1] < 1e-7


def test_eps_sweep_rejects_bad_steps(mlp64):
    """Non-positive or non-finite steps raise a clear error."""
    model, loss_fn, batches, _ = mlp64
    op = hs.HessianOperator(model, loss_fn, batches)
    for bad in ([], [0.0], [-1e-3], [float("nan")]):
        with pytest.raises(ValueError, match="eps_values"):
            op.eps_sweep(bad)
