"""top_eigenvalues and Hutchinson's trace against numpy.linalg.eigvalsh / exact traces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hessian_spectra as hs
from conftest import known_spectrum_matrix, problem_with_hessian

EIGS = np.concatenate([[-30.0, -12.0], np.linspace(-1.0, 1.0, 150), [8.0, 20.0, 45.0]])


def test_top_eigenvalues_dense():
    """top_eigenvalues(H, 3) gives the 3 largest algebraic eigenvalues (descending) and the 3
    smallest (ascending) of a known spectrum to relative error 1e-8 (w.r.t. ||H||)."""
    H = known_spectrum_matrix(EIGS)
    res = hs.top_eigenvalues(H, 3, num_steps=60)
    lam = np.linalg.eigvalsh(H.numpy())
    np.testing.assert_allclose(res.eigenvalues, lam[::-1][:3], rtol=0, atol=1e-8 * 45)
    np.testing.assert_allclose(res.smallest, lam[:2].tolist() + [lam[2]], rtol=0, atol=1e-8 * 45)
    assert (
        np.asarray(res).tolist() == res.eigenvalues.tolist()
        and len(res) == 3
        and res[0] == res.largest[0]
    )
    assert np.all(res.residuals <= 1e-6 * 45)


def test_top_eigenvalues_mlp_hessian_with_vectors():
    """On the float64 MLP Hessian (exact HVPs) the top-2 and bottom-2 eigenvalues equal eigvalsh
    to 1e-8 relative (w.r.t. max|λ|); return_vectors gives unit vectors with ||H y − θ y|| ≤ 1e-6 ·
    max|λ| (measured with a fresh matvec, not the Lanczos bound)."""
    m, loss_fn, batches, Hm = problem_with_hessian("mlp")
    lam = np.linalg.eigvalsh(Hm.numpy())
    scale = np.abs(lam).max()
    op = hs.HessianOperator(m, loss_fn, batches, method="exact")
    res = hs.top_eigenvalues(op, 2, num_steps=45, return_vectors=True)
    np.testing.assert_allclose(res.eigenvalues, lam[::-1][:2], rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(res.smallest, lam[:2], rtol=0, atol=1e-8 * scale)
    for vals, vecs in ((res.eigenvalues, res.vectors), (res.smallest, res.vectors_smallest)):
        assert len(vecs) == 2
        for theta, y in zip(vals, vecs):
            assert hs.norm(y) == pytest.approx(1.0, abs=1e-10)
            Hy = op.matvec(y)
            r = hs.norm(hs.sub(Hy, hs.scale(float(theta), hs.clone(y))))
            assert r <= 1e-6 * scale, r
    assert res.run.basis is None  # the basis is dropped after the vectors are formed


def test_top_eigenvalues_default_steps():
    """The default num_steps is min(P, max(3k, 2k + 20)) and still finds the outliers."""
    H = known_spectrum_matrix(EIGS)
    res = hs.top_eigenvalues(H, 2)
    assert res.run.num_steps == 24
    np.testing.assert_allclose(res.eigenvalues, [45.0, 20.0], rtol=1e-6)


def test_hutchinson_trace_converges():
    """Hutchinson's trace (Rademacher) is within 4 standard errors of tr(H) with 100 probes; its
    standard error matches theory sqrt(2(||H||_F² − Σ H_ii²)/S) within 30%; and its mean absolute
    error over 5 seeds shrinks from 4 to 64 probes (by > 2×)."""
    H = known_spectrum_matrix(EIGS)
    tr = float(EIGS.sum())
    est = hs.trace(H, 100, seed=0)
    assert est.estimate == est[0] and est.std_error == est[1] and est.samples.shape == (100,)
    assert abs(est.estimate - tr) <= 4 * est.std_error
    theory = math.sqrt(2 * (float((H**2).sum()) - float((H.diagonal() ** 2).sum())) / 100)
    assert est.std_error == pytest.approx(theory, rel=0.3)

    def mean_err(num):
        return np.mean([abs(hs.trace(H, num, seed=1000 * s).estimate - tr) for s in range(5)])

    assert mean_err(64) < mean_err(4) / 2


def test_hutchinson_on_mlp_hessian():
    """On the MLP Hessian (fd HVPs), Hutchinson's estimate is within 4 SE of tr(H), and each sample
    is zᵀ H z of the seeded probe z (exact to 1e-6 relative, the fd tolerance)."""
    m, loss_fn, batches, Hm = problem_with_hessian("mlp")
    op = hs.HessianOperator(m, loss_fn, batches, method="fd")
    est = hs.trace(op, 30, seed=0)
    assert abs(est.estimate - float(Hm.trace())) <= 4 * est.std_error
    z = torch.cat([t.reshape(-1) for t in hs.random_probe(op, 0, dtype=torch.float64)])
    assert est.samples[0] == pytest.approx(float(z @ Hm @ z), rel=1e-6)
    assert math.isnan(hs.trace(op, 1).std_error)
