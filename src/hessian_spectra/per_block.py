"""Per-block spectra: the SLQ density of each diagonal block ``H_bb`` of an operator.

For a block ``b`` (a group of parameters, by default one transformer layer, as in the
block-diagonal test) with ``P_b`` the injection of its coordinates into the whole parameter
space, ``H_bb = P_bᵀ H P_b`` is the curvature of the loss in that block's parameters alone,
the others held fixed. :class:`BlockOperator` applies it with one product of the whole operator
on the vector padded with zeros (the "masked vector": its product, read on block ``b``); it is an
operator itself, so ``slq``, ``lanczos``, ``top_eigenvalues`` and ``trace`` run on it, and
:func:`per_block_slq` runs SLQ on each block. Works on any operator (Hessian, GGN, empirical
Fisher, fd or exact, sharded or not); probes are seeded by parameter name, so block ``b``'s
probe is the restriction of the whole operator's probe.

Blocks are given as parameter names or glob patterns (``"model.layers.3.*"``), see
:func:`select_params`.

>>> import torch
>>> from hessian_spectra.testing import make_problem
>>> import hessian_spectra as hs
>>> op = hs.HessianOperator(*make_problem("mlp"), method="exact")
>>> dens = per_block_slq(op, 8, 1, blocks={"fc1": ["fc1.*"], "fc2": ["fc2.*"]})
>>> {name: d.num_params for name, d in dens.items()}
{'fc1': 30, 'fc2': 21}
"""

from __future__ import annotations

import fnmatch

import torch

from . import distributed as _dist
from ._checks import check_positive_int
from ._progress import progress_bar
from .blockdiag import default_blocks
from .density import SpectralDensity, slq
from .linop import as_operator
from .vectors import Vector, check_vector

__all__ = ["BlockOperator", "per_block_slq", "resolve_blocks", "select_params"]


def select_params(names, patterns) -> list[str]:
    """The names in ``names`` (in their order) that equal or match (``fnmatch`` glob) any of
    ``patterns``; a pattern that matches nothing is an error.

    >>> select_params(["a.0.w", "a.1.w", "b.w"], ["a.*", "b.w"])
    ['a.0.w', 'a.1.w', 'b.w']
    """
    names = list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ValueError("no parameter names or patterns given: name at least one")
    hit = set()
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"parameter patterns must be strings, got {type(pat).__name__}")
        found = {n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)}
        if not found:
            near = [n for n in names if pat.strip("*?[]") in n][:5]
            hint = f" Names containing it: {near}." if near else ""
            raise ValueError(
                f"{pat!r} matches no parameter name.{hint} Names are those of "
                "model.named_parameters() (e.g. 'model.layers.3.*' for one layer)."
            )
        hit |= found
    return [n for n in names if n in hit]


def resolve_blocks(names, blocks=None) -> dict[str, list[str]]:
    """``{block name: [parameter names]}`` from ``blocks``: ``None`` (one block per transformer
    layer, :func:`~hessian_spectra.default_blocks`), a dict of name -> names/patterns, or a list
    of groups of names/patterns (named ``block0``, ``block1``, ...).

    >>> resolve_blocks(["h.0.w", "h.1.w", "head.w"], [["h.*"], ["head.w"]])
    {'block0': ['h.0.w', 'h.1.w'], 'block1': ['head.w']}
    """
    names = list(names)
    if blocks is None:
        return default_blocks(names)
    if isinstance(blocks, dict):
        items = list(blocks.items())
    elif isinstance(blocks, (list, tuple)):
        items = [(f"block{i}", g) for i, g in enumerate(blocks)]
    else:
        raise TypeError(
            f"blocks must be None, a dict of name -> parameter names/patterns, or a list of "
            f"groups; got {type(blocks).__name__}"
        )
    if not items:
        raise ValueError("blocks is empty: give at least one group of parameters")
    return {str(k): select_params(names, g) for k, g in items}


class BlockOperator:
    """The diagonal block ``H_bb`` of ``op`` on the parameters ``names`` (module docstring).

    Args:
        op: any operator (``as_operator`` takes it).
        names: the block's parameter names (a subset of ``op.param_names``; globs allowed).

    >>> import torch
    >>> from hessian_spectra.testing import make_problem
    >>> import hessian_spectra as hs
    >>> op = hs.HessianOperator(*make_problem("mlp"), method="exact")
    >>> blk = BlockOperator(op, ["fc2.*"])
    >>> blk.param_names, blk.num_params
    (['fc2.weight', 'fc2.bias'], 21)
    """

    def __init__(self, op, names):
        self.op = as_operator(op)
        chosen = set(select_params(self.op.param_names, names))
        self._index = [i for i, n in enumerate(self.op.param_names) if n in chosen]
        self.params = [self.op.params[i] for i in self._index]
        self.param_names = [self.op.param_names[i] for i in self._index]
        self.num_params = int(sum(p.numel() for p in self.params))  # global for DTensors
        self.vector_dtype = self.op.vector_dtype
        self.method = self.op.method
        self.eps = getattr(self.op, "eps", None)

    @property
    def shape(self) -> tuple[int, int]:
        """``(num_params, num_params)``."""
        return (self.num_params, self.num_params)

    def matvec(self, v: Vector) -> Vector:
        """``H_bb v``: ``v`` padded with zeros to the whole operator's layout, one product,
        the block's part of the result.
        """
        v = check_vector(v, self.params, "v")
        full = [torch.zeros_like(_dist.local(p), dtype=self.vector_dtype) for p in self.op.params]
        for i, t in zip(self._index, v):
            full[i].copy_(t)
        hv = self.op.matvec(full)
        return [hv[i] for i in self._index]

    __matmul__ = matvec

    def __repr__(self):
        return (
            f"BlockOperator(num_params={self.num_params}, tensors={len(self.params)}, "
            f"of={self.op!r})"
        )


def per_block_slq(
    op,
    num_steps: int,
    num_probes: int,
    *,
    blocks=None,
    seed: int = 0,
    reorth="full",
    basis_dtype=None,
    progress: bool = False,
) -> dict[str, SpectralDensity]:
    """The SLQ density of each diagonal block ``H_bb`` (module docstring): ``{block name:
    SpectralDensity}``, each from ``num_probes`` Lanczos runs of ``min(num_steps, block
    dimension)`` steps on :class:`BlockOperator` (one product of ``op`` per step). ``blocks`` as
    in :func:`resolve_blocks`. Each density's ``config`` records its block's parameter names.

    Cost: ``num_blocks · num_probes · num_steps`` products of ``op``.
    """
    op = as_operator(op)
    num_steps = check_positive_int("num_steps", num_steps)
    num_probes = check_positive_int("num_probes", num_probes)
    groups = resolve_blocks(op.param_names, blocks)
    out: dict[str, SpectralDensity] = {}
    with progress_bar(progress, total=len(groups), desc="blocks", unit="block") as bar:
        for name, names in groups.items():
            blk = BlockOperator(op, names)
            dens = slq(
                blk,
                min(num_steps, blk.num_params),
                num_probes,
                seed=seed,
                reorth=reorth,
                basis_dtype=basis_dtype,
                progress=progress,
            )
            dens.config["block"] = name
            dens.config["params"] = list(blk.param_names)
            out[name] = dens
            if bar is not None:
                bar.update(1)
    return out
