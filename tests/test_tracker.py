"""CurvatureTracker: it never changes training, its λ_max agrees with a cold converged
``top_eigenvalues``, it catches an eigenvalue crossing, and its state round-trips."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hessian_spectra import CurvatureTracker, top_eigenvalues
from hessian_spectra.operators import HessianOperator
from hessian_spectra.testing import dense_hessian, make_problem, mse_loss


class DropMLP(nn.Module):
    """4 -> 8 -> 3 with tanh and dropout (training draws from the global RNG)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def _data(seed=1, n=4):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(6, 4, generator=g, dtype=torch.float64),
            torch.randn(6, 3, generator=g, dtype=torch.float64),
        )
        for _ in range(n)
    ]


def _train(tracker, steps=25, opt="adam", check=None):
    """Train DropMLP with the global RNG (dropout, random batch choice); the tracker measures
    after each optimizer step, before zero_grad (so .grad is live)."""
    torch.manual_seed(0)
    model = DropMLP().double().train()
    data = _data()
    o = (
        torch.optim.Adam(model.parameters(), lr=0.05)
        if opt == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    logs = []
    for step in range(1, steps + 1):
        b = data[int(torch.randint(0, len(data), (1,)))]
        loss, _ = mse_loss(model, b)
        loss.backward()
        o.step()
        if tracker is not None:
            before = (
                copy.deepcopy(o.state_dict()),
                [p.grad.clone() for p in model.parameters()],
                [p.grad for p in model.parameters()],
                torch.get_rng_state(),
            )
            m = tracker.step(model, step, optimizer=o)
            if m is not None:
                logs.append(m)
                if check is not None:
                    check(model, m)
            after = o.state_dict()
            assert model.training and all(mod.training for mod in model.modules())
            assert torch.equal(torch.get_rng_state(), before[3])
            for g0, g_obj, p in zip(before[1], before[2], model.parameters()):
                assert p.grad is g_obj and torch.equal(p.grad, g0)
            for s0, s1 in zip(before[0]["state"].values(), after["state"].values()):
                for key in s0:
                    assert torch.equal(torch.as_tensor(s0[key]), torch.as_tensor(s1[key]))
        o.zero_grad()
    return model, logs


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_training_is_bit_identical_with_and_without_the_tracker(opt):
    """Training with a tracker measuring every 5 steps (dropout model in train mode, global-RNG
    batch choice, Adam or SGD with momentum) gives bit-identical weights to training without;
    after each measurement the mode, RNG state, .grad (same tensor objects, same values) and
    optimizer state are as before, and no autograd graph is kept."""
    loss_fn = mse_loss
    tracker = CurvatureTracker(
        loss_fn, _data(seed=5, n=2), every_n_steps=5, k=2, method="exact", cold_every=3
    )
    with_t, logs = _train(tracker, opt=opt)
    without, _ = _train(None, opt=opt)
    assert len(logs) == 5
    # no autograd graph survives: the kept vectors and the logged numbers hold none
    assert all(t.grad_fn is None and not t.requires_grad for v in tracker.vectors for t in v)
    assert all(isinstance(x, (int, float, bool, str, type(None), list)) for x in logs[-1].values())
    for a, b in zip(with_t.parameters(), without.parameters()):
        assert torch.equal(a, b)


def test_every_logged_lambda_max_matches_a_cold_converged_run():
    """Every logged λ_max (and 2nd eigenvalue) is within tol·|λ_max| of a cold, fully converged
    ``top_eigenvalues`` (P steps: the whole Krylov space) at the same weights, warm or cold; the
    logged fields are present and warm measurements happen."""
    probe = _data(seed=5, n=2)
    tol = 1e-3
    tracker = CurvatureTracker(
        mse_loss, probe, every_n_steps=2, k=2, method="exact", tol=tol, cold_every=4
    )
    seen = []

    def check(model, m):
        op = HessianOperator(model, mse_loss, probe, method="exact")
        ref = top_eigenvalues(op, 2, num_steps=op.num_params).eigenvalues
        assert abs(m["lambda_max"] - ref[0]) <= tol * abs(ref[0])
        assert abs(m["eigenvalues"][1] - ref[1]) <= tol * abs(ref[0])
        assert m["converged"] and max(m["residuals"]) <= tol * abs(m["lambda_max"])
        assert m["two_over_lr"] == pytest.approx(2 / 0.1)
        assert m["stability_threshold"] == pytest.approx((2 + 2 * 0.9) / 0.1)  # heavy ball
        seen.append(m["warm"])

    _train(tracker, steps=30, opt="sgd", check=check)
    assert len(seen) == 15 and sum(seen) >= 8 and not seen[0]
    keys = {
        "step",
        "lambda_max",
        "eigenvalues",
        "residuals",
        "converged",
        "matvecs",
        "seconds",
        "warm",
        "restarts",
        "cold_reason",
        "lr",
        "two_over_lr",
        "stability_threshold",
    }
    assert keys <= set(tracker.history[-1])


class Quadratic(nn.Module):
    """loss = ½ Σ h_i θ_i²: Hessian diag(h), with h a buffer the test changes."""

    def __init__(self, h):
        super().__init__()
        self.theta = nn.Parameter(torch.ones(len(h), dtype=torch.float64))
        self.register_buffer("h", torch.tensor(h, dtype=torch.float64))


def _quad_loss(model, batch):
    return 0.5 * (model.h * model.theta**2).sum()


def test_a_crossing_eigenvalue_is_caught_by_the_warm_start():
    """When a new eigenvalue rises past the tracked one and the old top eigenvector stays an
    exact eigenvector, a warm start from it alone would stop at the stale value (a Lanczos
    breakdown); the random part of the warm start finds the new λ_max, and with
    ``warm_noise=0`` the stale value is what comes back (the failure this guards against)."""
    h = np.linspace(0.1, 1.0, 12)
    h[0] = 5.0
    for noise, expect in ((1e-2, 6.0), (0.0, 5.0)):
        model = Quadratic(h.copy())
        tr = CurvatureTracker(
            _quad_loss, [None], every_n_steps=1, cold_every=0, warm_noise=noise, tol=1e-6
        )
        assert tr.step(model, 1)["lambda_max"] == pytest.approx(5.0, rel=1e-9)
        model.h[3] = 6.0
        m = tr.step(model, 2)
        assert m["warm"]
        assert m["lambda_max"] == pytest.approx(expect, rel=1e-6)


def test_unconverged_warm_run_falls_back_to_cold():
    """A warm run that does not converge within ``max_matvecs`` is redone from a random start
    and says so (``warm`` False, ``cold_reason``), its matvecs counting both attempts."""
    model, loss_fn, batches = make_problem("mlp")
    tr = CurvatureTracker(
        loss_fn,
        batches,
        every_n_steps=1,
        cold_every=0,
        chunk=2,
        max_matvecs=4,
        tol=1e-12,
        method="exact",
    )
    tr.step(model, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    m = tr.step(model, 2)
    assert not m["warm"] and m["cold_reason"] == "warm run not converged"
    assert m["matvecs"] == 8 and not m["converged"]


def test_state_dict_round_trip_resumes_warm():
    """A tracker restored from ``state_dict()`` continues warm and logs the same numbers as the
    tracker it was saved from."""
    model, loss_fn, batches = make_problem("mlp")
    a = CurvatureTracker(loss_fn, batches, every_n_steps=1, cold_every=0, method="exact", k=2)
    a.step(model, 1)
    b = CurvatureTracker(loss_fn, batches, every_n_steps=1, cold_every=0, method="exact", k=2)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        model.fc1.weight.add_(0.01)
    ma, mb = a.step(model, 2), b.step(model, 2)
    assert mb["warm"] and mb["eigenvalues"] == ma["eigenvalues"] and mb["matvecs"] == ma["matvecs"]
    assert len(b.history) == 2
    with pytest.raises(TypeError):
        b.load_state_dict([1, 2])


def test_preconditioned_matches_dense_adam_preconditioned_hessian():
    """``preconditioned=True`` logs λ_max of P^{-1/2} H P^{-1/2}, P = sqrt(v̂) + eps from Adam's
    state, against the dense float64 matrix, and Adam's threshold (2 + 2β₁)/((1 − β₁) lr)."""
    model, loss_fn, batches = make_problem("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99))
    for b in batches:
        loss_fn(model, b)[0].backward()
        opt.step()
        opt.zero_grad()
    H = dense_hessian(model, loss_fn, batches)
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    d = (v / (1 - 0.99**3)).sqrt().add(1e-8).rsqrt()
    ref = torch.linalg.eigvalsh(d[:, None] * H * d[None, :])[-1].item()
    tr = CurvatureTracker(loss_fn, batches, every_n_steps=1, preconditioned=True, tol=1e-6)
    m = tr.step(model, 1, optimizer=opt)
    assert m["lambda_max"] == pytest.approx(ref, rel=1e-6)
    assert m["stability_threshold"] == pytest.approx(38 / 0.01)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        tr.step(model, 2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_trace_and_density_at_multiples_of_the_cadence():
    """``trace_every=2`` adds a trace on measurements 0, 2, … within 4 standard errors of the
    dense trace; ``density_every`` adds SLQ nodes and weights (each probe's sum to 1)."""
    model, loss_fn, batches = make_problem("mlp")
    true = torch.trace(dense_hessian(model, loss_fn, batches)).item()
    tr = CurvatureTracker(
        loss_fn,
        batches,
        every_n_steps=1,
        trace_every=2,
        trace_matvecs=40,
        density_every=3,
        density_steps=10,
    )
    ms = [tr.step(model, s) for s in range(1, 5)]
    assert ["trace" in m for m in ms] == [True, False, True, False]
    assert ["density" in m for m in ms] == [True, False, False, True]
    for m in ms[::2]:
        assert abs(m["trace"] - true) <= 4 * m["trace_std_error"] + 1e-9 * abs(true)
    assert np.allclose(np.sum(ms[0]["density"]["weights"], axis=-1), 1.0)


@pytest.mark.parametrize(
    "kw,exc",
    [
        ({"every_n_steps": 0}, ValueError),
        ({"tol": 2.0}, ValueError),
        ({"cold_every": -1}, ValueError),
        ({"k": 0}, ValueError),
    ],
)
def test_bad_arguments_are_refused(kw, exc):
    """Nonsensical settings raise with the argument's name."""
    _, loss_fn, batches = make_problem("mlp")
    with pytest.raises(exc, match=next(iter(kw))):
        CurvatureTracker(loss_fn, batches, **kw)


def test_lanczos_callback_returning_true_stops_the_run():
    """``lanczos(..., callback=...)`` returning True after step j gives the same tridiagonal,
    residual and flags as a run of ``num_steps=j + 1`` (the tracker's stopping rule)."""
    from hessian_spectra import DenseOperator, lanczos
    from hessian_spectra.testing import known_spectrum_matrix

    op = DenseOperator(known_spectrum_matrix(torch.linspace(-1, 3, 30, dtype=torch.float64)))
    stopped = lanczos(op, 20, seed=3, callback=lambda j, a, b: j == 6)
    short = lanczos(op, 7, seed=3)
    assert stopped.num_steps == 7 and not stopped.breakdown
    assert np.array_equal(stopped.alpha, short.alpha) and np.array_equal(stopped.beta, short.beta)
    assert stopped.residual_beta == short.residual_beta
    assert lanczos(op, 20, seed=3, callback=lambda j, a, b: None).num_steps == 20
