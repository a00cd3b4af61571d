"""Influence scores against the dense formula (per example and per batch), against an
up-weighting experiment, the automatic damping against the dense spectrum, and the result saying
when it is not what was asked for (issue 9 item 4, issue 13.4)."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch

import hessian_spectra as hs
from conftest import dense_hessian, flat_loss_fn, lm_loss, make_problem, problem_with_hessian
from hessian_spectra.influence import split_batch


def _ref_grad(model, loss_fn, bs, reduction="mean"):
    """The gradient of the weighted loss of ``bs`` by autograd on the flat parameters (the
    reference of ``hessian_spectra.testing``, independent of the package's operators)."""
    f, theta0, _, _ = flat_loss_fn(model, loss_fn, bs, reduction=reduction)
    theta = theta0.clone().requires_grad_(True)
    return torch.autograd.grad(f(theta), theta)[0]


def _rows(batch):
    """The rows of a batch by hand (tensor, tuple or dict), each a batch of one."""
    if isinstance(batch, torch.Tensor):
        return [batch[i : i + 1] for i in range(batch.shape[0])]
    if isinstance(batch, dict):
        n = next(iter(batch.values())).shape[0]
        return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(n)]
    return [tuple(t[i : i + 1] for t in batch) for i in range(batch[0].shape[0])]


def _dense_scores(model, loss_fn, H, query, units, lam, reduction="mean"):
    """−g_q^T (H + λI)^{-1} g_z for each unit (a batch) from the dense Hessian."""
    s = torch.linalg.solve(
        H + lam * torch.eye(H.shape[0], dtype=H.dtype), _ref_grad(model, loss_fn, query, reduction)
    )
    return np.array([-float(s @ _ref_grad(model, loss_fn, [u], reduction)) for u in units])


def _dict_lm_loss(model, batch):
    return lm_loss(model, batch["input_ids"])


def _problem(kind):
    """(model, loss_fn, batches, H): kind "transformer-dict" has dict batches {"input_ids"}."""
    if kind == "transformer-dict":
        m, _, b = make_problem("transformer")
        H = problem_with_hessian("transformer")[3]
        return m, _dict_lm_loss, [{"input_ids": x} for x in b], H
    m, l, b = make_problem(kind)
    return m, l, b, problem_with_hessian(kind)[3]


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer-dict"])
def test_per_example_scores_equal_the_dense_formula(kind):
    """Issue 9.4: one score per training example (row), each equal to −g_q^T (H + λI)^{-1} g_z with
    H the dense float64 Hessian and g_z the autograd gradient of that one row's loss (rel 1e-8),
    on tuple batches (MLP regression, CNN classification) and dict batches of a causal LM;
    batch_index/row_index say where each score came from; the model's .grad stay None."""
    model, loss_fn, batches, H = _problem(kind)
    op = hs.HessianOperator(model, loss_fn, batches, method="exact")
    lam = float(-np.linalg.eigvalsh(H.numpy())[0]) + 0.5
    query = [batches[0]]
    res = hs.influence(op, query, batches, damping=lam, tol=1e-12, max_iter=500)
    rows = [(b, r, ex) for b, batch in enumerate(batches) for r, ex in enumerate(_rows(batch))]
    ref = _dense_scores(model, loss_fn, H, query, [ex for *_, ex in rows], lam)
    assert res.converged and res.status == "complete" and res.per_example
    assert res.scores.shape == (len(rows),)
    assert res.batch_index.tolist() == [b for b, _, _ in rows]
    assert res.row_index.tolist() == [r for _, r, _ in rows]
    np.testing.assert_allclose(res.scores, ref, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())
    d = res.to_dict()
    assert d["row_index"] == res.row_index.tolist() and d["per_example"] is True


def test_per_batch_scores_equal_the_dense_formula(mlp64):
    """per_example=False keeps one score per candidate batch, equal to the dense formula with
    the batch's weighted-mean gradient; row_index is None."""
    model, loss_fn, batches, H = mlp64
    op = hs.HessianOperator(model, loss_fn, batches, method="exact")
    lam = float(max(0.0, -np.linalg.eigvalsh(H.numpy())[0])) + 0.5
    query = [batches[0]]
    res = hs.influence(op, query, batches, per_example=False, damping=lam, tol=1e-12)
    ref = _dense_scores(model, loss_fn, H, query, batches, lam)
    assert res.converged and res.row_index is None and res.batch_index.tolist() == [0, 1, 2]
    np.testing.assert_allclose(res.scores, ref, rtol=1e-8, atol=1e-12)
    assert res.to_dict()["row_index"] is None


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_score_is_the_weighted_mean_or_sum_of_its_example_scores(kind, reduction):
    """Where a batch's loss is the weighted mean of its rows' (l_b = Σ w_i l_i / w_b: MSE with
    weight = rows, next-token CE with weight = tokens), a batch's score is Σ (w_i / w_b) score_i
    under reduction "mean" and Σ score_i under "sum" (rel 1e-10), with the same damping;
    ``weights`` are those of loss_fn."""
    model, loss_fn, batches = make_problem(kind)
    op = hs.HessianOperator(model, loss_fn, batches, method="exact", reduction=reduction)
    kw = {"damping": 3.0, "tol": 1e-13, "max_iter": 500}
    ex = hs.influence(op, batches[1:], batches, **kw)
    bt = hs.influence(op, batches[1:], batches, per_example=False, **kw)
    for b in range(len(batches)):
        i = ex.batch_index == b
        w = ex.weights[i]
        assert w.sum() == pytest.approx(bt.weights[b], rel=1e-15)
        want = (w * ex.scores[i]).sum() / w.sum() if reduction == "mean" else ex.scores[i].sum()
        assert bt.scores[b] == pytest.approx(want, rel=1e-10), b


def _masked_problem():
    """An MLP whose loss averages only unmasked rows (weight = their number): row 1 of batch 0
    is masked out, so it is not part of the objective."""
    model, _, batches = make_problem("mlp")
    masks = [torch.tensor([1.0, 0.0, 1.0]), torch.ones(5), torch.ones(2)]

    def loss(m, b):
        x, y, mask = b
        per_row = ((m(x) - y) ** 2).mean(1)
        n = mask.sum()
        return (per_row * mask).sum() / n.clamp(min=1), n

    return model, loss, [(x, y, k.double()) for (x, y), k in zip(batches, masks)]


def test_a_row_of_weight_zero_scores_zero_and_the_others_match_the_dense_formula():
    """A row whose loss_fn weight is 0 (e.g. no target tokens) is not part of the objective: its
    score is 0 (weight 0 recorded), the other rows' equal the dense formula."""
    model, loss, batches = _masked_problem()
    H = dense_hessian(model, loss, batches)
    op = hs.HessianOperator(model, loss, batches, method="exact")
    lam = float(-np.linalg.eigvalsh(H.numpy())[0]) + 0.5
    res = hs.influence(op, [batches[1]], batches, damping=lam, tol=1e-12, max_iter=500)
    assert res.weights.tolist() == [1, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert res.scores[1] == 0.0
    keep = [(b, ex) for b, batch in enumerate(batches) for ex in _rows(batch)]
    keep = [ex for j, (_, ex) in enumerate(keep) if j != 1]
    ref = _dense_scores(model, loss, H, [batches[1]], keep, lam)
    np.testing.assert_allclose(np.delete(res.scores, 1), ref, rtol=1e-8, atol=1e-12)


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


@pytest.mark.parametrize("per_example", [False, True])
def test_influence_is_the_derivative_of_the_query_loss_under_upweighting(per_example):
    """Issue 13.4, the sign: on a damped linear least-squares problem (convex; (H + λI)^{-1} exact),
    with θ* the minimiser of L(θ) + λ/2 ||θ||², the score of a batch z (or of one example z)
    equals d/dε L_q(θ*_ε) at ε = 0, θ*_ε the minimiser with ε·l_z added (a central difference of
    exact re-solves, rel 1e-6). So a positive score raises the query loss (harmful) and a
    negative one lowers it (helpful); the query's own data, as a candidate, is helpful."""
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
        Hz, rz = hess_rhs(z, 1.0) if z is not None else (0.0, 0.0)
        return torch.linalg.solve(H + lam * torch.eye(4, dtype=H.dtype) + e * Hz, r + e * rz)

    def query_loss(theta):
        X, y = Xy(query[0])
        return float(((X @ theta - y) ** 2).mean())

    theta0 = theta_star(None, 0.0)
    with torch.no_grad():
        model.weight.copy_(theta0[:3].reshape(1, 3))
        model.bias.copy_(theta0[3:])
    op = hs.HessianOperator(model, loss, train, method="exact")
    res = hs.influence(
        op, query, train + query, per_example=per_example, damping=lam, tol=1e-13, max_iter=50
    )
    assert res.converged
    units = [ex for b in train for ex in _rows(b)] if per_example else train
    assert len(res.scores) == len(units) + (3 if per_example else 1)
    h = 1e-5
    for j, z in enumerate(units):
        d = (query_loss(theta_star(z, h)) - query_loss(theta_star(z, -h))) / (2 * h)
        assert res.scores[j] == pytest.approx(d, rel=1e-6, abs=1e-12), j
    own = res.scores[len(units) :]
    assert own.sum() < 0  # the query's own data helps it
    assert res.most_helpful(3)[0] == int(np.argmin(res.scores))


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_auto_damping_makes_H_plus_lambda_I_positive_definite(kind):
    """Issue 9.4: damping="auto" (the default) chooses λ with λ + λ_min(H) > 0 against the dense
    Hessian's eigenvalues (these tiny models are indefinite: about half their eigenvalues are
    negative), λ ≥ 1% of |λ|_max, and with it CG converges; the choice and its Lanczos estimates
    are recorded, and the scores equal the dense formula at the chosen λ."""
    model, loss_fn, batches = make_problem(kind)
    H = problem_with_hessian(kind)[3]
    ev = np.linalg.eigvalsh(H.numpy())
    assert ev[0] < 0
    op = hs.HessianOperator(model, loss_fn, batches, method="exact")
    res = hs.influence(op, batches[:1], batches, tol=1e-10, max_iter=500)
    c = res.damping_choice
    assert res.damping == c.value and c.term == "curvature"
    assert res.damping + ev[0] > 0.1 * abs(ev[0])  # positive definite, with room to spare
    assert res.damping >= 0.01 * max(abs(ev[0]), abs(ev[-1])) - 1e-12
    assert c.lambda_min >= ev[0] - 1e-9 and c.lambda_max <= ev[-1] + 1e-9  # Ritz values inside
    assert res.converged and res.status == "complete" and not res.cg.negative_curvature
    d = res.to_dict()
    assert d["damping_choice"]["value"] == res.damping and "rule" in d["damping_choice"]
    ref = _dense_scores(
        model, loss_fn, H, batches[:1], [ex for b in batches for ex in _rows(b)], c.value
    )
    np.testing.assert_allclose(res.scores, ref, rtol=1e-6, atol=1e-12)


def test_auto_damping_converges_where_the_old_default_failed():
    """Issue 9.4: the old CLI default damping 0.01 met negative curvature on the tests' factory
    MLP (CG stopped, residual 5.14); the auto default converges on it, and on a positive-definite
    H (here H = A^T A + I as a dense operator) only the floor (1% of λ_max) applies."""
    import factories

    model, loss_fn, batches = factories.mlp()
    op = hs.HessianOperator(model, loss_fn, batches, method="exact")
    old = hs.influence(op, batches[:1], batches, damping=0.01, tol=1e-4, max_iter=50)
    assert old.status == "not_converged" and old.cg.negative_curvature
    new = hs.influence(op, batches[:1], batches, tol=1e-4, max_iter=50)
    assert new.status == "complete"
    ev = np.linalg.eigvalsh(dense_hessian(model, loss_fn, batches).numpy())
    assert new.damping + ev[0] > 0

    A = torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    M = A.T @ A + torch.eye(30, dtype=torch.float64)
    c = hs.solvers.auto_damping(hs.DenseOperator(M), num_steps=30)
    top = float(torch.linalg.eigvalsh(M)[-1])
    assert c.term == "floor" and c.value == pytest.approx(0.01 * top, rel=1e-9)


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
        assert d["damping_choice"] is None and d["damping"] == kw["damping"]
    assert res.cg.iterations == 1 and not res.cg.negative_curvature


def test_influence_on_a_bf16_model_with_exact_products():
    """Issue 7: influence() failed on a bf16 model even with method="exact" (its throwaway
    operators defaulted to fd, refused in bf16). It now takes the gradients from the operator's
    objective: the per-example scores are finite and within bf16 accuracy (5% of the largest) of
    the float64 ones."""
    m64, loss_fn, batches = make_problem("mlp")
    op64 = hs.HessianOperator(m64, loss_fn, batches, method="exact")
    ref = hs.influence(op64, batches[:1], batches, damping=5.0, tol=1e-10).scores
    m16 = m64.to(torch.bfloat16)
    b16 = [(x.bfloat16(), y.bfloat16()) for x, y in batches]
    op = hs.HessianOperator(m16, loss_fn, b16, method="exact")
    res = hs.influence(op, b16[:1], b16, damping=5.0, tol=1e-3)
    assert np.isfinite(res.scores).all() and res.scores.shape == ref.shape == (10,)
    assert np.abs(res.scores - ref).max() <= 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("per_example", [False, True])
def test_influence_uses_the_operators_parameters_and_reduction(per_example):
    """With params=[subset] and reduction="sum" the scores equal the dense formula restricted to
    those parameters, with summed (not averaged) gradients, per batch and per example."""
    model, loss_fn, batches = make_problem("mlp")
    names = ["fc2.weight", "fc2.bias"]
    op = hs.HessianOperator(model, loss_fn, batches, method="exact", params=names, reduction="sum")
    res = hs.influence(
        op, batches[:2], batches, per_example=per_example, damping=1.0, tol=1e-12, max_iter=200
    )
    ps = [model.get_parameter(n) for n in names]

    def g_sum(bs):
        tot = sum(loss_fn(model, b)[0] * loss_fn(model, b)[1] for b in bs)
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(tot, ps)])

    H = dense_hessian(model, loss_fn, batches, names=names, reduction="sum")
    s = torch.linalg.solve(H + torch.eye(H.shape[0], dtype=H.dtype), g_sum(batches[:2]))
    units = [ex for b in batches for ex in _rows(b)] if per_example else batches
    ref = np.array([-float(s @ g_sum([u])) for u in units])
    np.testing.assert_allclose(res.scores, ref, rtol=1e-8)


def test_split_batch_cuts_every_tensor_along_the_batch_dimension():
    """split_batch gives B batches of one from a tensor, a tuple, a named tuple and a nested dict
    (leading dimension kept, other objects passed on), and refuses a tensor whose first
    dimension is not B or a batch with no tensor."""
    x, y = torch.arange(12.0).reshape(3, 4), torch.tensor([7, 8, 9])
    assert [t.tolist() for t in split_batch(x)] == [
        [[0, 1, 2, 3]],
        [[4, 5, 6, 7]],
        [[8, 9, 10, 11]],
    ]
    rows = split_batch((x, y))
    assert len(rows) == 3 and isinstance(rows[2], tuple) and rows[2][1].tolist() == [9]
    P = namedtuple("P", "x y")
    assert split_batch(P(x, y))[1].y.tolist() == [8]
    d = split_batch({"ids": x, "meta": {"lab": y, "name": "a"}, "T": torch.tensor(2.0)})
    assert d[0]["meta"]["lab"].tolist() == [7] and d[0]["meta"]["name"] == "a"
    assert float(d[2]["T"]) == 2.0 and d[2]["ids"].shape == (1, 4)
    with pytest.raises(ValueError, match=r"shape \(2,\) whose first dimension is not 3"):
        split_batch((x, torch.zeros(2)))
    with pytest.raises(ValueError, match="holds no tensor with a batch dimension"):
        split_batch({"a": 1})


def test_influence_bad_inputs():
    """A matrix instead of a HessianOperator, no candidates, and a damping that is neither a
    number nor "auto" are clear errors."""
    op = hs.HessianOperator(*make_problem("mlp"))
    with pytest.raises(TypeError, match="needs a HessianOperator"):
        hs.influence(torch.eye(3), [0], [0])
    with pytest.raises(ValueError, match="candidates is empty"):
        hs.influence(op, op.batches[:1], [])
    with pytest.raises(ValueError, match="a number ≥ 0 or 'auto'"):
        hs.influence(op, op.batches[:1], op.batches, damping="big")
