"""CG inverse-HVPs against torch.linalg.solve and SciPy's cg; the block-diagonal test on known structure."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

import hessian_spectra as hs


def _spd(n=30, lo=0.5, hi=10.0, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return torch.tensor(Q @ np.diag(np.linspace(lo, hi, n)) @ Q.T), torch.tensor(rng.standard_normal(n))


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
    """At a fixed max_iter, our iterate equals scipy.sparse.linalg.cg's (same Hestenes-Stiefel recurrence)."""
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
    x, info = hs.cg_solve(A, [b], max_iter=100)
    assert info.negative_curvature and not info.converged
    assert info.curvature <= 0


def test_cg_on_mlp_hessian_matches_dense(mlp64):
    """CG with damping on a real (indefinite) MLP Hessian equals solve(H + λI, b) of the dense Hessian."""
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


class _TwoBlock(hs.DenseOperator):
    """A dense matrix acting on two named parameter blocks of sizes 10 and 20."""

    def __init__(self, H):
        super().__init__(H)
        self.params = [torch.zeros(10, dtype=H.dtype), torch.zeros(20, dtype=H.dtype)]
        self.param_names = ["a", "b"]

    def matvec(self, v):
        y = self.H @ torch.cat(v)
        return [y[:10], y[10:]]


def test_block_test_says_yes_on_block_diagonal_and_no_with_coupling():
    """A block-diagonal matrix gives rel_error 0 and cosine 1; coupling between blocks gives
    errors equal to those computed densely from the off-diagonal block."""
    A, _ = _spd(seed=4)
    B = torch.block_diag(A[:10, :10], A[10:, 10:])
    rep = hs.block_diagonal_test(_TwoBlock(B), num_probes=3)
    s = rep.summary()
    assert s["num_blocks"] == 2 and len(rep.blocks) == 6
    assert s["rel_error"]["mean"] < 1e-12 and abs(s["cosine"]["mean"] - 1) < 1e-12

    rep = hs.block_diagonal_test(_TwoBlock(A), num_probes=1, seed=7)
    v = hs.random_probe(_TwoBlock(A), 7, kind="gaussian", dtype=torch.float64)
    v = torch.cat(v)
    v = v / v.norm()
    h = A @ v
    for row, sl in zip(rep.blocks, [slice(0, 10), slice(10, 30)]):
        vb = torch.zeros_like(v)
        vb[sl] = v[sl]
        hb = A @ vb
        err = float((h[sl] - hb[sl]).norm())
        assert row.abs_error == pytest.approx(err, rel=1e-10)
        assert row.rel_error == pytest.approx(err / float(h[sl].norm()), rel=1e-10)
        assert row.cosine == pytest.approx(float(h[sl] @ hb[sl] / (h[sl].norm() * hb[sl].norm())), rel=1e-10)
    assert rep.summary()["rel_error"]["mean"] > 0.05


def test_default_blocks_group_transformer_layers():
    """Default blocks: one per transformer layer, the rest grouped by module."""
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.0.ln.weight",
             "model.layers.1.mlp.w", "model.norm.weight", "lm_head.weight", "transformer.h.3.attn.c_attn.weight"]
    g = hs.default_blocks(names)
    assert g["model.layers.0"] == ["model.layers.0.mlp.w", "model.layers.0.ln.weight"]
    assert set(g) == {"model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head", "transformer.h.3"}


def test_block_test_on_mlp_matches_dense_hessian(mlp64):
    """On an MLP (blocks fc1, fc2) each row equals the numbers computed from the dense Hessian's blocks."""
    model, loss_fn, batches, H = mlp64
    op = hs.HessianOperator(model, loss_fn, batches, method="exact")
    rep = hs.block_diagonal_test(op, num_probes=2, seed=3)
    assert [r.block for r in rep.blocks] == ["fc1", "fc2"] * 2
    sizes = [p.numel() for p in op.params]
    edges = np.cumsum([0] + sizes)
    blocks = {"fc1": slice(edges[0], edges[2]), "fc2": slice(edges[2], edges[4])}
    for s in range(2):
        v = torch.cat([t.reshape(-1) for t in hs.random_probe(op, 3 + s, kind="gaussian")])
        v = v / v.norm()
        h = H @ v
        for row in rep.blocks[2 * s : 2 * s + 2]:
            sl = blocks[row.block]
            vb = torch.zeros_like(v)
            vb[sl] = v[sl]
            hb = H @ vb
            err = float((h[sl] - hb[sl]).norm())
            assert row.rel_error == pytest.approx(err / float(h[sl].norm()), rel=1e-8)
            assert row.cosine == pytest.approx(float(h[sl] @ hb[sl] / (h[sl].norm() * hb[sl].norm())), rel=1e-8)


def test_influence_scores_equal_dense_formula(mlp64):
    """influence() scores equal −∇L_q^T (H + λI)^{-1} ∇l_z computed with the dense Hessian and
    autograd gradients, for each candidate batch."""
    model, loss_fn, batches, H = mlp64
    op = hs.HessianOperator(model, loss_fn, batches, method="exact")
    lam = float(max(0.0, -np.linalg.eigvalsh(H.numpy())[0])) + 0.5
    query = [batches[0]]
    res = hs.influence(op, query, batches, damping=lam, tol=1e-12, max_iter=500)

    def grad_of(bs):
        model.zero_grad()
        tot = sum(loss_fn(model, b)[0] * loss_fn(model, b)[1] for b in bs) / sum(loss_fn(model, b)[1] for b in bs)
        g = torch.autograd.grad(tot, list(model.parameters()))
        return torch.cat([t.reshape(-1) for t in g])

    s = torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), grad_of(query))
    ref = np.array([-float(s @ grad_of([b])) for b in batches])
    assert res.cg.converged
    np.testing.assert_allclose(res.scores, ref, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())
