"""The shared objective: weights, reduction, mode and buffers, guards and gradient, against dense
float64 references (``hessian_spectra.testing``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessian_spectra as hs
from conftest import (
    dense_hessian,
    flat_loss_fn,
    flatten,
    make_problem,
    problem_with_hessian,
    unflatten,
)
from hessian_spectra.objective import Objective, batch_size
from hessian_spectra.partition import ZeroWeight

METHODS = ("fd", "exact", "jvp")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _direction(n, seed=1):
    return torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _hv(op, v):
    return flatten(op @ unflatten(v, op.params))


# --------------------------------------------------------------------------- gradient
def test_gradient_matches_reference():
    """gradient() returns the weighted dataset-average loss and gradient of the reference."""
    m, loss_fn, batches, _ = problem_with_hessian("transformer")
    f, theta, _, _ = flat_loss_fn(m, loss_fn, batches)
    with sdpa_kernel([SDPBackend.MATH]):
        g_ref = torch.func.grad(f)(theta)
        l_ref = float(f(theta))
    loss, g = Objective(m, loss_fn, batches).gradient()
    assert abs(loss - l_ref) < 1e-13 * abs(l_ref)
    assert _rel(flatten(g), g_ref) < 1e-13
    loss2, g2 = hs.HessianOperator(m, loss_fn, batches).gradient()
    assert loss2 == loss and all(torch.equal(a, b) for a, b in zip(g, g2))


def test_with_batches_is_the_same_objective_on_other_data():
    """with_batches(bs) keeps model, loss, parameters and reduction: its gradient equals that of
    a fresh Objective on bs with the same settings."""
    m, loss_fn, batches = make_problem("mlp")
    obj = Objective(m, loss_fn, batches, params=["fc2.weight"], reduction="sum")
    sub = obj.with_batches(batches[1:])
    ref = Objective(m, loss_fn, batches[1:], params=["fc2.weight"], reduction="sum").gradient()
    got = sub.gradient()
    assert sub.param_names == ["fc2.weight"] and got[0] == ref[0]
    assert torch.equal(got[1][0], ref[1][0])
    assert obj.batches is batches  # the original is untouched


# --------------------------------------------------------------------------- reduction (13.7)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_reduction_sum_and_mean_equal_dense_hessians(kind, method):
    """Issue 13.7: reduction="sum" is H = Σ_b w_b H_b (no division by Σ w): equal to the dense
    sum-reduced Hessian, and reduction="mean" to the mean-reduced one, for every method; with a
    loss_fn returning per-batch sums and no weight, "sum" is the Hessian of the summed risk
    Σ_examples l_i, which "mean" cannot express."""
    m, loss_fn, batches = make_problem(kind)
    v = _direction(sum(p.numel() for p in m.parameters()))
    tol = 1e-6 if method == "fd" else 1e-12
    for reduction in ("mean", "sum"):
        H = dense_hessian(m, loss_fn, batches, reduction=reduction)
        op = hs.HessianOperator(m, loss_fn, batches, method=method, reduction=reduction)
        assert _rel(_hv(op, v), H @ v) < tol, reduction
    if kind == "mlp":  # a summed risk: loss_fn returns the batch's sum, no weight
        summed = lambda model, b: ((model(b[0]) - b[1]) ** 2).sum()
        H = dense_hessian(m, lambda model, b: (summed(model, b), 1.0), batches, reduction="sum")
        op = hs.HessianOperator(m, summed, batches, method=method, reduction="sum")
        assert _rel(_hv(op, v), H @ v) < tol
        loss, _ = op.gradient()
        ref = sum(float(summed(m, b)) for b in batches)
        assert loss == pytest.approx(ref, rel=1e-13)


def test_reduction_is_validated():
    """An unknown reduction is a ValueError naming both choices."""
    with pytest.raises(ValueError, match=r"'mean'.*'sum'"):
        hs.HessianOperator(*make_problem("mlp"), reduction="avg")


# --------------------------------------------------------------------------- weights (13.5, 13.6)
def test_negative_weight_is_refused_naming_the_batch():
    """Issue 13.5: weights of mixed sign were accepted when their sum was positive. A negative
    weight is a ValueError naming the batch, for the gradient and every method (here weights
    3, 5, −2: their sum is positive, and main accepted them)."""
    m, loss_fn, batches = make_problem("mlp")

    def signed(model, b):
        loss, w = loss_fn(model, b)
        return loss, (-w if b is batches[2] else w)

    with pytest.raises(ValueError, match=r"weight -2.0 for batch 2.*≥ 0"):
        hs.HessianOperator(m, signed, batches).gradient()
    for method in METHODS:
        op = hs.HessianOperator(m, signed, batches, method=method)
        with pytest.raises(ValueError, match=r"batch 2"):
            op @ hs.random_probe(op)


def test_zero_weight_batches_count_for_nothing():
    """A weight of 0 is allowed (padding): ZeroWeight batches (and a loss_fn weight of 0) are
    evaluated but leave H and the gradient those of the other batches."""
    m, loss_fn, batches, H = problem_with_hessian("mlp")
    v = _direction(H.shape[0])
    padded = batches + [ZeroWeight(batches[0]), ZeroWeight(batches[2])]
    for method in METHODS:
        op = hs.HessianOperator(m, loss_fn, padded, method=method)
        assert _rel(_hv(op, v), H @ v) < (1e-6 if method == "fd" else 1e-12), method
    l0, g0 = Objective(m, loss_fn, batches).gradient()
    l1, g1 = Objective(m, loss_fn, padded).gradient()
    assert l1 == pytest.approx(l0, rel=1e-14) and _rel(flatten(g1), flatten(g0)) < 1e-14
    zero_w = lambda model, b: (loss_fn(model, b)[0], 0.0 if b is batches[1] else b[0].shape[0])
    H02 = dense_hessian(m, loss_fn, [batches[0], batches[2]])
    assert _rel(_hv(hs.HessianOperator(m, zero_w, batches, method="exact"), v), H02 @ v) < 1e-12


def _plain_unequal():
    m, _, batches = make_problem("mlp")  # batches of 3, 5 and 2 examples
    return m, (lambda model, b: ((model(b[0]) - b[1]) ** 2).mean()), batches


@pytest.mark.parametrize("method", METHODS)
def test_unequal_batches_without_weights_are_refused(method):
    """Issue 13.6: a loss_fn returning batch means and no weight on batches of 3, 5 and 2 examples
    gave the average of batch means (every batch weight 1), not the dataset's Hessian. That is a
    ValueError naming the sizes and both fixes; returning (loss, batch_size) gives the dense
    Hessian of the per-example mean, and equal batches without weights are fine."""
    m, loss, batches = _plain_unequal()
    op = hs.HessianOperator(m, loss, batches, method=method)
    with pytest.raises(
        ValueError, match=r"different sizes \(2 to 5.*\(loss, batch_size\).*reduction='sum'"
    ):
        op @ hs.random_probe(op)
    with pytest.raises(ValueError, match=r"different sizes"):
        op.gradient()
    weighted = lambda model, b: (loss(model, b), b[0].shape[0])
    H = dense_hessian(m, weighted, batches)
    v = _direction(H.shape[0])
    op = hs.HessianOperator(m, weighted, batches, method=method)
    assert _rel(_hv(op, v), H @ v) < (1e-6 if method == "fd" else 1e-12)
    m2, l2, b2, H2 = problem_with_hessian("plain")  # equal batches, bare scalar losses
    assert _rel(_hv(hs.HessianOperator(m2, l2, b2, method=method), v), H2 @ v) < (
        1e-6 if method == "fd" else 1e-12
    )


def test_batch_size_is_the_leading_dimension():
    """batch_size reads the first tensor's leading dimension through tuples, lists, dicts and
    ZeroWeight, and None where there is none."""
    assert batch_size(torch.zeros(7, 2)) == 7
    assert batch_size({"input_ids": torch.zeros(3, 9), "labels": torch.zeros(3, 9)}) == 3
    assert batch_size([torch.tensor(1.0), (torch.zeros(4),)]) == 4
    assert batch_size(ZeroWeight((torch.zeros(2, 1),))) == 2
    assert batch_size(0) is None and batch_size(torch.tensor(3.0)) is None


# ------------------------------------------------------------------ loss with no graph (13.12)
def _no_grad_loss(model, b):
    with torch.no_grad():
        return ((model(b[0]) - b[1]) ** 2).mean(), b[0].shape[0]


def _constant_loss(model, b):
    return (b[1] ** 2).mean(), b[0].shape[0]


@pytest.mark.parametrize("loss", [_no_grad_loss, _constant_loss], ids=["no_grad", "constant"])
@pytest.mark.parametrize("method", METHODS + ("gradient",))
def test_loss_without_graph_is_a_user_error(method, loss):
    """Issue 13.12: a loss computed under torch.no_grad() or not depending on the parameters
    surfaced as PyTorch's RuntimeError ("element 0 of tensors does not require grad"), or (jvp)
    a silent zero. It is a ValueError saying what is wrong and what to do, for every method."""
    m, _, batches = make_problem("mlp")
    op = hs.HessianOperator(m, loss, batches, method="fd" if method == "gradient" else method)
    with pytest.raises(
        ValueError, match=r"batch 0 does not depend on the parameters.*no_grad.*inside loss_fn"
    ):
        op.gradient() if method == "gradient" else op @ hs.random_probe(op)


# ------------------------------------------------------------------- mode and buffers (13.8)
def _bn_problem():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    with torch.no_grad():  # running statistics away from their (0, 1) init
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randn(n, 2, generator=g, dtype=torch.float64),
        )
        for n in (5, 7)
    ]
    loss = lambda model, b: (((model(b[0]) - b[1]) ** 2).mean(), b[0].shape[0])
    return m, loss, batches


@pytest.mark.parametrize("method", METHODS)
def test_batchnorm_train_mode_hessian_is_reachable(method):
    """Issue 13.8: a train-mode BatchNorm was refused because its running statistics change,
    though they do not enter the train-mode loss. With train_mode=True the product equals the
    dense Hessian of the train-mode loss (batch statistics of each batch), the running statistics
    and num_batches_tracked are bit-for-bit what they were, and eval mode (the default) gives the
    running-statistics Hessian, which differs."""
    m, loss, batches = _bn_problem()
    before = [b.clone() for b in m.buffers()]
    m.train()
    H_train = dense_hessian(m, loss, batches, how="autograd-loop")
    m.eval()
    H_eval = dense_hessian(m, loss, batches)
    v = _direction(H_train.shape[0])
    tol = 1e-6 if method == "fd" else 1e-12
    with pytest.warns(UserWarning) if method == "jvp" else _nullcontext():
        op = hs.HessianOperator(m, loss, batches, method=method, train_mode=True)
        hv = _hv(op, v)
    assert _rel(hv, H_train @ v) < tol
    assert _rel(H_eval @ v, H_train @ v) > 1e-2
    assert all(torch.equal(a, b) for a, b in zip(m.buffers(), before))
    assert _rel(_hv(hs.HessianOperator(m, loss, batches, method=method), v), H_eval @ v) < tol
    assert not m.training


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_dropout_in_train_mode_stays_refused_and_eval_mode_is_default():
    """Dropout is off by default (eval mode inside every call, the user's mode restored), so a
    model with dropout gives the same H v as without; train_mode=True with dropout is refused as
    not deterministic."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    drop = nn.Sequential(base[0], nn.Dropout(0.5), base[1], base[2]).train()
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(3, 4, generator=g, dtype=torch.float64),
            torch.randn(3, 2, generator=g, dtype=torch.float64),
        )
    ]
    loss = lambda model, b: ((model(b[0]) - b[1]) ** 2).mean()
    v = hs.random_probe(list(base.parameters()), 0)
    a = hs.HessianOperator(base, loss, batches, method="exact").matvec(v)
    b = hs.HessianOperator(drop, loss, batches, method="exact").matvec(v)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert drop.training and drop[1].training
    with pytest.raises(ValueError, match="not deterministic.*train_mode=False"):
        hs.HessianOperator(drop, loss, batches, method="exact", train_mode=True).matvec(v)


def test_a_loss_fed_by_a_changing_buffer_is_refused_and_the_buffer_restored():
    """State that the model updates as it runs and that feeds the loss (a counter buffer) makes
    two evaluations differ: refused as not deterministic, and the buffer is put back."""

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))
            self.register_buffer("n", torch.zeros((), dtype=torch.float64))

        def forward(self, x):
            self.n += 1
            return (self.w * x).sum() * self.n

    m = Counter()
    op = hs.HessianOperator(m, lambda model, b: model(b) ** 2, [torch.ones(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="not deterministic"):
        op @ hs.random_probe(op)
    assert float(m.n) == 0.0


# --------------------------------------------------------------------------- finite checks
class _W(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)


def test_nonfinite_hvp_is_caught_and_blamed_on_its_batch():
    """A NaN in the gradient/HVP with finite losses raises FloatingPointError naming the first
    batch whose own gradient is not finite (here batch 1: sqrt(|w·0|) has gradient inf·0)."""
    m = _W(torch.ones(5))
    batches = [torch.ones(5), torch.zeros(5)]
    loss = lambda model, b: (model.w * b).abs().sqrt().sum()
    op = hs.HessianOperator(m, loss, batches, method="fd")
    with pytest.raises(FloatingPointError, match="first from batch 1"):
        op.gradient()
    with pytest.raises(FloatingPointError, match="first from batch 1"):
        op.matvec(hs.random_probe(op))


def test_huge_finite_gradient_is_not_reported_as_nonfinite():
    """Entries of 1e37 (finite in float32) whose sum overflows are not mistaken for NaN/inf: the
    fast sum screen falls back to an entry-by-entry check."""
    m = _W(torch.full((100,), 1.1))
    loss = lambda model, b: 1e38 * ((model.w - 1) ** 2).sum() / 2
    _, g = hs.HessianOperator(m, loss, [0]).gradient()
    assert torch.isfinite(g[0]).all() and float(g[0][0]) == pytest.approx(1e37, rel=1e-5)
    assert not torch.isfinite(g[0].sum())


@pytest.mark.parametrize("method", METHODS)
def test_buffers_restored_when_loss_fn_fails_mid_pass(method):
    """A train-mode BatchNorm whose loss_fn raises on the second batch of a pass (after the
    first batch moved the running statistics): running_mean, running_var, num_batches_tracked
    and the parameters are bit-for-bit what they were, and the error reaches the caller."""
    m, loss, batches = _bn_problem()
    params = [p.detach().clone() for p in m.parameters()]
    bufs = [b.clone() for b in m.buffers()]
    calls = {"n": 0}

    def failing(model, b):
        calls["n"] += 1
        if calls["n"] == 2 + 2:  # 2 for the determinism check, then the 2nd batch of the pass
            raise RuntimeError("boom")
        return loss(model, b)

    op = hs.HessianOperator(m, failing, batches, method=method, train_mode=True)
    with pytest.raises(RuntimeError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op @ hs.random_probe(op)
    assert all(torch.equal(a, b) for a, b in zip(m.buffers(), bufs))
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), params))
