"""SLQ: density normalisation, Gauss-quadrature exactness of moments, trace convergence, JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import hessian_spectra as hs
from conftest import known_spectrum_matrix, problem_with_hessian

N = 120
# spectrum in [-1, 2] with 30% negative eigenvalues, well away from 0
EIGS = np.concatenate([np.linspace(-1.0, -0.2, 36), np.linspace(0.2, 2.0, 84)])


@pytest.fixture(scope="module")
def H():
    return known_spectrum_matrix(EIGS, seed=1)


def _probes(op, seed, num):
    """The unit probes SLQ uses (probe s: random_probe(op, seed + s), Rademacher)."""
    out = []
    for s in range(num):
        (z,) = hs.random_probe(op, seed + s, dtype=torch.float64)
        out.append(z / z.norm())
    return out


def test_density_integrates_to_one(H):
    """dens.density() on its default grid integrates to 1 (trapezoid, |∫ − 1| ≤ 1e-6), also with
    an explicit sigma, and is nonnegative."""
    dens = hs.slq(H, 10, 4)
    grid = dens.default_grid()
    rho = dens.density(grid)
    assert np.all(rho >= 0)
    assert abs(np.trapezoid(rho, grid) - 1.0) <= 1e-6
    s = 0.1
    g2 = dens.default_grid(sigma=s, num=4001)
    assert abs(np.trapezoid(dens.density(g2, sigma=s), g2) - 1.0) <= 1e-6
    assert dens.density().shape == (1001,)


def test_moments_exact_per_probe(H):
    """Per probe, sum_i w_i θ_i^k == vᵀ H^k v for every k ≤ 2m − 1 (Gauss quadrature with m = 5
    nodes), to 1e-10 · ||H||^k; and k = 2m differs (the rule is no more than exact)."""
    m = 5
    dens = hs.slq(H, m, 3, seed=10)
    lam_max = float(np.abs(EIGS).max())
    op = hs.as_operator(H)
    for run, v in zip(dens.runs, _probes(op, 10, 3)):
        Hk_v = v.clone()
        for k in range(2 * m + 1):
            exact = float(v @ Hk_v)
            quad = float(np.sum(run.ritz_weights * run.ritz_values**k))
            if k <= 2 * m - 1:
                assert abs(quad - exact) <= 1e-10 * lam_max**k, (k, quad, exact)
            else:
                assert abs(quad - exact) > 1e-8 * lam_max**k
            Hk_v = H @ Hk_v


def test_moments_over_probes_within_budget(H):
    """dens.moment(k) (mean over probes) equals tr(H^k)/P within 4 standard errors of the per-probe
    values, for k = 1..4 with 40 probes of 6 steps."""
    dens = hs.slq(H, 6, 40, seed=0)
    lam = np.linalg.eigvalsh(H.numpy())
    for k in range(1, 5):
        per = np.sum(dens.weights * dens.nodes**k, axis=1)
        se = per.std(ddof=1) / math.sqrt(len(per))
        exact = np.mean(lam**k)
        assert dens.moment(k) == pytest.approx(per.mean(), rel=1e-14)
        assert abs(dens.moment(k) - exact) <= 4 * se, (k, dens.moment(k), exact, se)


def test_slq_trace_converges(H):
    """SLQ's trace is within 4 of its own standard errors of tr(H), and its mean absolute error over
    5 independent seeds shrinks from 4 to 64 probes (by more than 2×; theory: 4×)."""
    tr = float(EIGS.sum())
    dens = hs.slq(H, 4, 64, seed=0)
    assert abs(dens.trace() - tr) <= 4 * dens.trace_std_error()

    def mean_err(num):
        return np.mean([abs(hs.slq(H, 4, num, seed=1000 * s).trace() - tr) for s in range(5)])

    assert mean_err(64) < mean_err(4) / 2


def test_slq_on_mlp_hessian():
    """On the MLP Hessian (exact HVPs), SLQ's trace is within 4 standard errors of tr(H) and its
    extreme nodes bracket the spectrum: λ_min ≤ lowest node, highest node ≤ λ_max (to 1e-10)."""
    m, loss_fn, batches, Hm = problem_with_hessian("mlp")
    op = hs.HessianOperator(m, loss_fn, batches, method="exact")
    dens = hs.slq(op, 12, 16, seed=0)
    lam = np.linalg.eigvalsh(Hm.numpy())
    assert abs(dens.trace() - lam.sum()) <= 4 * dens.trace_std_error()
    tol = 1e-10 * np.abs(lam).max()
    assert lam[0] - tol <= dens.lambda_min and dens.lambda_max <= lam[-1] + tol
    assert dens.nodes.shape == (16, 12) and dens.weights.shape == (16, 12)
    np.testing.assert_allclose(dens.weights.sum(axis=1), 1.0, atol=1e-13)


def test_negative_mass_within_budget(H):
    """negative_mass() estimates the fraction of negative eigenvalues (0.3 here) within 4 standard
    errors over 40 probes."""
    dens = hs.slq(H, 20, 40, seed=0)
    per = np.sum(dens.weights * (dens.nodes < 0), axis=1)
    se = per.std(ddof=1) / math.sqrt(len(per))
    assert abs(dens.negative_mass() - 0.3) <= 4 * se


def test_json_round_trip(H):
    """to_dict → json.dumps → json.loads → from_dict preserves nodes, weights, trace and the
    per-probe tridiagonals exactly; the summary carries the fixed names."""
    dens = hs.slq(H, 7, 3, seed=2)
    d = json.loads(json.dumps(dens.to_dict()))
    back = hs.SpectralDensity.from_dict(d)
    np.testing.assert_array_equal(back.nodes, dens.nodes)
    np.testing.assert_array_equal(back.weights, dens.weights)
    assert back.trace() == dens.trace() and back.num_params == N
    for a, b in zip(back.runs, dens.runs):
        np.testing.assert_array_equal(a.alpha, b.alpha)
        np.testing.assert_array_equal(a.beta, b.beta)
    for key in ("lambda_max", "lambda_min", "trace", "negative_mass", "negative_mass_below_zero"):
        assert d["summary"][key] == back.summary()[key]


def test_resume_probe_by_probe(H):
    """slq(runs=first_k) computes only the missing probes and equals the uninterrupted run."""
    full = hs.slq(H, 5, 4, seed=3)
    seen = []
    part = hs.slq(H, 5, 4, seed=3, runs=full.runs[:2], on_probe=lambda s, d: seen.append(s))
    assert seen == [2, 3]
    np.testing.assert_array_equal(part.nodes, full.nodes)


def test_breakdown_probes_are_padded():
    """A probe that broke down early (3 distinct eigenvalues: 3 of 8 steps) is padded with
    zero-weight nodes next to a full-length one, so nodes/weights stay rectangular, rows still
    sum to 1, and its moments are unchanged (still exact: vᵀ H v for its unit probe)."""
    H3 = known_spectrum_matrix(np.repeat([-1.0, 0.5, 3.0], 10), seed=2)
    short = hs.lanczos(H3, 8, seed=0)
    long = hs.lanczos(known_spectrum_matrix(np.linspace(-1, 3, 30), seed=2), 8, seed=1)
    assert short.breakdown and short.num_steps == 3 and long.num_steps == 8
    dens = hs.SpectralDensity([short, long], 30)
    assert dens.nodes.shape == (2, 8) and dens.weights.shape == (2, 8)
    np.testing.assert_array_equal(dens.weights[0, 3:], 0.0)
    np.testing.assert_allclose(dens.weights.sum(axis=1), 1.0, atol=1e-13)
    (z,) = hs.random_probe(hs.as_operator(H3), 0, dtype=torch.float64)
    m1 = float(z @ H3 @ z / (z @ z))
    assert np.sum(dens.weights[0] * dens.nodes[0]) == pytest.approx(m1, rel=1e-12)


def test_summary_headline_negative_mass_ignores_the_near_zero_bulk():
    """Issue 13 item 5: on a spectrum with 85% of its eigenvalues at −1e-8 (a near-zero bulk), 10%
    in [−5, −1] and 5% in [1, 10], the summary's headline ``negative_mass`` is the mass below
    −1e-3·max(|λ_max|, |λ_min|) and estimates the true 0.10 within 4 standard errors over 20
    probes, while ``negative_mass_below_zero`` (the raw mass of nodes < 0, the old headline)
    counts the bulk, whose node 40 steps resolve at −1e-8 (≥ 0.5); the threshold is reported."""
    eigs = np.concatenate(
        [np.full(340, -1e-8), np.linspace(-5.0, -1.0, 40), np.linspace(1.0, 10.0, 20)]
    )
    dens = hs.slq(known_spectrum_matrix(eigs, seed=4), 40, 20, seed=0)
    s = dens.summary()
    thr = hs.density.NEGATIVE_MASS_REL_TOL * max(abs(dens.lambda_max), abs(dens.lambda_min))
    assert s["negative_mass_threshold"] == thr and 9.9e-3 < thr < 1.01e-2
    per = np.sum(dens.weights * (dens.nodes < -thr), axis=1)
    se = per.std(ddof=1) / math.sqrt(len(per))
    assert abs(s["negative_mass"] - 0.10) <= 4 * se
    assert s["negative_mass"] == dens.negative_mass(threshold=thr)
    assert s["negative_mass_below_zero"] == dens.negative_mass() >= 0.5


@pytest.mark.parametrize(
    "d, exc, match",
    [
        ({}, ValueError, r"missing.*'num_params'.*'runs'|missing.*'runs'.*'num_params'"),
        ({"runs": [], "num_params": 3}, ValueError, "at least one probe"),
        ({"runs": "x", "num_params": 3}, TypeError, "'runs' must be a list"),
        ({"runs": [{}], "num_params": 3}, ValueError, r"runs\[0\].*missing.*'alpha'"),
        ({"runs": [{"alpha": [1.0], "beta": []}], "num_params": "n"}, ValueError, "num_params"),
        ([1, 2], TypeError, "expected a dict"),
    ],
)
def test_from_dict_malformed_is_a_clear_error(d, exc, match):
    """Issue 13 item 12: SpectralDensity.from_dict on a malformed dict (missing keys, wrong types)
    raises a ValueError/TypeError naming what is missing or wrong, never a bare KeyError."""
    with pytest.raises(exc, match=match):
        hs.SpectralDensity.from_dict(d)
