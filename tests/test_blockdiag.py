"""The block-diagonal test on known structure: block-diagonal and coupled dense matrices, and the
MLP's dense Hessian."""

import numpy as np
import pytest
import torch

import hessian_spectra as hs


def _spd(n=30, lo=0.5, hi=10.0, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return torch.tensor(Q @ np.diag(np.linspace(lo, hi, n)) @ Q.T), torch.tensor(
        rng.standard_normal(n)
    )


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
        assert row.cosine == pytest.approx(
            float(h[sl] @ hb[sl] / (h[sl].norm() * hb[sl].norm())), rel=1e-10
        )
    assert rep.summary()["rel_error"]["mean"] > 0.05


def test_default_blocks_group_transformer_layers():
    """Default blocks: one per transformer layer, the rest grouped by module."""
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.w",
        "model.layers.0.ln.weight",
        "model.layers.1.mlp.w",
        "model.norm.weight",
        "lm_head.weight",
        "transformer.h.3.attn.c_attn.weight",
    ]
    g = hs.default_blocks(names)
    assert g["model.layers.0"] == ["model.layers.0.mlp.w", "model.layers.0.ln.weight"]
    assert set(g) == {
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.norm",
        "lm_head",
        "transformer.h.3",
    }


def test_block_test_on_mlp_matches_dense_hessian(mlp64):
    """On an MLP (blocks fc1, fc2) each row equals the numbers computed from the dense
    Hessian's blocks."""
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
            assert row.cosine == pytest.approx(
                float(h[sl] @ hb[sl] / (h[sl].norm() * hb[sl].norm())), rel=1e-8
            )
