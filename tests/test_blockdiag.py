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


def _dense_rows(H, v, slices):
    """(abs_error, rel_error, cosine) of each block from the dense H and the unit probe v."""
    h = H @ v
    out = []
    for sl in slices:
        vb = torch.zeros_like(v)
        vb[sl] = v[sl]
        hb = H @ vb
        d = float((h[sl] - hb[sl]).norm())
        out.append(
            (
                d,
                d / float(h[sl].norm()),
                float(h[sl] @ hb[sl] / (h[sl].norm() * hb[sl].norm())),
            )
        )
    return out


def _slices(op, groups):
    """The flat index range of each block of contiguous parameters ``groups`` (name -> names)."""
    edges = dict(zip(op.param_names, np.cumsum([0] + [p.numel() for p in op.params])))
    ends = dict(zip(op.param_names, np.cumsum([p.numel() for p in op.params])))
    return {b: slice(int(edges[m[0]]), int(ends[m[-1]])) for b, m in groups.items()}


@pytest.fixture(scope="module")
def transformer2():
    """A tiny float64 transformer with layers blocks.0 and blocks.1 (plus pos, tok, ln_f and
    head), its exact operator and dense Hessian."""
    from conftest import problem_with_hessian

    model, loss_fn, batches, H = problem_with_hessian("transformer2")
    return hs.HessianOperator(model, loss_fn, batches, method="exact"), H


def test_layer_only_test_matches_the_dense_hessian(transformer2):
    """FSHP §6 on a 2-layer transformer: the layer blocks are blocks.0 and blocks.1 (num_blocks
    2), the embeddings, final norm and head are extra rows; every row equals the numbers from
    the dense Hessian to 1e-10; the summary is over the layer rows only, the extras counted
    and summarised apart; per_block() gives the mean ± std over probes, layers first."""
    op, H = transformer2
    rep = hs.block_diagonal_test(op, num_probes=3, seed=5)
    layers, extras = hs.layer_blocks(op.param_names)
    assert list(layers) == ["blocks.0", "blocks.1"]
    assert set(extras) == {"pos", "tok", "ln_f", "head"}
    assert rep.config["layers_found"] is True
    order = list(layers) + list(extras)
    assert [r.block for r in rep.blocks] == order * 3
    assert [r.kind for r in rep.blocks[:6]] == ["layer", "layer"] + ["extra"] * 4
    assert [r.layer for r in rep.blocks[:6]] == [0, 1, None, None, None, None]
    slices = _slices(op, {**layers, **extras})
    for s in range(3):
        v = hs.testing.flatten(hs.unit_probe(op, 5 + s, kind="gaussian"))
        want = _dense_rows(H, v, [slices[b] for b in order])
        for row, w in zip(rep.blocks[6 * s : 6 * s + 6], want):
            assert (
                row.probe == s
                and row.num_params == slices[row.block].stop - slices[row.block].start
            )
            got = (row.abs_error, row.rel_error, row.cosine)
            np.testing.assert_allclose(got, w, rtol=1e-10, atol=0)

    s = rep.summary()
    assert (s["num_blocks"], s["num_probes"], s["num_extra_blocks"]) == (2, 3, 4)
    assert s["num_undefined"] == 0
    lay = [r for r in rep.blocks if r.kind == "layer"]
    assert len(lay) == 2 * 3  # pooled: layers x probes
    for k in ("abs_error", "rel_error", "cosine"):
        x = np.array([getattr(r, k) for r in lay])
        assert s[k]["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert s[k]["std"] == pytest.approx(x.std(), rel=1e-12)
        every = np.array([getattr(r, k) for r in rep.blocks])
        assert s[k]["mean"] != pytest.approx(every.mean(), rel=1e-6)  # the extras are out
        for b in extras:
            e = np.array([getattr(r, k) for r in rep.blocks if r.block == b])
            assert s["extra"][b][k]["mean"] == pytest.approx(e.mean(), rel=1e-12)
            assert s["extra"][b][k]["std"] == pytest.approx(e.std(), rel=1e-12)

    pb = rep.per_block()
    assert [p["block"] for p in pb] == order
    assert [(p["kind"], p["layer"], p["num_probes"]) for p in pb[:3]] == [
        ("layer", 0, 3),
        ("layer", 1, 3),
        ("extra", None, 3),
    ]
    for p in pb:
        x = np.array([r.rel_error for r in rep.blocks if r.block == p["block"]])
        assert p["rel_error"]["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert p["rel_error"]["std"] == pytest.approx(x.std(), rel=1e-12)
    d = rep.to_dict()
    assert d["blocks"][0]["kind"] == "layer" and d["blocks"][0]["layer"] == 0
    assert d["blocks"][2]["kind"] == "extra" and d["blocks"][2]["layer"] is None
    assert d["per_block"] == pb and d["summary"]["num_blocks"] == 2


def test_one_probe_and_several_pool_the_same_rows(transformer2):
    """--probes S pools probes: the rows of probe s in a 3-probe run are those of a 1-probe run
    with seed + s, and the summary of the 3-probe run is the statistics of all their layer rows
    together (not the mean of the per-probe means' spread)."""
    op, _ = transformer2
    rep = hs.block_diagonal_test(op, num_probes=3, seed=1, extra_blocks={})
    assert rep.summary()["num_extra_blocks"] == 0 and len(rep.blocks) == 2 * 3
    single = [
        hs.block_diagonal_test(op, num_probes=1, seed=1 + s, extra_blocks={}) for s in range(3)
    ]
    for s, one in enumerate(single):
        for a, b in zip(rep.blocks[2 * s : 2 * s + 2], one.blocks):
            assert (a.block, a.probe) == (b.block, s)
            assert a.rel_error == pytest.approx(b.rel_error, rel=1e-12)
    for k in ("abs_error", "rel_error", "cosine"):
        x = np.array([getattr(r, k) for one in single for r in one.blocks])
        assert rep.summary()[k]["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert rep.summary()[k]["std"] == pytest.approx(x.std(), rel=1e-12)


def test_user_blocks_and_extra_blocks(transformer2):
    """A user's blocks are all layers, in the given order; extra_blocks= adds reported-only
    rows; a name in both is refused, and so is a test without a layer block."""
    op, H = transformer2
    layers, extras = hs.layer_blocks(op.param_names)
    mine = {"second": layers["blocks.1"], "first": layers["blocks.0"]}
    rep = hs.block_diagonal_test(op, mine, seed=2, extra_blocks=[extras["head"]])
    assert [(r.block, r.kind, r.layer) for r in rep.blocks] == [
        ("second", "layer", 0),
        ("first", "layer", 1),
        ("extra0", "extra", None),
    ]
    assert rep.summary()["num_blocks"] == 2 and rep.summary()["num_extra_blocks"] == 1
    ref = hs.block_diagonal_test(op, seed=2)
    by = {r.block: r for r in ref.blocks}
    for a, b in zip(rep.blocks, ["blocks.1", "blocks.0", "head"]):
        assert a.rel_error == pytest.approx(by[b].rel_error, rel=1e-12)  # blocks are blocks
    with pytest.raises(ValueError, match="both layer and extra"):
        hs.block_diagonal_test(op, mine, extra_blocks={"first": extras["head"]})
    with pytest.raises(ValueError, match="at least one layer block"):
        hs.block_diagonal_test(op, {}, extra_blocks=extras)


def test_layer_blocks_order_and_numbers():
    """Layer blocks come in index order per stack (layers.10 after layers.2), carry their index
    N, and several stacks number by position; extras keep the module order."""
    names = [
        "embed.weight",
        "model.layers.10.w",
        "model.layers.2.w",
        "model.layers.2.b",
        "norm.weight",
    ]
    layers, extras = hs.layer_blocks(names)
    assert list(layers) == ["model.layers.2", "model.layers.10"]
    assert layers["model.layers.2"] == ["model.layers.2.w", "model.layers.2.b"]
    assert list(extras) == ["embed", "norm"]
    n = {"enc.layers.0.w": 3, "enc.layers.1.w": 3, "dec.layers.0.w": 3, "dec.layers.1.w": 3}
    op = _Named(n)
    rep = hs.block_diagonal_test(op)
    assert [(r.block, r.layer) for r in rep.blocks] == [
        ("enc.layers.0", 0),
        ("enc.layers.1", 1),
        ("dec.layers.0", 2),
        ("dec.layers.1", 3),
    ]
    op = _Named({"h.3.w": 2, "h.7.w": 2, "wte.weight": 2})
    rep = hs.block_diagonal_test(op)
    assert [(r.block, r.kind, r.layer) for r in rep.blocks] == [
        ("h.3", "layer", 3),
        ("h.7", "layer", 7),
        ("wte", "extra", None),
    ]


class _Named(hs.DenseOperator):
    """A random SPD matrix on parameters with the given names and sizes."""

    def __init__(self, sizes):
        n = sum(sizes.values())
        super().__init__(_spd(n, seed=n)[0])
        self.params = [torch.zeros(k, dtype=torch.float64) for k in sizes.values()]
        self.param_names = list(sizes)

    def matvec(self, v):
        return list(torch.split(self.H @ torch.cat(v), [p.numel() for p in self.params]))


def test_a_layer_without_curvature_is_counted_as_undefined():
    """A layer whose Hessian rows are zero has (Hv)_b = 0: rel_error and cosine are NaN for it,
    counted in num_undefined and left out of those means; abs_error (0) stays in."""
    op = _Named({"layers.0.w": 4, "layers.1.w": 3, "layers.2.w": 2})
    op.H[7:, :] = 0.0
    op.H[:, 7:] = 0.0
    rep = hs.block_diagonal_test(op, num_probes=2)
    dead = [r for r in rep.blocks if r.block == "layers.2"]
    assert all(np.isnan(r.rel_error) and np.isnan(r.cosine) and r.abs_error == 0 for r in dead)
    s = rep.summary()
    assert s["num_undefined"] == 2 and s["num_blocks"] == 3
    live = [r for r in rep.blocks if r.block != "layers.2"]
    assert s["rel_error"]["mean"] == pytest.approx(np.mean([r.rel_error for r in live]))
    assert s["abs_error"]["mean"] == pytest.approx(np.mean([r.abs_error for r in rep.blocks]))
