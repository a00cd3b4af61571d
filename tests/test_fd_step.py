"""The fd step rule and the fd error measurement, against dense float64 Hessians and exact HVPs."""

from __future__ import annotations

import copy

import pytest
import torch

import hessian_spectra as hs
from conftest import problem_with_hessian
from hessian_spectra.fd_step import check_eps, eps_sweep, fd_error, fd_step


def _to_dtype(model, batches, dtype):
    m = copy.deepcopy(model).to(dtype)
    return m, [b.to(dtype) if b.is_floating_point() else b for b in batches]


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-8), (torch.float32, 2e-3)])
def test_fd_default_eps_error_is_small(dtype, bound):
    """With the default eps, fd_error(v, reference='exact') is small: ≤ 1e-8 in float64 (measured
    ~2e-10) and ≤ 2e-3 in float32 (measured ~1e-4) on the transformer; the step used is the
    documented rule 0.1·ε_mach^{1/3} / max_i(||v_i|| / ||θ_i||), computed here tensor by tensor."""
    m64, loss_fn, batches, _ = problem_with_hessian("transformer")
    m, bs = _to_dtype(m64, batches, dtype)
    op = hs.HessianOperator(m, loss_fn, bs, method="fd")
    v = hs.random_probe(op, 3)
    err = op.fd_error(v, reference="exact")
    ratio = max(
        float(t.double().norm() / p.detach().double().norm())
        for t, p in zip(v, op.params)
        if p.norm() > 0
    )
    assert err.eps == pytest.approx(0.1 * torch.finfo(dtype).eps ** (1 / 3) / ratio, rel=1e-10)
    assert err.reference == "exact" and err.ref_norm > 0
    assert err.rel_error <= bound, err


def test_fd_step_rule_edge_cases():
    """fd_step: a zero v gets step 0 (its product is 0), a v living only on zero tensors gets
    c/||v||, otherwise c / max_i ||v_i||/||θ_i|| over the nonzero tensors."""
    c = hs.default_eps_scale(torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    assert fd_step([z, z], [1.0, 0.0], torch.float64) == 0.0
    v = [z, torch.full((4,), 0.5, dtype=torch.float64)]  # ||v_1|| = 1, on a zero tensor
    assert fd_step(v, [2.0, 0.0], torch.float64) == pytest.approx(c)
    v = [torch.full((4,), 1.0, dtype=torch.float64), torch.full((4,), 3.0, dtype=torch.float64)]
    assert fd_step(v, [4.0, 2.0], torch.float64) == pytest.approx(c / 3.0)  # max(2/4, 6/2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fd_richardson_estimate_is_sane(dtype):
    """fd_error(reference='richardson') needs no exact HVP and is a sane estimate: within a factor
    10 of the true error (measured: ×1–4), and far below 1."""
    m64, loss_fn, batches, _ = problem_with_hessian("transformer")
    m, bs = _to_dtype(m64, batches, dtype)
    op = hs.HessianOperator(m, loss_fn, bs, method="fd")
    v = hs.random_probe(op, 3)
    true = fd_error(op, v, reference="exact").rel_error
    est = op.fd_error(v, reference="richardson")
    assert est.reference == "richardson"
    assert true / 10 <= est.rel_error <= 10 * true and est.rel_error < 1e-2


def test_fd_error_grows_with_a_bad_eps():
    """The error measure responds to eps: a step 1e4× the default is much worse (truncation)."""
    m, loss_fn, batches, _ = problem_with_hessian("transformer")
    op = hs.HessianOperator(m, loss_fn, batches, method="fd")
    v = hs.random_probe(op, 3)
    good = op.fd_error(v)
    bad = op.fd_error(v, eps=good.eps * 1e4)
    assert bad.rel_error > 100 * good.rel_error


def test_eps_sweep_reports_true_fd_errors(mlp64):
    """Each FDError.rel_error equals ||H_eps v - H v|| / ||H v|| with H the dense float64 Hessian,
    and the error is V-shaped in eps (truncation for large eps, rounding for tiny eps; Thm 3.1)."""
    model, loss_fn, batches, H = mlp64
    op = hs.HessianOperator(model, loss_fn, batches, method="fd")
    v = hs.unit_probe(op, 1, kind="gaussian")
    eps_values = [1e-12, 1e-6, 1e-1]
    rows = op.eps_sweep(eps_values, v)
    ref = H @ torch.cat([t.reshape(-1) for t in v])
    for e, r in zip(eps_values, rows):
        h = torch.cat([t.reshape(-1) for t in op.matvec(v, eps=e)])
        assert r.eps == e
        assert r.rel_error == pytest.approx(
            float((h - ref).norm() / ref.norm()), rel=1e-6, abs=1e-14
        )
    errs = [r.rel_error for r in rows]
    assert errs[1] < errs[0] and errs[1] < errs[2]
    assert errs[1] < 1e-7


def test_eps_sweep_default_direction_is_the_seeded_unit_probe(mlp64):
    """Without v, eps_sweep uses unit_probe(op, seed): the same rows as passing it explicitly."""
    model, loss_fn, batches, _ = mlp64
    op = hs.HessianOperator(model, loss_fn, batches)
    a = eps_sweep(op, [1e-4], seed=3)
    b = op.eps_sweep([1e-4], hs.unit_probe(op, 3))
    assert a == b


def test_eps_sweep_rejects_bad_steps(mlp64):
    """Non-positive or non-finite steps raise a clear error."""
    model, loss_fn, batches, _ = mlp64
    op = hs.HessianOperator(model, loss_fn, batches)
    for bad in ([], [0.0], [-1e-3], [float("nan")]):
        with pytest.raises(ValueError, match="eps_values"):
            op.eps_sweep(bad)


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("inf"), float("nan"), "1e-3", True])
def test_matvec_refuses_a_step_that_is_not_positive(mlp64, bad):
    """Issue 13.5: op.matvec(v, method="fd", eps=0.0) used to return a zero vector. Every step
    that is not a positive finite number is refused with a ValueError naming eps (also in
    fd_error and at construction)."""
    model, loss_fn, batches, _ = mlp64
    op = hs.HessianOperator(model, loss_fn, batches)
    v = hs.unit_probe(op)
    with pytest.raises(ValueError, match=r"eps must be a positive finite number or None"):
        op.matvec(v, method="fd", eps=bad)
    with pytest.raises(ValueError, match=r"eps must be a positive finite number"):
        op.fd_error(v, eps=bad)
    with pytest.raises(ValueError, match=r"eps must be a positive finite number"):
        hs.HessianOperator(model, loss_fn, batches, eps=bad)
    assert check_eps(2) == 2.0


def test_zero_direction_gives_zero_product(mlp64):
    """H·0 = 0: a zero v with the default step returns an exact zero vector (no division by 0);
    the fd error along a zero v is undefined and refused."""
    model, loss_fn, batches, _ = mlp64
    op = hs.HessianOperator(model, loss_fn, batches)
    out = op.matvec([torch.zeros_like(p) for p in op.params])
    assert all(float(t.abs().max()) == 0.0 for t in out)
    with pytest.raises(ValueError, match="zero vector.*nonzero direction"):
        op.fd_error([torch.zeros_like(p) for p in op.params])
