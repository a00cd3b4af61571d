"""GGNOperator against the dense float64 GGN ``Σ_b w_b J_bᵀ H_out,b J_b / Σ_b w_b``
(``testing.dense_ggn``, built from ``torch.autograd.functional`` Jacobians and output Hessians)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hessian_spectra as hs
from conftest import dense_ggn, dense_hessian, flatten, make_hf_problem, make_problem, unflatten
from hessian_spectra.ggn import causal_lm_forward, causal_lm_loss_of_logits
from hessian_spectra.partition import ZeroWeight


def _fwd(model, batch):
    return model(batch[0])


def _mse_out(out, batch):
    return ((out - batch[1]) ** 2).mean(), batch[0].shape[0]


def _ce_out(out, batch):
    return F.cross_entropy(out, batch[1]), batch[0].shape[0]


def _lm_fwd(model, batch):
    return model(batch)[:, :-1]  # (B, T-1, V)


def _lm_out(out, batch):
    tgt = batch[:, 1:]
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), tgt.reshape(-1)), tgt.numel()


def _ce_labels_out(out, batch):  # cross-entropy on the MLP, labels = argmax of its targets
    return F.cross_entropy(out, batch[1].argmax(dim=1)), batch[0].shape[0]


CASES = {
    "mlp": ("mlp", _fwd, _mse_out),  # MSE
    "mlp_ce": ("mlp", _fwd, _ce_labels_out),  # cross-entropy
    "cnn": ("cnn", _fwd, _ce_out),  # cross-entropy
    "transformer": ("transformer", _lm_fwd, _lm_out),  # LayerNorm + attention, next-token CE
}
_REF: dict = {}


def case(name):
    if name not in _REF:
        kind, fwd, lof = CASES[name]
        model, _, batches = make_problem(kind)
        _REF[name] = (model, fwd, lof, batches, dense_ggn(model, fwd, lof, batches))
    return _REF[name]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(CASES))
def test_exact_ggn_equals_dense(name):
    """The exact GGN product equals dense_ggn @ v to ≤ 1e-10 relative on the float64 MLP (MSE
    and cross-entropy), CNN (cross-entropy) and LayerNorm transformer (next-token CE), for three
    random v; the parameters are bit-for-bit unchanged."""
    model, fwd, lof, batches, G = case(name)
    before = [p.detach().clone() for p in model.parameters()]
    op = hs.GGNOperator(model, fwd, lof, batches, method="exact")
    assert isinstance(op, hs.Operator)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(op.num_params, generator=g, dtype=torch.float64)
        assert _rel(flatten(op @ unflatten(v, op.params)), G @ v) <= 1e-10
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", list(CASES))
def test_fd_ggn_equals_dense(name):
    """The shard-local fd GGN (central difference of the outputs, default ε) equals dense_ggn @ v
    to ≤ 1e-7 relative in float64 (measured 1e-10 to 1e-9), and the parameters are bit-for-bit
    unchanged afterwards."""
    model, fwd, lof, batches, G = case(name)
    before = [p.detach().clone() for p in model.parameters()]
    op = hs.GGNOperator(model, fwd, lof, batches, method="fd")
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert _rel(flatten(op @ unflatten(v, op.params)), G @ v) <= 1e-7
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fd_ggn_float32_error():
    """In float32 the fd GGN of the transformer is within 1e-2 relative of the exact float64 GGN
    (rounding of the output difference dominates: measured ~1e-3), and the exact float32 GGN
    within 1e-5."""
    _, fwd, lof, _, G = case("transformer")
    m32 = make_problem("transformer", dtype=torch.float32)[0]
    b32 = make_problem("transformer", dtype=torch.float32)[2]
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for method, tol in (("fd", 1e-2), ("exact", 1e-5)):
        op = hs.GGNOperator(m32, fwd, lof, b32, method=method)
        assert _rel(flatten(op @ unflatten(v, op.params)), G @ v) <= tol, method


def test_ggn_equals_hessian_for_linear_model_with_mse():
    """For a model linear in θ with squared error, the GGN is the Hessian: GGNOperator (exact and
    fd) equals the dense Hessian to 1e-10 / 1e-7 relative."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(5)
    batches = [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randn(n, 3, generator=g, dtype=torch.float64),
        )
        for n in (3, 5)
    ]
    H = dense_hessian(model, lambda m, b: _mse_out(_fwd(m, b), b), batches)
    v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
    for method, tol in (("exact", 1e-10), ("fd", 1e-7)):
        op = hs.GGNOperator(model, _fwd, _mse_out, batches, method=method)
        assert _rel(flatten(op @ unflatten(v, op.params)), H @ v) <= tol, method


def test_ggn_spectrum_by_lanczos_and_psd():
    """The GGN of a convex loss is PSD (dense: smallest eigenvalue ≥ −1e-10·λmax) and of rank
    ≤ 5 examples × 2 (softmax) = 10 on the CNN; top_eigenvalues on the exact GGNOperator gives its
    top 4 eigenvalues to 1e-8 relative and no Ritz value below −1e-8·λmax; xtrace with 2(P + 1)
    products gives its trace to 1e-8."""
    model, fwd, lof, batches, G = case("cnn")
    op = hs.GGNOperator(model, fwd, lof, batches, method="exact")
    lam = np.linalg.eigvalsh(G.numpy())
    scale = lam.max()
    assert lam.min() >= -1e-10 * scale
    assert int((lam > 1e-10 * scale).sum()) <= 10
    top = hs.top_eigenvalues(op, 4, num_steps=12)
    np.testing.assert_allclose(top.eigenvalues, lam[::-1][:4], rtol=1e-8)
    assert top.run.ritz_values.min() >= -1e-8 * scale
    est = hs.trace(op, 2 * (op.num_params + 1), method="xtrace")
    assert est.estimate == pytest.approx(float(np.trace(G.numpy())), rel=1e-8)


def test_ggn_params_subset_reduction_sum_and_zero_weight():
    """With params=["fc2.weight"] the product is the matching sub-block of dense_ggn; with
    reduction="sum" it is Σ_b w_b J_bᵀH_bJ_b (the mean times Σ w_b = 10); a ZeroWeight batch adds
    nothing (the GGN of the other batches)."""
    model, fwd, lof, batches, G = case("mlp")
    names = ["fc2.weight"]
    Gs = dense_ggn(model, fwd, lof, batches, names=names)
    op = hs.GGNOperator(model, fwd, lof, batches, method="exact", params=names)
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert _rel(flatten(op @ unflatten(v, op.params)), Gs @ v) <= 1e-10
    ops = hs.GGNOperator(model, fwd, lof, batches, method="exact", reduction="sum")
    w = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert _rel(flatten(ops @ unflatten(w, ops.params)), 10.0 * (G @ w)) <= 1e-10
    G01 = dense_ggn(model, fwd, lof, batches[:2])
    opz = hs.GGNOperator(model, fwd, lof, batches[:2] + [ZeroWeight(batches[2])], method="fd")
    assert _rel(flatten(opz @ unflatten(w, opz.params)), G01 @ w) <= 1e-7


def test_ggn_keeps_user_grads_and_gradient():
    """The user's .grad tensors are given back untouched after a product, and op.gradient() is the
    gradient of loss_of_output_fn ∘ forward_fn (equal to HessianOperator's on the same loss)."""
    model, fwd, lof, batches, _ = case("mlp")
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    op = hs.GGNOperator(model, fwd, lof, batches, method="fd")
    op @ hs.unit_probe(op)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    for p in model.parameters():
        p.grad = None
    loss, g = op.gradient()
    loss_h, g_h = hs.HessianOperator(model, lambda m, b: lof(fwd(m, b), b), batches).gradient()
    assert loss == loss_h and all(torch.equal(a, b) for a, b in zip(g, g_h))


def test_ggn_bad_inputs():
    """Clear errors: an unknown method (ValueError naming the choices), a forward_fn returning a
    tuple (TypeError), a loss_of_output_fn that ignores the outputs (ValueError)."""
    model, fwd, lof, batches, _ = case("mlp")
    with pytest.raises(ValueError, match="'exact', 'fd'"):
        hs.GGNOperator(model, fwd, lof, batches, method="jvp")
    op = hs.GGNOperator(model, lambda m, b: (m(b[0]),), lof, batches, check_determinism=False)
    with pytest.raises(TypeError, match="one tensor of outputs"):
        op @ hs.unit_probe(op)
    z = torch.zeros((), dtype=torch.float64)
    op = hs.GGNOperator(model, fwd, lambda o, b: z + 1.0, batches, check_determinism=False)
    with pytest.raises(ValueError, match="does not depend on the outputs"):
        op @ hs.unit_probe(op)


def _dict_batches(batches):
    out = []
    for ids in batches:
        labels = ids.clone()
        labels[0, -1] = -100  # one ignored target
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def test_causal_lm_helpers_match_data_loss_and_dense_ggn():
    """On a tiny float64 GPT-2, causal_lm_loss_of_logits(causal_lm_forward(m, b), b) equals
    data.causal_lm_loss(m, b) (the same token count; the loss to 1e-6, as data.causal_lm_loss
    computes in float32 even for float64 logits, where the helper keeps float64), and the exact
    GGN built from the two helpers equals dense_ggn to 1e-10 relative."""
    from hessian_spectra.data import causal_lm_loss

    model, _, batches = make_hf_problem("gpt2")
    batches = _dict_batches(batches)
    for b in batches:
        a, n = causal_lm_loss_of_logits(causal_lm_forward(model, b), b)
        a2, n2 = causal_lm_loss(model, b)
        assert int(n) == int(n2) and float(a.detach()) == pytest.approx(
            float(a2.detach()), rel=1e-6
        )
    G = dense_ggn(model, causal_lm_forward, causal_lm_loss_of_logits, batches)
    op = hs.GGNOperator(model, causal_lm_forward, causal_lm_loss_of_logits, batches)
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert _rel(flatten(op @ unflatten(v, op.params)), G @ v) <= 1e-10
