"""CG inverse-HVPs against torch.linalg.solve and SciPy's cg."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

import hessian_spectra as hs


def _spd(n=30, lo=0.5, hi=10.0, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return torch.tensor(Q @ np.diag(np.linspace(lo, hi, n)) @ Q.T), torch.tensor(
        rng.standard_normal(n)
    )


def test_cg_equals_dense_solve():
    """CG on an SPD matrix converges to torch.linalg.solve's x within its stated tolerance."""
    A, b = _spd()
    x, info = hs.cg_solve(A, [b], tol=1e-12, max_iter=200)
    ref = torch.linalg.solve(A, b)
    assert info.converged and not info.negative_curvature
    assert torch.allclose(x[0], ref, rtol=1e-9, atol=1e-10)
    assert info.residual_norms[-1] <= 1e-12 * float(b.norm())


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_cg_iterates_equal_scipy(k):
    """At a fixed max_iter, our iterate equals scipy.sparse.linalg.cg's (same Hestenes-Stiefel
    recurrence)."""
    A, b = _spd(seed=1)
    x, _ = hs.cg_solve(A, [b], tol=0.0, max_iter=k)
    xs, _ = sla.cg(A.numpy(), b.numpy(), rtol=0.0, atol=0.0, maxiter=k)
    np.testing.assert_allclose(x[0].numpy(), xs, rtol=1e-10, atol=1e-12)


def test_cg_damping_shifts_the_system():
    """damping λ solves (H + λI) x = b."""
    A, b = _spd(seed=2)
    x, info = hs.cg_solve(A, [b], damping=0.7, tol=1e-12, max_iter=200)
    ref = torch.linalg.solve(A + 0.7 * torch.eye(A.shape[0], dtype=A.dtype), b)
    assert info.converged
    assert torch.allclose(x[0], ref, rtol=1e-9, atol=1e-10)


def test_cg_reports_negative_curvature():
    """On an indefinite matrix CG stops at a direction with p^T A p ≤ 0 and says so."""
    A, b = _spd(seed=3)
    A = A - 5.0 * torch.eye(A.shape[0], dtype=A.dtype)
    _, info = hs.cg_solve(A, [b], max_iter=100)
    assert info.negative_curvature and not info.converged
    assert info.curvature <= 0


def test_cg_on_mlp_hessian_matches_dense(mlp64):
    """CG with damping on a real (indefinite) MLP Hessian equals solve(H + λI, b) of the dense
    Hessian."""
    model, loss_fn, batches, H = mlp64
    op = hs.HessianOperator(model, loss_fn, batches, method="exact")
    lam = float(max(0.0, -np.linalg.eigvalsh(H.numpy())[0])) + 1.0
    b = hs.random_probe(op, 5, kind="gaussian")
    x, info = hs.cg_solve(op, b, damping=lam, tol=1e-10, max_iter=500)
    flat_b = torch.cat([t.reshape(-1) for t in b])
    ref = torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), flat_b)
    got = torch.cat([t.reshape(-1) for t in x])
    assert info.converged
    assert float((got - ref).norm() / ref.norm()) < 1e-8


def test_cg_bad_inputs():
    """Negative damping and wrong vector shapes raise clear errors."""
    A, b = _spd()
    with pytest.raises(ValueError, match="damping"):
        hs.cg_solve(A, [b], damping=-1.0)
    with pytest.raises(ValueError, match="shape"):
        hs.cg_solve(A, [b[:3]])
