"""HessianOperator as a whole: the operator contract, parameter subsets, weights, SciPy, and its
errors in the API's vocabulary. The products themselves: test_hvp.py; the objective:
test_objective.py; the fd step: test_fd_step.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hessian_spectra as hs
from conftest import dense_hessian, flatten, make_problem, problem_with_hessian, unflatten
from hessian_spectra.linop import Operator


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _direction(P: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_meets_the_operator_contract():
    """HessianOperator is a linop.Operator (runtime Protocol) with the documented members:
    params/param_names of the model, num_params, float64 vectors for a float64 model, method,
    and op @ v == op.matvec(v); as_operator returns it unchanged."""
    m, loss_fn, batches = make_problem("mlp")
    op = hs.HessianOperator(m, loss_fn, batches, method="exact")
    assert isinstance(op, Operator) and hs.as_operator(op) is op
    assert op.param_names == [n for n, _ in m.named_parameters()]
    assert all(a is b for a, b in zip(op.params, m.parameters()))
    assert op.num_params == 51 and op.shape == (51, 51) and op.vector_dtype == torch.float64
    assert op.method == "exact" and op.reduction == "mean" and not op.train_mode
    v = hs.random_probe(op, 0)
    assert all(torch.equal(a, b) for a, b in zip(op @ v, op.matvec(v)))
    assert "method='exact'" in repr(op)


def test_weights_matter():
    """The (loss, weight) pairs are honoured: the operator on unequal batches with weights equals
    the weighted reference and differs (by more than 1e-3) from the unweighted one."""
    m, loss_fn, batches, H = problem_with_hessian("mlp")
    unweighted = lambda model, b: loss_fn(model, b)[0]
    H_unw = dense_hessian(m, unweighted, batches)
    v = _direction(H.shape[0])
    op = hs.HessianOperator(m, loss_fn, batches, method="exact")
    hv = flatten(op.matvec(unflatten(v, list(m.parameters()))))
    assert _rel(hv, H @ v) < 1e-12
    assert _rel(H_unw @ v, H @ v) > 1e-3


def test_params_subset():
    """params=[names] restricts H to that block: the matvec equals the sub-block of the full H."""
    m, loss_fn, batches, H = problem_with_hessian("mlp")
    names = [n for n, _ in m.named_parameters()]
    op = hs.HessianOperator(m, loss_fn, batches, method="exact", params=["fc2.weight", "fc1.bias"])
    assert op.param_names == ["fc2.weight", "fc1.bias"] and op.num_params == 18 + 6
    sizes = {n: p.numel() for n, p in m.named_parameters()}
    offs = np.cumsum([0] + [sizes[n] for n in names])
    idx = torch.cat(
        [
            torch.arange(offs[names.index(n)], offs[names.index(n)] + sizes[n])
            for n in op.param_names
        ]
    )
    v = _direction(len(idx))
    hv = flatten(op.matvec(unflatten(v, op.params)))
    assert _rel(hv, H[idx][:, idx] @ v) < 1e-12


def test_to_scipy_eigsh_matches_eigvalsh():
    """op.to_scipy() is a SciPy LinearOperator: eigsh's 3 largest/smallest algebraic eigenvalues
    equal numpy.linalg.eigvalsh of the dense Hessian (relative 1e-8)."""
    from scipy.sparse.linalg import eigsh

    m, loss_fn, batches, H = problem_with_hessian("mlp")
    lam = np.linalg.eigvalsh(H.numpy())
    A = hs.HessianOperator(m, loss_fn, batches, method="exact").to_scipy()
    assert A.shape == (H.shape[0], H.shape[0])
    top = np.sort(eigsh(A, k=3, which="LA", tol=1e-12, v0=np.ones(H.shape[0]))[0])
    bot = np.sort(eigsh(A, k=3, which="SA", tol=1e-12, v0=np.ones(H.shape[0]))[0])
    scale = np.abs(lam).max()
    np.testing.assert_allclose(top, lam[-3:], rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(bot, lam[:3], rtol=0, atol=1e-8 * scale)


def test_stats_count_products_and_gradients():
    """stats counts matvecs and gradients (the CLI's timings): 2 products and 1 gradient."""
    op = hs.HessianOperator(*make_problem("mlp"))
    for s in range(2):
        op @ hs.random_probe(op, s)
    op.gradient()
    assert op.stats["matvecs"] == 2 and op.stats["gradients"] == 1
    assert op.stats["matvec_seconds"] > 0 and op.stats["gradient_seconds"] > 0


def test_low_precision_fd_error_speaks_the_api():
    """The bf16 + fd refusal names the library's remedies (load the model in float32,
    method='exact', allow_low_precision_fd=True), not CLI flags."""
    m, l, b = make_problem("mlp")
    with pytest.raises(ValueError) as e:
        hs.HessianOperator(m.to(torch.bfloat16), l, [(x.bfloat16(), y.bfloat16()) for x, y in b])
    msg = str(e.value)
    assert "Load the model in float32" in msg and "method='exact'" in msg
    assert "--" not in msg


def test_errors_in_the_operator_modules_name_no_cli_flags_or_missing_functions():
    """Issue 7: the operator core spoke CLI ("--dtype float32") and pointed to
    hessian_spectra.shard_model, which does not exist at top level. No message in the modules
    names a CLI flag, and every hessian_spectra.X.Y it names exists."""
    import importlib
    import inspect
    import re

    for mod in ("objective", "hvp", "fd_step", "operators", "influence", "solvers"):
        src = inspect.getsource(importlib.import_module(f"hessian_spectra.{mod}"))
        strings = re.findall(r'"([^"\n]*)"', src)
        assert not [s for s in strings if re.search(r"(^|\s|\()--[a-z]", s)], mod
        for ref in re.findall(r"hessian_spectra\.([a-z_]+(?:\.[a-z_]+)*)", src):
            obj = importlib.import_module("hessian_spectra")
            for part in ref.split("."):
                obj = getattr(obj, part, None) or importlib.import_module(f"{obj.__name__}.{part}")
            assert obj is not None, ref


def test_fixed_eps_products_are_two_passes_without_calibration():
    """A fixed eps needs no step: no calibration, 2 loss passes per product (the product
    against the dense Hessian); with max_fd_error the calibration runs (its check needs it)."""
    m, loss_fn, batches = make_problem("mlp")
    calls = []

    def counted(model, b):
        calls.append(1)
        return loss_fn(model, b)

    op = hs.HessianOperator(m, counted, batches, eps=1e-5, check_determinism=False)
    v = hs.random_probe(op, 0)
    hv = op.matvec(v)
    assert len(calls) == 2 * len(batches) and op.fd_model is None
    assert op.stats["fd_calibration_gradients"] == 0 and op.last_fd_error_estimate is None
    H = dense_hessian(m, loss_fn, batches)
    ref = H @ flatten(v)
    assert _rel(flatten(hv), ref) < 1e-6
    checked = hs.HessianOperator(m, loss_fn, batches, eps=1e-5, max_fd_error=0.1)
    checked.matvec(v)
    assert checked.fd_model is not None and checked.last_fd_error_estimate.eps == 1e-5
