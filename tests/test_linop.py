"""The operator contract: DenseOperator, as_operator, and test doubles meeting linop.Operator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hessian_spectra as hs
from conftest import known_spectrum_matrix
from hessian_spectra.linop import DenseOperator, Operator, as_operator


def test_dense_operator_meets_the_contract_and_multiplies():
    """DenseOperator(H) is an Operator whose product is H @ x, in H's dtype, with one parameter
    of H's size; op @ v is op.matvec(v)."""
    H = known_spectrum_matrix([1.0, 2.0, 3.0, 4.0])
    op = DenseOperator(H)
    assert isinstance(op, Operator)
    assert op.num_params == 4 and op.vector_dtype == torch.float64 and op.method == "dense"
    x = torch.arange(4.0, dtype=torch.float64)
    assert torch.equal(op.matvec([x])[0], H @ x) and torch.equal((op @ [x])[0], H @ x)


def test_as_operator_wraps_matrices_and_completes_minimal_objects():
    """as_operator: an Operator as is; a tensor or numpy matrix as a DenseOperator; an object with
    only matvec and params completed (names "0".., dimension, float64 vectors for float64
    params, method "custom") and its other attributes reachable; anything else a TypeError."""
    H = known_spectrum_matrix([1.0, 5.0])
    op = DenseOperator(H)
    assert as_operator(op) is op
    assert isinstance(as_operator(H), DenseOperator)
    assert isinstance(as_operator(H.numpy()), DenseOperator)

    class Minimal:
        extra = 7

        def __init__(self):
            self.params = [torch.zeros(2, dtype=torch.float64)]

        def matvec(self, v):
            return [H @ v[0]]

    m = as_operator(Minimal())
    assert isinstance(m, Operator)
    assert (m.param_names, m.num_params, m.vector_dtype, m.method) == (
        ["0"],
        2,
        torch.float64,
        "custom",
    )
    assert m.extra == 7
    x = torch.ones(2, dtype=torch.float64)
    assert torch.equal((m @ [x])[0], H @ x)
    with pytest.raises(TypeError, match="square matrix"):
        as_operator("H")
    with pytest.raises(ValueError, match="square matrix"):
        as_operator(np.zeros((2, 3)))


def test_algorithms_give_the_same_answer_on_a_double_and_on_a_matrix():
    """Every algorithm sees operators only through the contract: CG on DenseOperator(H), on H
    itself and on a minimal test double gives identical iterates."""
    H = known_spectrum_matrix(np.linspace(1, 3, 6))
    b = [torch.ones(6, dtype=torch.float64)]

    class Double:
        def __init__(self):
            self.params = [torch.zeros(6, dtype=torch.float64)]

        def matvec(self, v):
            return [H @ v[0]]

    xs = [hs.cg_solve(o, b, tol=0.0, max_iter=4)[0][0] for o in (DenseOperator(H), H, Double())]
    assert torch.equal(xs[0], xs[1]) and torch.equal(xs[0], xs[2])
