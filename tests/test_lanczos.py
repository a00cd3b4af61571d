"""Lanczos on dense matrices with known spectra and on an MLP Hessian, against
numpy.linalg.eigvalsh."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import hessian_spectra as hs
from conftest import known_spectrum_matrix, problem_with_hessian

# 2 outliers well separated from a bulk in [0, 1]: extremes converge in a few dozen steps
OUTLIER_EIGS = np.concatenate([[100.0, 50.0], np.linspace(0.0, 1.0, 198)])


class Recording:
    """Wraps an operator and records every vector it is applied to (the Lanczos basis q_j)."""

    def __init__(self, op):
        self.op = hs.as_operator(op)
        self.params, self.num_params = self.op.params, self.op.num_params
        self.vector_dtype = self.op.vector_dtype
        self.seen = []

    def matvec(self, v):
        self.seen.append(torch.cat([t.reshape(-1).double() for t in v]))
        return self.op.matvec(v)


def test_extremes_match_eigvalsh_dense():
    """On Q diag(λ) Qᵀ (n=200, outliers 100 and 50, bulk in [0, 1]) 60 steps with full reorth
    give the largest two and the smallest eigenvalue to relative error ≤ 1e-8 (w.r.t. ||H||), for a
    DenseOperator, a plain tensor and a numpy array."""
    H = known_spectrum_matrix(OUTLIER_EIGS)
    lam = np.linalg.eigvalsh(H.numpy())
    for op in (hs.DenseOperator(H), H, H.numpy()):
        r = hs.lanczos(op, 60)
        assert r.alpha.shape == (60,) and r.beta.shape == (59,)
        assert np.all(np.diff(r.ritz_values) >= 0)
        np.testing.assert_allclose(r.ritz_values[-2:], lam[-2:], rtol=1e-8)
        assert abs(r.ritz_values[0] - lam[0]) <= 1e-8 * np.abs(lam).max()
        assert r.ritz_weights.sum() == pytest.approx(1.0, abs=1e-14)


def test_extremes_match_eigvalsh_mlp_hessian():
    """On the float64 MLP Hessian (P = 51, exact HVPs), 40 steps give λ_max and λ_min with
    relative error ≤ 1e-8 (w.r.t. max |λ|), and the residual bounds |β_m s_mi| of those Ritz
    pairs are ≤ 1e-6 · ||H||."""
    m, loss_fn, batches, H = problem_with_hessian("mlp")
    lam = np.linalg.eigvalsh(H.numpy())
    op = hs.HessianOperator(m, loss_fn, batches, method="exact")
    r = hs.lanczos(op, 40)
    scale = np.abs(lam).max()
    assert abs(r.ritz_values[-1] - lam[-1]) <= 1e-8 * scale
    assert abs(r.ritz_values[0] - lam[0]) <= 1e-8 * scale
    res = r.residual_bounds()
    assert res[-1] <= 1e-6 * scale and res[0] <= 1e-6 * scale
    assert r.config["method"] == "exact" and r.config["num_params"] == 51


def test_full_reorth_basis_is_orthonormal():
    """With reorth='full' and return_basis=True, Qᵀ Q = I to 1e-12 after 150 of 200 steps (where
    the plain recurrence has long lost orthogonality), and Qᵀ H Q = T."""
    H = known_spectrum_matrix(OUTLIER_EIGS)
    r = hs.lanczos(H, 150, return_basis=True)
    Q = torch.stack([q[0] for q in r.basis], dim=1)  # (n, m)
    assert Q.shape == (200, 150)
    I = torch.eye(150, dtype=torch.float64)
    assert float((Q.T @ Q - I).abs().max()) <= 1e-12
    assert np.abs((Q.T @ H @ Q).numpy() - r.T).max() <= 1e-10 * 100


def test_no_reorth_has_ghosts_full_has_none():
    """Without reorthogonalisation, after 150 steps the converged outliers 100 and 50 appear many
    times (ghost copies, Paige 1971) among the Ritz values; with full reorth exactly once each."""
    H = known_spectrum_matrix(OUTLIER_EIGS)

    def copies(r, lam):
        return int((np.abs(r.ritz_values - lam) < 1e-6 * lam).sum())

    none = hs.lanczos(H, 150, reorth="none")
    full = hs.lanczos(H, 150, reorth="full")
    assert copies(none, 100.0) >= 3 and copies(none, 50.0) >= 3
    assert copies(full, 100.0) == 1 and copies(full, 50.0) == 1
    assert hs.lanczos(H, 150, reorth=0).alpha.tolist() == none.alpha.tolist()


@pytest.mark.parametrize("r", [1, 3, 8])
def test_window_reorthogonalises_against_last_r(r):
    """reorth=r keeps each new basis vector orthogonal (to 1e-12) to the last r vectors, while
    vectors further apart lose orthogonality (|q_i·q_j| > 1e-3 somewhere) as with no reorth."""
    H = known_spectrum_matrix(OUTLIER_EIGS)
    rec = Recording(H)
    hs.lanczos(rec, 120, reorth=r)
    Q = torch.stack(rec.seen, dim=1)
    G = (Q.T @ Q - torch.eye(Q.shape[1], dtype=torch.float64)).abs()
    i, j = torch.triu_indices(Q.shape[1], Q.shape[1], offset=1)
    near = (j - i) <= r
    assert float(G[i[near], j[near]].max()) <= 1e-12
    assert float(G[i[~near], j[~near]].max()) > 1e-3


def test_bf16_basis_close_to_fp32():
    """A bf16 basis (half the memory) gives the extreme Ritz values of the float32 transformer
    Hessian within 1e-3 of the fp32-basis run, relative to max|λ| (measured ~2e-4); scalars stay
    float64 (alpha/beta are float64 numpy arrays)."""
    m64, loss_fn, batches, H = problem_with_hessian("transformer")
    m = copy.deepcopy(m64).float()
    op = hs.HessianOperator(m, loss_fn, batches, method="exact")
    lam = np.linalg.eigvalsh(H.numpy())
    a = hs.lanczos(op, 40)
    b = hs.lanczos(op, 40, basis_dtype=torch.bfloat16)
    assert b.alpha.dtype == np.float64 and b.config["basis_dtype"] == "bfloat16"
    scale = np.abs(lam).max()
    diff = np.abs(a.ritz_values[[0, -1]] - b.ritz_values[[0, -1]]) / scale
    assert diff.max() <= 1e-3, diff
    assert (
        np.abs(a.ritz_values[[0, -1]] - lam[[0, -1]]).max() <= 1e-5 * scale
    )  # fp32 itself is close
    assert hs.lanczos(op, 5, basis_dtype="bfloat16").config["basis_dtype"] == "bfloat16"


def test_breakdown_on_few_distinct_eigenvalues():
    """On a 60×60 matrix with 3 distinct eigenvalues {−2, 1, 5}, Lanczos asked for 20 steps stops
    after 3 with breakdown=True, and its Ritz values are those eigenvalues (to 1e-12 · ||H||)."""
    H = known_spectrum_matrix(np.repeat([-2.0, 1.0, 5.0], 20), seed=3)
    r = hs.lanczos(H, 20)
    assert r.breakdown and r.num_steps == 3 and r.residual_beta == 0.0
    np.testing.assert_allclose(r.ritz_values, [-2.0, 1.0, 5.0], rtol=0, atol=1e-12 * 5)


@pytest.mark.parametrize("reorth", ["full", 3, "none"])
def test_checkpoint_resume_gives_same_tridiagonal(tmp_path, reorth):
    """A run interrupted (KeyboardInterrupt from the callback) after 7 steps and resumed with the
    same checkpoint path produces exactly the alpha/beta of an uninterrupted run; the checkpoint
    file is removed when the run completes."""
    m, loss_fn, batches, _ = problem_with_hessian("mlp")
    op = hs.HessianOperator(m, loss_fn, batches, method="exact")
    ref = hs.lanczos(op, 20, seed=4, reorth=reorth)
    ck = tmp_path / "lanczos.pt"

    def stop(step, alpha, beta):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hs.lanczos(op, 20, seed=4, reorth=reorth, checkpoint=ck, callback=stop)
    assert ck.exists()
    steps = []
    res = hs.lanczos(
        op, 20, seed=4, reorth=reorth, checkpoint=ck, callback=lambda j, a, b: steps.append(j)
    )
    assert steps[0] == 7  # resumed where it stopped, not from scratch
    np.testing.assert_array_equal(res.alpha, ref.alpha)
    np.testing.assert_array_equal(res.beta, ref.beta)
    assert not ck.exists()


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    """Resuming from a checkpoint written with other settings raises and says what to do."""
    H = known_spectrum_matrix(OUTLIER_EIGS)
    ck = tmp_path / "c.pt"

    def stop(step, alpha, beta):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hs.lanczos(H, 10, seed=0, checkpoint=ck, callback=stop)
    with pytest.raises(ValueError, match="delete it or use another path"):
        hs.lanczos(H, 10, seed=1, checkpoint=ck)


def test_v0_and_seed():
    """A given v0 is used (normalised; its norm recorded); the same seed gives the same run."""
    H = known_spectrum_matrix(OUTLIER_EIGS)
    v0 = [torch.ones(200, dtype=torch.float64)]
    r = hs.lanczos(H, 5, v0=v0)
    q0 = v0[0] / v0[0].norm()
    assert r.alpha[0] == pytest.approx(float(q0 @ H @ q0), rel=1e-14)
    assert r.v0_norm == pytest.approx(200**0.5)
    assert hs.lanczos(H, 5, seed=3).alpha.tolist() == hs.lanczos(H, 5, seed=3).alpha.tolist()


def test_result_round_trip():
    """LanczosResult.to_dict/from_dict round-trips through JSON (alpha, beta, nodes, weights)."""
    import json

    r = hs.lanczos(known_spectrum_matrix(OUTLIER_EIGS), 10)
    r2 = hs.LanczosResult.from_dict(json.loads(json.dumps(r.to_dict())))
    np.testing.assert_array_equal(r2.alpha, r.alpha)
    np.testing.assert_array_equal(r2.ritz_values, r.ritz_values)
    np.testing.assert_array_equal(r2.ritz_weights, r.ritz_weights)


@pytest.mark.parametrize(
    "d, exc, match",
    [
        ({}, ValueError, r"missing key\(s\) 'alpha', 'beta'"),
        ({"alpha": [1.0, 2.0]}, ValueError, r"missing key\(s\) 'beta'"),
        ({"alpha": [1.0, 2.0], "beta": []}, ValueError, "beta must have length len"),
        ({"alpha": ["a"], "beta": []}, ValueError, "'alpha' must be a list of finite numbers"),
        (
            {"alpha": [1.0, float("nan")], "beta": [1.0]},
            ValueError,
            "'alpha' must be a list of finite",
        ),
        ({"alpha": [[1.0]], "beta": []}, ValueError, "'alpha' must be a list of finite numbers"),
        ({"alpha": None, "beta": None}, ValueError, "'alpha' must be a list of finite numbers"),
        ({"alpha": [1.0], "beta": [], "config": 3}, TypeError, "'config' must be a dict"),
        ("alpha", TypeError, "expected a dict"),
    ],
)
def test_result_from_malformed_dict_is_a_clear_error(d, exc, match):
    """Issue 13 item 12: LanczosResult.from_dict on a malformed dict raises a ValueError/TypeError
    naming the missing or wrong key, never a bare KeyError or a numpy/scipy message."""
    with pytest.raises(exc, match=match):
        hs.LanczosResult.from_dict(d)


def test_progress_bar_changes_no_number(capsys):
    """progress=True (a rank-0 tqdm bar on stderr) gives the same alpha/beta as progress=False
    for lanczos, slq and trace, and the bars are shown."""
    H = known_spectrum_matrix(OUTLIER_EIGS)
    a, b = hs.lanczos(H, 8, progress=True), hs.lanczos(H, 8)
    np.testing.assert_array_equal(a.alpha, b.alpha)
    np.testing.assert_array_equal(a.beta, b.beta)
    np.testing.assert_array_equal(hs.slq(H, 4, 2, progress=True).nodes, hs.slq(H, 4, 2).nodes)
    assert tuple(hs.trace(H, 3, method="hutchinson", progress=True)) == tuple(
        hs.trace(H, 3, method="hutchinson")
    )
    err = capsys.readouterr().err
    assert "Lanczos" in err and "SLQ probes" in err and "Hutchinson probes" in err
