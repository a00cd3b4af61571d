"""Parameter-space vectors: reductions in float64, in-place helpers, seeded probes."""

from __future__ import annotations

import math

import pytest
import torch

import hessian_spectra as hs
from hessian_spectra.vectors import check_vector


def _params():
    return [torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, 2, 2, dtype=torch.float64)]


# the documented accuracy of a dot with float32 (or lower) operands: 2^-16 · Σ|u_i v_i|
DOT_TOL = 2.0**-16


def test_dot_and_norm_equal_flat_float64():
    """dot/norm equal the flat float64 inner product / 2-norm within the documented accuracy
    (float32 blocks summed in float64: 2^-16 · Σ|u_i v_i|), also for mixed dtypes; float64
    parts are exact to rounding."""
    g = torch.Generator().manual_seed(0)
    u = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in _params()]
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in _params()]
    fu = torch.cat([t.double().reshape(-1) for t in u])
    fv = torch.cat([t.double().reshape(-1) for t in v])
    scale_uv = float((fu * fv).abs().sum())
    assert abs(hs.dot(u, v) - float(fu @ fv)) <= DOT_TOL * scale_uv
    assert hs.norm(u) == pytest.approx(float(fu.norm()), rel=DOT_TOL)
    d = hs.dots([u, v], v)
    assert d.dtype == torch.float64 and d.shape == (2,)
    assert float(d[1]) == pytest.approx(float(fv @ fv), rel=DOT_TOL)
    u64 = [t.double() for t in u]
    assert hs.dot(u64, u64) == pytest.approx(float(fu @ fu), rel=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dot_accuracy_on_1e8_entries(dtype):
    """On 1e8 entries (float32, and bfloat16 against a float32 vector, as in a bf16 basis) the
    dot's error against a float64 reference stays within the documented 2^-16 · Σ|u_i v_i|,
    for a well-conditioned dot (u ≈ v: the bound is relative to the value) and an
    ill-conditioned one (independent u, v: the value is ~1e-4 of Σ|u_i v_i|)."""
    n = 100_000_000
    g = torch.Generator().manual_seed(1)
    u = torch.rand(n, generator=g).to(dtype)
    v = u.float() + 0.1 * torch.rand(n, generator=g)  # u·v ≈ Σ|u_i v_i|: a relative bound
    z = torch.randn(n, generator=g)  # u·z ≈ 1e-4 Σ|u_i z_i|
    for b in (v, z):
        ref = sum(
            float(torch.dot(x.double(), y.double()))
            for x, y in zip(u.split(1 << 22), b.split(1 << 22))
        )
        ref_abs = sum(
            float(torch.dot(x.double().abs(), y.double().abs()))
            for x, y in zip(u.split(1 << 22), b.split(1 << 22))
        )
        err = abs(hs.dot([u], [b]) - ref)
        assert err <= DOT_TOL * ref_abs, (err / ref_abs, dtype)


def test_dot_accumulates_in_float64():
    """A float32 vector's dot is accumulated in float64: 1e7 ones + 1 is counted exactly."""
    u = [torch.ones(10_000_001, dtype=torch.float32)]
    assert hs.dot(u, u) == 10_000_001.0


def test_axpy_scale_lincomb_add_sub():
    """axpy/scale work in place and return their argument; add/sub/lincomb return new vectors."""
    x = [torch.ones(2), torch.full((3,), 2.0)]
    y = [torch.zeros(2), torch.ones(3)]
    out = hs.axpy(3.0, x, y)
    assert (
        out is y
        and torch.equal(y[0], torch.full((2,), 3.0))
        and torch.equal(y[1], torch.full((3,), 7.0))
    )
    z = hs.scale(0.5, y)
    assert z is y and torch.equal(y[1], torch.full((3,), 3.5))
    s = hs.add(x, x)
    assert torch.equal(s[1], torch.full((3,), 4.0)) and torch.equal(x[1], torch.full((3,), 2.0))
    assert torch.equal(hs.sub(x, x)[0], torch.zeros(2))
    lc = hs.lincomb([1.0, -2.0], [x, x], dtype=torch.float64)
    assert lc[0].dtype == torch.float64 and torch.equal(
        lc[1], torch.full((3,), -2.0, dtype=torch.float64)
    )
    c = hs.clone(x, dtype=torch.bfloat16)
    assert c[0].dtype == torch.bfloat16 and c[0].data_ptr() != x[0].data_ptr()
    assert all(torch.equal(t, torch.zeros_like(p)) for t, p in zip(hs.zeros_like(x), x))


def test_same_seed_same_probe_and_different_seed_different_probe():
    """random_probe is a pure function of (seed, parameter names): same seed -> identical probe,
    another seed -> another probe."""
    ps = _params()
    a, b = hs.random_probe(ps, 7), hs.random_probe(ps, 7)
    c = hs.random_probe(ps, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_rademacher_entries_are_pm1():
    """Rademacher probes have entries exactly ±1, both signs about equally often (±4 SE)."""
    ps = [torch.zeros(200, 50)]
    (z,) = hs.random_probe(ps, 0)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    n = z.numel()
    assert abs(float(z.sum())) <= 4 * math.sqrt(n)


def test_gaussian_moments():
    """Gaussian probes: mean 0 and variance 1 within 5 standard errors over 10^5 entries."""
    ps = [torch.zeros(100_000, dtype=torch.float64)]
    (z,) = hs.random_probe(ps, 0, kind="gaussian")
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)


def test_probe_dtype():
    """Probe dtype: float64 for float64 parameters, float32 otherwise, or as asked."""
    p = hs.random_probe(_params(), 0)
    assert [t.dtype for t in p] == [torch.float32, torch.float32, torch.float64]
    assert all(
        t.dtype == torch.bfloat16 for t in hs.random_probe(_params(), 0, dtype=torch.bfloat16)
    )
    with pytest.raises(ValueError, match="rademacher"):
        hs.random_probe(_params(), 0, kind="uniform")


def test_parameter_names_decide_the_streams():
    """Each parameter draws from its own stream keyed by its name: two same-shaped parameters get
    different entries, renaming changes the probe, and a parameter's entries do not depend on
    which other parameters are present (so subsets and shards see the same numbers)."""
    ps = [torch.zeros(64), torch.zeros(64)]
    a = hs.random_probe(ps, 0, names=["w", "b"])
    assert not torch.equal(a[0], a[1])
    b = hs.random_probe(ps, 0, names=["w", "c"])
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    alone = hs.random_probe(ps[1:], 0, names=["b"])
    assert torch.equal(alone[0], a[1])


def test_probe_uses_operator_names():
    """Given an operator, probes are keyed by its parameter names."""
    m = torch.nn.Linear(3, 2)
    op = hs.HessianOperator(m, lambda model, b: model(b).pow(2).mean(), [torch.ones(1, 3)])
    a = hs.random_probe(op, 0)
    b = hs.random_probe(list(m.parameters()), 0, names=["weight", "bias"])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "v,exc,match",
    [
        (torch.zeros(3), TypeError, "list of tensors"),
        ([torch.zeros(2)], ValueError, "has 1 tensors but the operator has 2"),
        ([torch.zeros(2), torch.zeros(4)], ValueError, r"\[1\] has shape \(4,\) but parameter 1"),
        ([torch.zeros(2), "x"], ValueError, r"\[1\]"),
    ],
)
def test_check_vector_messages(v, exc, match):
    """check_vector says what was expected and what was got."""
    with pytest.raises(exc, match=match):
        check_vector(v, [torch.zeros(2), torch.zeros(3)])
