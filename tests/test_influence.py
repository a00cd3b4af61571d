"""Influence scores against the dense formula, against an up-weighting experiment, and the
result saying when it is not what was asked for (issue 13.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hessian_spectra as hs
from conftest import make_problem


def _grad_of(model, loss_fn, bs):
    tot = sum(loss_fn(model, b)[0] * loss_fn(model, b)[1] for b in bs) / sum(
        loss_fn(model, b)[1] for b in bs
    )
    g = torch.autograd.grad(tot, list(model.parameters()))
    return torch.cat([t.reshape(-1) for t in g])


def test_influence_scores_equal_dense_formula(mlp64):
    """influence() scores equal −∇L_q^T (H + λI)^{-1} ∇l_z computed with the dense Hessian and
    autograd gradients, for each candidate batch; the model's .grad stay None; status complete."""
    model, loss_fn, batches, H = mlp64
    op = hs.HessianOperator(model, loss_fn, batches, method="exact")
    lam = float(max(0.0, -np.linalg.eigvalsh(H.numpy())[0])) + 0.5
    query = [batches[0]]
    res = hs.influence(op, query, batches, damping=lam, tol=1e-12, max_iter=500)
    s = torch.linalg.solve(
        H + lam * torch.eye(H.shape[0], dtype=H.dtype), _grad_of(model, loss_fn, query)
    )
    ref = np.array([-float(s @ _grad_of(model, loss_fn, [b])) for b in batches])
    assert res.converged and res.status == "complete" and res.to_dict()["status"] == "complete"
    np.testing.assert_allclose(res.scores, ref, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def _least_squares(seed=0):
    """A linear model y ≈ [x, 1]·θ, three training batches (sizes 4, 6, 5) and a query batch."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(3, 1).double()
    true = torch.randn(4, 1, generator=g, dtype=torch.float64)

    def batch(n):
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        y = x @ true[:3] + true[3] + 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        return x, y

    train = [batch(n) for n in (4, 6, 5)]
    query = [batch(3)]
    loss = lambda m, b: (((m(b[0]) - b[1]) ** 2).mean(), b[0].shape[0])
    return model, loss, train, query


def test_influence_is_the_derivative_of_the_query_loss_under_upweighting():
    """Issue 13.4, the sign: on a damped linear least-squares problem (convex; (H + λI)^{-1} exact),
    with θ* the minimiser of L(θ) + λ/2 ||θ||², the score of batch z equals d/dε L_q(θ*_ε) at
    ε = 0, θ*_ε the minimiser with ε·l_z added (a central difference of exact re-solves, rel 1e-6).
    So a positive score raises the query loss (harmful) and a negative one lowers it (helpful);
    the query batch itself, as a candidate, is helpful."""
    model, loss, train, query = _least_squares()
    lam = 0.3

    def Xy(b):
        x, y = b
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y.reshape(-1)

    def hess_rhs(b, w):  # l_b = |X θ - y|^2 / n: Hessian 2 X^T X / n, ∇ at 0: -2 X^T y / n
        X, y = Xy(b)
        return w * 2 * X.T @ X / len(y), w * 2 * X.T @ y / len(y)

    N = sum(len(b[1]) for b in train)
    parts = [hess_rhs(b, len(b[1]) / N) for b in train]
    H = sum(p[0] for p in parts)
    r = sum(p[1] for p in parts)

    def theta_star(z, e):
        Hz, rz = hess_rhs(train[z], 1.0) if z is not None else (0.0, 0.0)
        return torch.linalg.solve(H + lam * torch.eye(4, dtype=H.dtype) + e * Hz, r + e * rz)

    def query_loss(theta):
        X, y = Xy(query[0])
        return float(((X @ theta - y) ** 2).mean())

    theta0 = theta_star(None, 0.0)
    with torch.no_grad():
        model.weight.copy_(theta0[:3].reshape(1, 3))
        model.bias.copy_(theta0[3:])
    op = hs.HessianOperator(model, loss, train, method="exact")
    res = hs.influence(op, query, train + query, damping=lam, tol=1e-13, max_iter=50)
    assert res.converged
    h = 1e-4
    for z in range(len(train)):
        d = (query_loss(theta_star(z, h)) - query_loss(theta_star(z, -h))) / (2 * h)
        assert res.scores[z] == pytest.approx(d, rel=1e-6, abs=1e-12), z
    assert res.scores[-1] < 0  # the query's own data helps it


def test_not_converged_is_visible_on_the_result(mlp64):
    """Issue 13.4: influence() that did not converge reported success. On the indefinite MLP
    Hessian with damping 0 CG meets negative curvature, and with max_iter=1 it runs out of
    iterations: both give status "not_converged", converged False and a relative residual > tol,
    also in to_dict()."""
    model, loss_fn, batches, H = mlp64
    assert np.linalg.eigvalsh(H.numpy())[0] < 0
    op = hs.HessianOperator(model, loss_fn, batches, method="exact")
    for kw in ({"damping": 0.0}, {"damping": 10.0, "max_iter": 1}):
        res = hs.influence(op, batches[:1], batches, tol=1e-10, **kw)
        assert res.status == "not_converged" and not res.converged, kw
        assert res.relative_residual > 1e-10
        d = res.to_dict()
        assert d["status"] == "not_converged" and d["converged"] is False
    assert res.cg.iterations == 1 and not res.cg.negative_curvature


def test_influence_on_a_bf16_model_with_exact_products():
    """Issue 7: influence() failed on a bf16 model even with method="exact" (its throwaway
    operators defaulted to fd, refused in bf16). It now takes the gradients from the operator's
    objective: the scores are finite and within bf16 accuracy (5% of the largest) of the
    float64 ones."""
    m64, loss_fn, batches = make_problem("mlp")
    op64 = hs.HessianOperator(m64, loss_fn, batches, method="exact")
    ref = hs.influence(op64, batches[:1], batches, damping=5.0, tol=1e-10).scores
    m16 = m64.to(torch.bfloat16)
    b16 = [(x.bfloat16(), y.bfloat16()) for x, y in batches]
    op = hs.HessianOperator(m16, loss_fn, b16, method="exact")
    res = hs.influence(op, b16[:1], b16, damping=5.0, tol=1e-3)
    assert np.isfinite(res.scores).all()
    assert np.abs(res.scores - ref).max() <= 0.05 * np.abs(ref).max()


def test_influence_uses_the_operators_parameters_and_reduction():
    """With params=[subset] and reduction="sum" the scores equal the dense formula restricted to
    those parameters, with summed (not averaged) gradients."""
    model, loss_fn, batches = make_problem("mlp")
    names = ["fc2.weight", "fc2.bias"]
    op = hs.HessianOperator(model, loss_fn, batches, method="exact", params=names, reduction="sum")
    res = hs.influence(op, batches[:2], batches, damping=1.0, tol=1e-12, max_iter=200)
    ps = [model.get_parameter(n) for n in names]

    def g_sum(bs):
        tot = sum(loss_fn(model, b)[0] * loss_fn(model, b)[1] for b in bs)
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(tot, ps)])

    from conftest import dense_hessian

    H = dense_hessian(model, loss_fn, batches, names=names, reduction="sum")
    s = torch.linalg.solve(H + torch.eye(H.shape[0], dtype=H.dtype), g_sum(batches[:2]))
    ref = np.array([-float(s @ g_sum([b])) for b in batches])
    np.testing.assert_allclose(res.scores, ref, rtol=1e-8)


def test_influence_bad_inputs():
    """A matrix instead of a HessianOperator, and no candidates, are clear errors."""
    op = hs.HessianOperator(*make_problem("mlp"))
    with pytest.raises(TypeError, match="needs a HessianOperator"):
        hs.influence(torch.eye(3), [0], [0])
    with pytest.raises(ValueError, match="candidates is empty"):
        hs.influence(op, op.batches[:1], [])
