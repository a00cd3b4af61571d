"""EmpiricalFisherOperator against the dense float64 ``Σ_n w_n g_n g_nᵀ / Σ_n w_n``
(``testing.dense_empirical_fisher``: one example at a time, gradients by
``torch.autograd.functional.jacobian``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hessian_spectra as hs
from conftest import flatten, make_problem, unflatten
from hessian_spectra.fisher import PerExampleError
from hessian_spectra.testing import dense_empirical_fisher

_REF: dict = {}


def case(kind):
    if kind not in _REF:
        m, loss_fn, batches = make_problem(kind)
        _REF[kind] = (m, loss_fn, batches, dense_empirical_fisher(m, loss_fn, batches))
    return _REF[kind]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer", "plain"])
@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_empirical_fisher_equals_dense(kind, per_example):
    """F v equals the dense empirical Fisher @ v to ≤ 1e-10 relative on the float64 MLP (MSE),
    CNN (cross-entropy), LayerNorm transformer (per-sequence token-weighted CE) and the unweighted
    problem, with per-example gradients by vmap and by the loop; the parameters are bit-for-bit
    unchanged and the user's .grad given back."""
    m, loss_fn, batches, F = case(kind)
    before = [p.detach().clone() for p in m.parameters()]
    for p in m.parameters():
        p.grad = torch.full_like(p, 3.0)
    op = hs.EmpiricalFisherOperator(m, loss_fn, batches, per_example=per_example)
    assert isinstance(op, hs.Operator) and op.method == "ef"
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert _rel(flatten(op @ unflatten(v, op.params)), F @ v) <= 1e-10
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in m.parameters())
    for p in m.parameters():
        p.grad = None


def test_dense_empirical_fisher_reference():
    """The reference itself: on the MLP (10 examples, weight 1 each) F is PSD of rank ≤ 10, and
    it is consistent with the dataset gradient ∇L = mean_n g_n (from HessianOperator.gradient):
    by Cauchy–Schwarz ∇Lᵀ F ∇L = mean_n (g_n·∇L)² ≥ (mean_n g_n·∇L)² = ||∇L||⁴."""
    m, loss_fn, batches, F = case("mlp")
    lam = np.linalg.eigvalsh(F.numpy())
    assert lam.min() >= -1e-12 * lam.max() and int((lam > 1e-10 * lam.max()).sum()) <= 10
    _, g = hs.HessianOperator(m, loss_fn, batches).gradient()
    gv = flatten(g)
    assert float(gv @ F @ gv) >= float(gv @ gv) ** 2 * (1 - 1e-12)


def test_empirical_fisher_spectrum_and_subset():
    """With params=["fc1.weight"] the product is the sub-block of the dense empirical Fisher; the
    top eigenvalues by Lanczos equal eigvalsh of the full one to 1e-8 relative."""
    m, loss_fn, batches, F = case("mlp")
    Fs = dense_empirical_fisher(m, loss_fn, batches, names=["fc1.weight"])
    op = hs.EmpiricalFisherOperator(m, loss_fn, batches, params=["fc1.weight"])
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert _rel(flatten(op @ unflatten(v, op.params)), Fs @ v) <= 1e-10
    full = hs.EmpiricalFisherOperator(m, loss_fn, batches)
    lam = np.linalg.eigvalsh(F.numpy())[::-1]
    np.testing.assert_allclose(
        hs.top_eigenvalues(full, 3, num_steps=10).eigenvalues, lam[:3], rtol=1e-8
    )


def test_empirical_fisher_clear_errors():
    """A loss_fn that cannot be vmapped (.item() on the loss) raises PerExampleError (a
    ValueError) pointing to per_example='loop', which then works and equals the dense reference;
    a batch whose tensors disagree on the number of examples is a ValueError."""
    m, loss_fn, batches, F = case("mlp")

    def item_loss(model, batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        return loss, float(loss.item() * 0 + x.shape[0])

    op = hs.EmpiricalFisherOperator(m, item_loss, batches)
    v = hs.unit_probe(op)
    with pytest.raises(PerExampleError, match="per_example='loop'"):
        op @ v
    loop = hs.EmpiricalFisherOperator(m, item_loss, batches, per_example="loop")
    assert _rel(flatten(loop @ v), F @ flatten(v)) <= 1e-10
    bad = [(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))]
    op = hs.EmpiricalFisherOperator(m, lambda mm, b: ((mm(b[0])[:2] - b[1]) ** 2).mean(), bad)
    with pytest.raises(ValueError, match="first dimension"):
        op @ hs.unit_probe(op)
    with pytest.raises(ValueError, match="per_example"):
        hs.EmpiricalFisherOperator(m, loss_fn, batches, per_example="jvp")
