"""Ghosts (FSHP Thm 4.1) and the ω-recurrence, against matrices with known spectra."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hessian_spectra import DenseOperator
from hessian_spectra.ghosts import ghost_indices, orthogonality_loss
from hessian_spectra.lanczos import GhostWarning, LanczosResult, lanczos

OUTLIERS = (20.0, 50.0, 100.0)


def _matrix(n: int = 200) -> torch.Tensor:
    """A dense float64 matrix Q diag(bulk in [0, 1], 20, 50, 100) Qᵀ: its outliers converge
    in a few steps, after which plain Lanczos loses orthogonality in their directions."""
    g = torch.Generator().manual_seed(0)
    eigs = torch.cat([torch.linspace(0, 1, n - 3), torch.tensor(OUTLIERS)]).double()
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return q @ torch.diag(eigs) @ q.T


def _copies(values, target, tol=1e-8) -> int:
    return int(np.sum(np.abs(np.asarray(values) - target) <= tol * abs(target)))


def test_ghosts_without_reorth_are_the_extra_copies_of_the_outliers():
    """Without reorthogonalisation, 60 steps find each outlier several times (ghosts); the
    Ritz values the test keeps hold exactly one copy of each true outlier, and the ghosts are
    counted in num_ghosts, ghost_indices and the saved dict."""
    with pytest.warns(GhostWarning, match="ghost"):
        res = lanczos(DenseOperator(_matrix()), 60, seed=1, reorth="none")
    vals = res.ritz_values
    assert all(_copies(vals, x) >= 2 for x in OUTLIERS)  # the failure Thm 4.1 describes
    g = res.ghost_indices()
    assert res.num_ghosts == g.size > 0
    kept = np.delete(vals, g)
    assert [_copies(kept, x) for x in OUTLIERS] == [1, 1, 1]
    extra = sum(_copies(vals, x) - 1 for x in OUTLIERS)
    assert res.num_ghosts >= extra
    d = json.loads(json.dumps(res.to_dict()))
    assert d["num_ghosts"] == res.num_ghosts and d["ghost_indices"] == g.tolist()
    assert d["orthogonality_loss"] > 1e-4  # orthogonality lost, by the ω estimate
    assert LanczosResult.from_dict(d).num_ghosts == res.num_ghosts  # alpha/beta only


@pytest.mark.parametrize("steps", [30, 60, 100])
def test_no_ghosts_with_full_reorth(steps, recwarn):
    """With full reorthogonalisation there are no ghosts, every outlier appears once, the ω
    estimate stays at ε and no GhostWarning is given."""
    res = lanczos(DenseOperator(_matrix()), steps, seed=1, reorth="full")
    assert res.num_ghosts == 0 and res.ghost_indices().tolist() == []
    assert [_copies(res.ritz_values, x) for x in OUTLIERS] == [1, 1, 1]
    assert res.orthogonality_loss().max() <= 1e-15
    assert not [w for w in recwarn if issubclass(w.category, GhostWarning)]


@pytest.mark.parametrize(("basis_dtype", "rel"), [(None, 1e-5), ("bfloat16", 1e-2)])
def test_no_false_ghosts_in_a_clustered_float32_bulk(basis_dtype, rel):
    """float32 matrix, 80 full-reorth steps, 297 eigenvalues in [-1, 1] and 3 outliers (a
    bf16 basis too): no Ritz value is flagged (a tolerance in the basis dtype's ε, or
    10·m·ε for the T̂ match, flagged 8 to 79 of them)."""
    n = 300
    g = torch.Generator().manual_seed(0)
    eigs = torch.cat([torch.linspace(-1, 1, n - 3), torch.tensor(OUTLIERS)]).double()
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    a = (q @ torch.diag(eigs) @ q.T).float()
    res = lanczos(DenseOperator(a), 80, seed=1, reorth="full", basis_dtype=basis_dtype)
    assert res.vector_dtype == "float32"
    assert res.num_ghosts == 0
    assert [_copies(res.ritz_values, x, rel) for x in OUTLIERS] == [1, 1, 1]


def test_alpha_beta_unchanged_by_the_diagnostics():
    """The diagnostics read T only: alpha/beta are the same numbers as a run's (no basis
    stored, nothing recomputed)."""
    op = DenseOperator(_matrix(60))
    a = lanczos(op, 20, seed=3, reorth="full")
    b = lanczos(op, 20, seed=3, reorth="full")
    a.to_dict()
    assert a.alpha.tolist() == b.alpha.tolist() and a.beta.tolist() == b.beta.tolist()


def test_cullum_willoughby_simple_eigenvalue_of_that_hat():
    """A simple eigenvalue of T that is also one of T̂ (T without its first row/column) has no
    weight on the start vector: T = [[1, .5, 0], [.5, 2, 0], [0, 0, 3]] has 3 as a ghost."""
    assert ghost_indices([1.0, 2.0, 3.0], [0.5, 0.0]).tolist() == [2]
    res = LanczosResult(alpha=[1.0, 2.0, 3.0], beta=[0.5, 0.0])
    assert res.ritz_values[res.ghost_indices()].tolist() == [3.0]
    assert res.ritz_weights[2] == pytest.approx(0.0, abs=1e-30)


def test_cullum_willoughby_keeps_one_copy_of_a_cluster():
    """Two numerically equal eigenvalues of T (copies): one is kept (the heavier), one is a
    ghost; the distinct ones are kept."""
    # T = diag-ish with a decoupled copy: eigenvalues {1, 3, 3 (coupled to e1), 3 (decoupled)}
    res = LanczosResult(alpha=[2.0, 2.0, 3.0], beta=[1.0, 0.0])
    assert np.allclose(res.ritz_values, [1.0, 3.0, 3.0])
    assert res.ghost_indices().size == 1
    assert res.ritz_weights[np.delete(np.arange(3), res.ghost_indices())].sum() == (
        pytest.approx(1.0)
    )


def _plain_lanczos(a: np.ndarray, v: np.ndarray, m: int):
    """Three-term Lanczos in float64 NumPy keeping Q (for the true q_j·q_k)."""
    q = [v / np.linalg.norm(v)]
    alpha, beta = [], []
    prev = np.zeros_like(v)
    for j in range(m):
        w = a @ q[j] - (beta[-1] * prev if beta else 0.0)
        alpha.append(float(q[j] @ w))
        w = w - alpha[-1] * q[j]
        if j == m - 1:
            break
        beta.append(float(np.linalg.norm(w)))
        prev = q[j]
        q.append(w / beta[-1])
    return np.array(alpha), np.array(beta), np.array(q)


def test_omega_recurrence_tracks_the_true_loss_of_orthogonality():
    """The ω estimate (from alpha, beta alone) and the true max_k<j |q_j·q_k| of a plain
    Lanczos run cross √ε within 5 steps of each other, and the estimate is never more than
    10x below the truth once both are above 1e-12 (it is meant to be pessimistic)."""
    a = _matrix(200).numpy()
    v = np.random.default_rng(1).standard_normal(200)
    alpha, beta, q = _plain_lanczos(a, v, 60)
    gram = np.abs(np.tril(q @ q.T, -1))
    true = gram.max(axis=1)
    est = orthogonality_loss(alpha, beta, eps=2.0**-52, window=0)
    s = np.sqrt(2.0**-52)
    j_true, j_est = int(np.argmax(true > s)), int(np.argmax(est > s))
    assert true.max() > s and est.max() > s
    assert abs(j_true - j_est) <= 5, (j_true, j_est)
    both = (true > 1e-12) & (est > 1e-12) & (true < 0.1)
    assert both.sum() >= 5
    ratio = np.log10(est[both] / true[both])
    assert np.all(ratio >= -1), ratio


def test_omega_with_a_window_is_reset_for_the_kept_vectors():
    """With a window r ≥ m every vector is reorthogonalised against all before it: the
    estimate stays at ε, as for full; with r = 0 (none) it grows past √ε on the same T; a run's
    own orthogonality_loss() reads its reorth from config."""
    res = lanczos(DenseOperator(_matrix()), 60, seed=1, reorth="full")
    eps = 2.0**-52
    full = orthogonality_loss(res.alpha, res.beta, eps=eps, window=None)
    wide = orthogonality_loss(res.alpha, res.beta, eps=eps, window=60)
    none = orthogonality_loss(res.alpha, res.beta, eps=eps, window=0)
    assert full.max() <= eps and wide.max() <= eps
    assert none.max() > np.sqrt(eps)
    assert res.orthogonality_loss().tolist() == full.tolist()


def test_density_summary_counts_the_ghosts_of_every_probe():
    """`SpectralDensity.summary()["num_ghosts"]` is the sum of the probes' ghost counts: > 0 for
    plain Lanczos past convergence of the outliers, 0 under full reorthogonalisation."""
    from hessian_spectra import slq

    H = DenseOperator(_matrix())
    with pytest.warns(GhostWarning):
        plain = slq(H, 60, 2, seed=1, reorth="none")
    assert plain.summary()["num_ghosts"] == sum(r.num_ghosts for r in plain.runs) > 0
    assert slq(H, 60, 2, seed=1, reorth="full").summary()["num_ghosts"] == 0


def test_full_reorth_keeps_ritz_values_of_negligible_weight():
    """A genuine eigenvalue whose eigenvector is ~orthogonal to the probe (weight 1e-20) is a
    simple eigenvalue of T that matches one of T-hat: Cullum–Willoughby calls it spurious, but
    under full reorthogonalisation it is genuine (found by the ghost count of a SmolLM2 run)."""
    n = 60
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigs = np.concatenate([np.linspace(-1.0, 1.0, n - 1), [50.0]])
    H = torch.tensor((Q * eigs) @ Q.T)
    v0 = [torch.tensor(Q[:, :-1] @ rng.standard_normal(n - 1) + 1e-10 * Q[:, -1])]
    res = lanczos(H, 30, v0=v0, reorth="full")
    top = int(np.argmax(res.ritz_values))
    assert abs(res.ritz_values[top] - 50.0) < 1e-6  # found, with a weight of ~1e-22
    assert res.ritz_weights[top] < 1e-18
    assert res.num_ghosts == 0  # under full reorthogonalisation: genuine
    # the T̂ match that CW alone applies: 3.0 is decoupled (weight 0) and an eigenvalue of T̂
    a, b = [1.0, 2.0, 3.0], [0.5, 0.0]
    assert ghost_indices(a, b).tolist() == [2]
    assert ghost_indices(a, b, full_reorth=True).tolist() == []
    assert LanczosResult(alpha=a, beta=b, config={"reorth": "full"}).num_ghosts == 0
    assert LanczosResult(alpha=a, beta=b, config={"reorth": "none"}).num_ghosts == 1
