"""The operator contract: what every algorithm of the package may rely on.

An *operator* is a symmetric linear map on parameter-space vectors (``list[Tensor]`` laid out
like ``op.params``; see :mod:`hessian_spectra.vectors`). Lanczos, SLQ, the eigenvalue and trace
estimators, CG, the block-diagonal test and influence use only the members of :class:`Operator`.
``HessianOperator`` meets it, so does :class:`DenseOperator` (a matrix, for tests and checks),
and so does any object of yours that has them; :func:`as_operator` also takes a square matrix,
or an object with just ``matvec`` and ``params`` (the other members are then filled in).

>>> import torch
>>> op = as_operator(torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)))
>>> op.num_params, op.method
(2, 'dense')
>>> op @ [torch.tensor([1.0, 1.0], dtype=torch.float64)]
[tensor([1., 2.], dtype=torch.float64)]
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .vectors import Vector, check_vector

__all__ = ["DenseOperator", "Operator", "as_operator"]


@runtime_checkable
class Operator(Protocol):
    """A symmetric linear operator on parameter-space vectors.

    Attributes:
        params: the tensors a vector is laid out like (under FSDP2, DTensors: vectors hold their
            local shards).
        param_names: one name per entry of ``params`` (seeds random probes, names blocks).
        num_params: the global dimension (whole model, not the local shard).
        vector_dtype: the dtype of the vectors ``matvec`` returns (float32 or float64).
        method: how a product is computed (``"fd"``, ``"exact"``, ``"jvp"``, ``"dense"``, ...),
            recorded in results.
    """

    params: list
    param_names: list
    num_params: int
    vector_dtype: torch.dtype
    method: str

    def matvec(self, v: Vector) -> Vector:
        """``H v``: a new vector in ``vector_dtype``."""
        ...

    def __matmul__(self, v: Vector) -> Vector:
        """Same as ``matvec``."""
        ...


class DenseOperator:
    """A symmetric matrix ``H`` (n, n) as an operator on one-tensor vectors ``[x]``.

    >>> import torch
    >>> DenseOperator(torch.eye(3, dtype=torch.float64)).num_params
    3
    """

    method = "dense"

    def __init__(self, H):
        H = torch.as_tensor(H)
        if H.ndim != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"a dense operator needs a square matrix, got shape {tuple(H.shape)}")
        self.H = H
        self.params = [torch.zeros(H.shape[0], dtype=H.dtype, device=H.device)]
        self.param_names = ["x"]
        self.num_params = int(H.shape[0])
        self.vector_dtype = H.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        return (self.num_params, self.num_params)

    def matvec(self, v: Vector) -> Vector:
        """``[H @ v[0]]``."""
        v = check_vector(v, self.params)
        return [self.H @ v[0].to(self.H.dtype)]

    __matmul__ = matvec

    def __repr__(self):
        return f"DenseOperator(n={self.num_params}, dtype={self.vector_dtype})"


class _Completed:
    """An object with ``matvec`` and ``params`` only, with the other members of ``Operator``
    filled in: names ``"0"``, ``"1"``, ..., the dimension from ``params``, float64 vectors for
    float64 parameters (else float32) and method ``"custom"``.
    """

    def __init__(self, obj):
        self._obj = obj
        self.params = list(obj.params)
        self.param_names = list(
            getattr(obj, "param_names", None) or [str(i) for i in range(len(self.params))]
        )
        self.num_params = int(
            getattr(obj, "num_params", None) or sum(p.numel() for p in self.params)
        )
        dts = {p.dtype for p in self.params}
        self.vector_dtype = getattr(obj, "vector_dtype", None) or (
            torch.float64 if dts == {torch.float64} else torch.float32
        )
        self.method = str(getattr(obj, "method", "custom"))

    def matvec(self, v: Vector) -> Vector:
        return self._obj.matvec(v)

    __matmul__ = matvec

    def __getattr__(self, name):  # anything else the wrapped object has (eps, stats, ...)
        return getattr(self._obj, name)


def as_operator(obj) -> Operator:
    """An :class:`Operator` from ``obj``: an operator as is, a square matrix (tensor or array) as
    a :class:`DenseOperator`, an object with ``matvec`` and ``params`` completed (module
    docstring); anything else is a ``TypeError``.
    """
    if isinstance(obj, Operator):
        return obj
    if hasattr(obj, "matvec") and hasattr(obj, "params"):
        return _Completed(obj)
    if isinstance(obj, torch.Tensor) or hasattr(obj, "__array__"):
        return DenseOperator(obj)
    raise TypeError(
        "expected an operator (HessianOperator, DenseOperator, or an object with .matvec and "
        f".params), or a square matrix; got {type(obj).__name__}"
    )
