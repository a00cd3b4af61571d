"""Per-block spectra: SLQ of each diagonal block H_bb against known spectra and dense eigvalsh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hessian_spectra as hs
from conftest import flatten, known_spectrum_matrix, problem_with_hessian, unflatten
from hessian_spectra.per_block import BlockOperator, resolve_blocks


class Blocked:
    """A dense symmetric H on a vector of three named tensors (sizes 6, 8, 5)."""

    def __init__(self, H):
        self.H = H
        self.params = [
            torch.zeros(6, dtype=torch.float64),
            torch.zeros(2, 4, dtype=torch.float64),
            torch.zeros(5, dtype=torch.float64),
        ]
        self.param_names = ["a.w", "b.w", "c.w"]
        self.method = "dense"

    def matvec(self, v):
        return unflatten(self.H @ flatten(v), self.params)


EIG_A = [-2.0, -0.5, 0.1, 0.3, 1.0, 4.0]
EIG_B = [0.5, 0.6, 0.7, 2.0, 3.0, 5.0, 8.0, 9.0]
EIG_C = [-1.0, 0.0, 1.0, 2.0, 3.0]


def _blocked(coupling: float):
    A = known_spectrum_matrix(EIG_A, seed=1)
    B = known_spectrum_matrix(EIG_B, seed=2)
    C = known_spectrum_matrix(EIG_C, seed=3)
    H = torch.block_diag(A, B, C)
    g = torch.Generator().manual_seed(4)
    X = coupling * torch.randn(19, 19, generator=g, dtype=torch.float64)
    mask = torch.block_diag(torch.ones(6, 6), torch.ones(8, 8), torch.ones(5, 5)).double()
    X = X * (1 - mask)  # off-diagonal blocks only
    return Blocked(H + X + X.T)


@pytest.mark.parametrize("coupling", [0.0, 0.7])
def test_per_block_slq_known_spectra(coupling):
    """On a matrix whose diagonal blocks have known spectra, per_block_slq with full steps gives
    each block's eigenvalues as the nodes of every probe (to 1e-10), whether or not the
    off-diagonal blocks are zero (so it is H_bb, not a block of the eigen-decomposition of H);
    the blocks are named and sized as asked, and each density records its parameter names."""
    op = _blocked(coupling)
    dens = hs.per_block_slq(op, 20, 2, blocks={"A": ["a.*"], "B": ["b.w"], "C": ["c.w"]})
    assert list(dens) == ["A", "B", "C"]
    for name, eigs in (("A", EIG_A), ("B", EIG_B), ("C", EIG_C)):
        d = dens[name]
        assert d.num_params == len(eigs) and d.config["block"] == name
        for nodes in d.nodes:
            np.testing.assert_allclose(np.sort(nodes), eigs, atol=1e-10)
    assert dens["B"].config["params"] == ["b.w"]


def test_block_operator_is_the_diagonal_block():
    """BlockOperator(op, names) @ v equals H[idx][:, idx] @ v for the block's coordinates idx,
    on the coupled matrix; its vectors are laid out like the chosen parameters only."""
    op = _blocked(0.7)
    blk = BlockOperator(op, ["b.w", "c.w"])
    idx = list(range(6, 19))
    v = torch.randn(13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = flatten(blk @ unflatten(v, blk.params))
    torch.testing.assert_close(out, op.H[idx][:, idx] @ v, rtol=0, atol=1e-12)
    assert blk.num_params == 13 and blk.param_names == ["b.w", "c.w"]


def test_per_block_transformer_against_dense_blocks():
    """On the float64 two-layer transformer's exact Hessian with the default blocks (one per
    layer, plus embeddings, final norm, head), every parameter is in exactly one block, and each
    block's SLQ (up to full steps, one probe; Lanczos stops early on an invariant subspace where
    H_bb has repeated eigenvalues) has every node within 1e-8·max|λ| of an eigenvalue of the dense
    H_bb, and its extreme nodes equal H_bb's extreme eigenvalues to that tolerance."""
    m, loss_fn, batches, H = problem_with_hessian("transformer2")
    op = hs.HessianOperator(m, loss_fn, batches, method="exact")
    groups = resolve_blocks(op.param_names)
    assert "blocks.0" in groups and "blocks.1" in groups
    assert sorted(n for g in groups.values() for n in g) == sorted(op.param_names)
    offsets, i = {}, 0
    for n, p in zip(op.param_names, op.params):
        offsets[n] = range(i, i + p.numel())
        i += p.numel()
    small = {k: g for k, g in groups.items() if sum(len(offsets[n]) for n in g) <= 140}
    dens = hs.per_block_slq(op, 200, 1, blocks=small)
    for name, names in small.items():
        idx = [j for n in names for j in offsets[n]]
        lam = np.linalg.eigvalsh(H[idx][:, idx].numpy())
        nodes = np.sort(dens[name].nodes[0])
        tol = 1e-8 * np.abs(lam).max()
        assert np.abs(nodes[:, None] - lam[None, :]).min(axis=1).max() <= tol, name
        np.testing.assert_allclose(nodes[[0, -1]], lam[[0, -1]], atol=tol)


def test_select_params_globs_and_errors():
    """select_params keeps model order, accepts exact names and globs, and a pattern that matches
    nothing is a ValueError that names what was looked for."""
    names = ["model.layers.0.q.weight", "model.layers.1.q.weight", "lm_head.weight"]
    assert hs.select_params(names, ["model.layers.1.*", "lm_head.weight"]) == names[1:]
    assert hs.select_params(names, "model.layers.*.q.weight") == names[:2]
    with pytest.raises(ValueError, match="'model.layers.7.\\*' matches no parameter"):
        hs.select_params(names, ["model.layers.7.*"])
    with pytest.raises(TypeError):
        resolve_blocks(names, "model.layers.0")
