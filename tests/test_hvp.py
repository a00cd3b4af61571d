"""The three HVP backends (fd, exact, jvp) against dense float64 Hessians, and what they promise
about the user's state.

Ground truth: ``hessian_spectra.testing.dense_hessian`` = ``torch.autograd.functional.hessian``
of the flat, weighted, dataset-averaged loss (reverse over reverse). Vectors are compared in
relative 2-norm: ``||Hv_op − H v|| / ||H v||``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessian_spectra as hs
from conftest import dense_hessian, flatten, make_problem, problem_with_hessian, unflatten

METHODS = ("fd", "exact", "jvp")
KINDS = (
    "mlp",
    "plain",
    "cnn",
    "transformer",
    "transformer2",
    "hf-gpt2-eager",
    "hf-gpt2-sdpa",
    "hf-llama-eager",
    "hf-llama-sdpa",
)

# float64 tolerances (relative 2-norm error of H v). Measured: exact/jvp ≤ 1e-15, fd ≤ 2e-10
# on every model except Llama, whose RMSNorm and rotary embeddings compute in float32 inside
# transformers even for a float64 model (exact/jvp ~8e-8; fd needs a float32-sized step, 7e-3
# with the float64 default step, ~5e-5 with the float32 one).
TOL64 = {"exact": 1e-8, "jvp": 1e-8, "fd": 1e-6}
TOL64_LLAMA = {"exact": 1e-6, "jvp": 1e-6, "fd": 1e-3}
# float32 model against the float64 Hessian. Measured: exact/jvp ≤ 6e-7, fd ≤ 2.5e-4.
TOL32 = {"exact": 1e-5, "jvp": 1e-5, "fd": 2e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _direction(P: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _to_dtype(model, batches, dtype):
    m = copy.deepcopy(model).to(dtype)
    bs = [
        tuple(x.to(dtype) if x.is_floating_point() else x for x in b) if isinstance(b, tuple) else b
        for b in batches
    ]
    return m, bs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_matvec_equals_dense_hessian_float64(kind, method):
    """In float64, op.matvec(v) == H @ v of the dense reference Hessian, for every method, on an
    MLP, a CNN, 1- and 2-layer causal transformers (LayerNorm + SDPA attention) and tiny Hugging
    Face GPT-2 / Llama models built from configs with eager and SDPA attention; batches have
    unequal sizes and loss_fn returns (loss, weight) (``plain``: a bare scalar on equal batches,
    weight 1)."""
    m, loss_fn, batches, H = problem_with_hessian(kind)
    op = hs.HessianOperator(m, loss_fn, batches, method=method)
    v = _direction(H.shape[0])
    vv = unflatten(v, op.params)
    tol = TOL64_LLAMA if "llama" in kind else TOL64
    eps = None
    if "llama" in kind and method == "fd":  # float32 arithmetic inside: use the float32 step
        eps = (
            hs.default_eps_scale(torch.float32)
            * hs.norm([p.detach() for p in op.params])
            / hs.norm(vv)
        )
    hv = flatten(op.matvec(vv, eps=eps))
    assert _rel(hv, H @ v) <= tol[method], f"{kind}/{method}: {_rel(hv, H @ v):.2e}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer2", "hf-gpt2-sdpa", "hf-llama-sdpa"])
def test_matvec_float32_close_to_float64_hessian(kind, method):
    """A float32 copy of the model gives H v within the stated float32 tolerance of the float64
    dense Hessian (exact/jvp 1e-5, fd 2e-3 relative), and returns float32 vectors."""
    m64, loss_fn, batches, H = problem_with_hessian(kind)
    m, bs = _to_dtype(m64, batches, torch.float32)
    op = hs.HessianOperator(m, loss_fn, bs, method=method)
    v = _direction(H.shape[0])
    out = op.matvec(unflatten(v, op.params))
    assert all(t.dtype == torch.float32 for t in out)
    err = _rel(flatten(out), H @ v)
    assert err <= TOL32[method], f"{kind}/{method}: {err:.2e}"


@pytest.mark.parametrize("method", METHODS)
def test_symmetry(method):
    """u·Hv == v·Hu for random u, v (exact/jvp to 1e-12 relative to ||u||·||Hv||; fd to 1e-8)."""
    m, loss_fn, batches, _ = problem_with_hessian("transformer")
    op = hs.HessianOperator(m, loss_fn, batches, method=method)
    u, v = hs.random_probe(op, 1, kind="gaussian"), hs.random_probe(op, 2, kind="gaussian")
    Hu, Hv = op @ u, op @ v
    a, b = hs.dot(u, Hv), hs.dot(v, Hu)
    scale = hs.norm(u) * hs.norm(Hv)
    assert abs(a - b) <= (1e-8 if method == "fd" else 1e-12) * scale


class _W(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)


@pytest.mark.parametrize("method", METHODS)
def test_loss_linear_in_params_gives_zero_hvp(method):
    """A loss linear in θ (its gradient does not depend on θ) has H = 0: every method returns an
    exact zero vector (up to fd rounding) instead of failing on a gradient with no graph."""
    m = _W(torch.ones(4, dtype=torch.float64))
    op = hs.HessianOperator(
        m,
        lambda model, b: (model.w * b).sum(),
        [torch.arange(4.0, dtype=torch.float64)],
        method=method,
    )
    (hv,) = op.matvec(hs.random_probe(op, kind="gaussian"))
    assert float(hv.abs().max()) <= (1e-6 if method == "fd" else 0.0)


# --------------------------------------------------------------------------- jvp fallback (13.9)
def _mse_mean(model, b):
    return F.mse_loss(model(b[0]), b[1]), b[0].shape[0]


def test_jvp_on_mse_loss_mean_falls_back_to_exact_with_a_warning():
    """F.mse_loss(reduction='mean') breaks torch.func forward-over-reverse on torch 2.13
    ("ZeroTensors are immutable"). method='jvp' then warns, naming the op and what works instead,
    and returns the exact product: equal to the dense Hessian's H v (1e-12); later products use
    exact without warning again, and effective_method says so. Where PyTorch has fixed the bug,
    jvp runs itself and must give the same H v."""
    m, _, batches = make_problem("mlp")
    H = dense_hessian(m, _mse_mean, batches)
    op = hs.HessianOperator(m, _mse_mean, batches, method="jvp")
    v = _direction(H.shape[0])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        hv = flatten(op.matvec(unflatten(v, op.params)))
    assert _rel(hv, H @ v) < 1e-12
    fell_back = [x for x in w if "Falling back to method='exact'" in str(x.message)]
    broken = op.effective_method == "exact"
    assert bool(fell_back) == broken, [str(x.message) for x in w]
    if broken:
        msg = str(fell_back[0].message)
        assert "ZeroTensors are immutable" in msg and "reduction='mean'" in msg
        assert "reduction='sum'" in msg  # what works instead
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            hv2 = flatten(op.matvec(unflatten(v, op.params)))
        assert _rel(hv2, H @ v) < 1e-12
    assert op.method == "jvp"


def test_jvp_through_a_train_mode_batchnorm_falls_back_to_exact():
    """A train-mode batch norm updates its running statistics in place, which torch.func
    forward-over-reverse refuses; method='jvp' warns and falls back to exact, whose product equals
    the per-batch dense train-mode Hessian."""
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randn(n, 2, generator=g, dtype=torch.float64),
        )
        for n in (5, 7)
    ]
    loss = lambda model, b: (((model(b[0]) - b[1]) ** 2).mean(), b[0].shape[0])
    m.train()
    H = dense_hessian(m, loss, batches, how="autograd-loop")
    op = hs.HessianOperator(m, loss, batches, method="jvp", train_mode=True)
    v = _direction(H.shape[0])
    with pytest.warns(UserWarning, match="in place.*Falling back to method='exact'"):
        hv = flatten(op @ unflatten(v, op.params))
    assert _rel(hv, H @ v) < 1e-12


# --------------------------------------------------------------------------- the user's state
def _snapshot(model):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [m.training for m in model.modules()],
        [b.detach().clone() for b in model.buffers()],
    )


def _assert_unchanged(model, snap):
    params, grads, modes, bufs = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q), "a parameter changed"
    for p, g in zip(model.parameters(), grads):
        if g is None:
            assert p.grad is None, "a .grad appeared"
        else:
            assert p.grad is not None and torch.equal(p.grad, g), "a user's .grad changed"
    assert [m.training for m in model.modules()] == modes, "module train/eval modes changed"
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), bufs)), "a buffer changed"


def _with_user_grads(model):
    """Give every parameter but one a pre-existing .grad (as a user mid-training would)."""
    g = torch.Generator().manual_seed(5)
    params = list(model.parameters())
    for p in params[:-1]:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    model.train()  # the user's mode; the operator works in eval mode and must give it back
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_params_and_grads_bit_identical(method, dtype):
    """After matvecs (and gradient()) of every method, every parameter, every user's .grad (and
    the absence of one) and every module's train flag are bit-identical (torch.equal)."""
    m, loss_fn, batches = make_problem("transformer", dtype=dtype)
    _with_user_grads(m)
    snap = _snapshot(m)
    op = hs.HessianOperator(m, loss_fn, batches, method=method)
    for s in range(2):
        op.matvec(hs.random_probe(op, s, kind="gaussian"))
    op.gradient()
    _assert_unchanged(m, snap)


def test_subset_operator_leaves_other_params_grads_alone():
    """With params=subset, parameters outside the subset keep their .grad (or None) too."""
    m, loss_fn, batches = make_problem("mlp")
    _with_user_grads(m)
    snap = _snapshot(m)
    op = hs.HessianOperator(m, loss_fn, batches, method="fd", params=["fc1.weight"])
    op.matvec(hs.random_probe(op))
    op.gradient()
    _assert_unchanged(m, snap)


class _Boom(Exception):
    pass


def _failing_loss(loss_fn, fail_at: int, exc):
    calls = {"n": 0}

    def f(model, batch):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise exc
        return loss_fn(model, batch)

    return f, calls


@pytest.mark.parametrize(
    "exc", [_Boom("loss_fn failed"), KeyboardInterrupt()], ids=["raises", "interrupt"]
)
@pytest.mark.parametrize("method", METHODS)
def test_state_restored_when_loss_fn_fails_mid_matvec(method, exc):
    """When loss_fn raises (or the user hits Ctrl-C) in the middle of a matvec, e.g. on the
    second FD pass (θ−εv) or in gradient(), parameters and users' .grad are still bit-identical
    and the exception reaches the caller unchanged."""
    m, loss_fn, batches = make_problem("mlp")
    _with_user_grads(m)
    snap = _snapshot(m)
    nb = len(batches)
    # calls: 2 for the first-use determinism check, then nb per pass; fail in fd's 2nd pass
    # (θ−εv), in the one pass of exact/jvp on its 2nd batch
    f, _ = _failing_loss(loss_fn, 2 + nb + 2 if method == "fd" else 2 + 2, exc)
    op = hs.HessianOperator(m, f, batches, method=method)
    with pytest.raises(type(exc)):
        op.matvec(hs.random_probe(op))
    _assert_unchanged(m, snap)
    # gradient(): fail on its second batch
    f, _ = _failing_loss(loss_fn, 2 + 2, exc)
    op = hs.HessianOperator(m, f, batches, method=method)
    with pytest.raises(type(exc)):
        op.gradient()
    _assert_unchanged(m, snap)


def test_nan_mid_pass_restores_state():
    """A NaN loss on the θ−εv pass raises FloatingPointError and leaves the parameters as they
    were."""
    m, loss_fn, batches = make_problem("mlp")
    snap = _snapshot(m)
    calls = {"n": 0}

    def f(model, b):
        calls["n"] += 1
        loss, w = loss_fn(model, b)
        return (loss * float("nan"), w) if calls["n"] == 2 + len(batches) + 1 else (loss, w)

    op = hs.HessianOperator(m, f, batches, method="fd")
    with pytest.raises(FloatingPointError, match="batch 0"):
        op.matvec(hs.random_probe(op))
    _assert_unchanged(m, snap)


# ---------------------------------------------------------------- fd buffers and the even part
def _wide_mlp():
    """float64 MLP 40 → 64 → 8 (tensors of 2560 and 512 entries), 3 weighted batches."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 8)).double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(n, 40, generator=g, dtype=torch.float64),
            torch.randint(0, 8, (n,), generator=g),
        )
        for n in (6, 9, 5)
    ]

    def loss_fn(model, b):
        x, y = b
        return F.cross_entropy(model(x), y), y.numel()

    return m, loss_fn, batches


def test_fd_buffers_reused_across_products():
    """The snapshot and the even-part samples are allocated once per operator: the same storage
    on the second and third product (no parameter-sized allocation per product but the result),
    and the parameters are bit-for-bit restored from it."""
    m, loss_fn, batches = make_problem("transformer")
    before = [p.detach().clone() for p in m.parameters()]
    op = hs.HessianOperator(m, loss_fn, batches)
    op.matvec(hs.random_probe(op, 0))
    bufs = op.fd_buffers

    def ptrs():
        return [t.data_ptr() for t in bufs.snapshot + [bufs.g0_sample, bufs.plus_sample]]

    first = ptrs()
    for s in (1, 2):
        op.matvec(hs.random_probe(op, s))
        assert ptrs() == first
    assert all(torch.equal(p.detach(), q) for p, q in zip(m.parameters(), before))
    # held: one parameter copy and two samples (float64 model: 8 bytes an entry)
    P = sum(p.numel() * p.element_size() for p in op.params)
    n = bufs.g0_sample.numel()
    assert bufs.nbytes() == P + 2 * 8 * n
    assert n == sum(
        p.numel() if p.numel() <= 4096 else len(range(0, p.numel(), 31)) for p in op.params
    )


@pytest.mark.parametrize("sampled", [False, True], ids=["whole", "sampled"])
def test_even_part_against_its_definition(sampled, monkeypatch):
    """``info["d2"]`` against ``||∇L(θ+εv) + ∇L(θ−εv) − 2∇L(θ)||`` from three gradients at
    moved parameters (float64): equal when every entry is read; within 25% when the tensors are
    sampled (every 31st entry: 83 and 17 entries of the two weights)."""
    from hessian_spectra import hvp as hvp_mod

    monkeypatch.setattr(hvp_mod, "EVEN_FULL", 100 if sampled else 10**6)
    m, loss_fn, batches = _wide_mlp()
    op = hs.HessianOperator(m, loss_fn, batches)
    v = hs.random_probe(op, 3, kind="gaussian")
    eps = 1e-2  # large: the even part is far above rounding
    info = {}
    g0 = op.gradient()[1]
    hvp_mod.hvp_fd(op.objective, v, eps, g0=g0, info=info, buffers=hvp_mod.FDBuffers())
    grads = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, t in zip(op.params, v):
                p.add_(t, alpha=sign * eps)
        grads.append(op.gradient()[1])
        with torch.no_grad():
            for p, t in zip(op.params, v):
                p.sub_(t, alpha=sign * eps)
    ref = hs.norm([a + b - 2 * c for a, b, c in zip(*grads, g0)])
    rel = abs(info["d2"] - ref) / ref
    assert rel < (0.25 if sampled else 1e-6), (info["d2"], ref)
    if sampled:
        assert rel > 0  # the sample is not the whole vector


def test_fd_product_repeatable():
    """The same v gives the same product, bit for bit, whatever came before it (the step is a
    function of v): a Lanczos run resumed from a checkpoint reproduces the uninterrupted one."""
    m, loss_fn, batches = make_problem("transformer", dtype=torch.float32)
    op = hs.HessianOperator(m, loss_fn, batches)
    v, w = hs.random_probe(op, 0), hs.random_probe(op, 1, kind="gaussian")
    first = op.matvec(v)
    op.matvec(w)
    again = op.matvec(v)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def _rel(a, b):
    return hs.norm([x - y for x, y in zip(a, b)]) / hs.norm(b)


@pytest.mark.parametrize("how", ["in-place", "p.data"])
def test_fd_step_follows_an_in_place_change_of_the_parameters(how):
    """θ's norms and the sample of ∇L(θ) are cached between products; an in-place change of a
    parameter (``optimizer.step()``-like, version counter bumped; or through ``p.data``, which
    bumps none, unannounced) between products must be seen: the next step is c / κ(v) with the
    new norms, the product is the Hessian at the new θ (dense float64 ground truth) and its
    estimate is again within 3× of its true error."""
    m, loss_fn, batches = make_problem("mlp")
    op = hs.HessianOperator(m, loss_fn, batches)
    v = hs.random_probe(op, 0)
    op.matvec(v)
    grads0 = op.stats["fd_calibration_gradients"]
    first = op.last_fd_error_estimate.eps
    th0 = op.objective.theta_norms()
    i = max(range(len(th0)), key=lambda j: v[j].norm().item() / th0[j])
    with torch.no_grad():
        if how == "in-place":
            op.params[i].mul_(3.0)  # the tensor that sets κ(v)
        else:
            op.params[i].data.mul_(3.0)
    hv = op.matvec(v)
    th = [p.detach().norm().item() for p in op.params]
    assert op.objective.theta_norms() == pytest.approx(th, rel=1e-12)
    est = op.last_fd_error_estimate
    assert est.eps == pytest.approx(op.fd_model.scale / hs.fd_step.perturbation_scale(v, th))
    assert est.eps != first
    # the gradient sample was taken again at the new θ (one pass)
    assert op.stats["fd_calibration_gradients"] == grads0 + 1
    H = dense_hessian(m, loss_fn, batches)
    ref = unflatten(H @ flatten(v), op.params)
    err = _rel(hv, ref)
    assert err < 1e-6
    assert err / 3 <= est.rel_error <= 3 * err, (est, err)  # a stale ∇L(θ) sample: ~1e3×


def test_fd_caches_survive_another_operators_products():
    """Another operator's fd products on the same model move the parameters' version counters
    but restore their values bit for bit: the caches stay (no new gradient pass) and the
    products are bit-for-bit the ones before. ``params_changed()`` (for writes through
    ``p.data``, which bump no counter) makes the next product compare θ with its snapshot."""
    m, loss_fn, batches = make_problem("transformer", dtype=torch.float32)
    op = hs.HessianOperator(m, loss_fn, batches)
    other = hs.HessianOperator(m, loss_fn, batches, fd_calibration=False)
    v = hs.random_probe(op, 0)
    first = op.matvec(v)
    grads0 = op.stats["fd_calibration_gradients"]
    other.matvec(v)
    again = op.matvec(v)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert op.stats["fd_calibration_gradients"] == grads0
    # params_changed() with the values as they were: found equal to the snapshot, caches kept
    op.objective.params_changed()
    assert all(torch.equal(a, b) for a, b in zip(first, op.matvec(v)))
    assert op.stats["fd_calibration_gradients"] == grads0
    # a write through .data (no version counter moves) announced by params_changed()
    p = op.params[0]
    with torch.no_grad():
        p.data.mul_(2.0)
    op.objective.params_changed()
    op.matvec(v)
    assert op.stats["fd_calibration_gradients"] == grads0 + 1  # ∇L(θ) sampled again
    assert op.objective.theta_norms()[0] == pytest.approx(p.detach().norm().item(), rel=1e-6)
