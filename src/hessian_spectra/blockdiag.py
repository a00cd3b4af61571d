"""The block-diagonal hypothesis test (FSHP §6).

For a unit probe ``v``, ``h = H v``; for each block ``b`` (a group of parameters, by default one
transformer layer), ``h_b = H v^(b)`` with ``v^(b)`` the probe masked to block ``b``. If ``H``
were block diagonal, ``(h)^(b) == (h_b)^(b)``. Per block and probe:

    rel_error = ||(h)^(b) − (h_b)^(b)|| / ||(h)^(b)||,   cosine((h)^(b), (h_b)^(b)),
    abs_error = ||(h)^(b) − (h_b)^(b)||.

Cost: ``num_probes · (num_blocks + 1)`` HVPs.

>>> import torch
>>> from hessian_spectra import DenseOperator
>>> H = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
>>> rep = block_diagonal_test(DenseOperator(H), blocks=[["x"], ["x"]])  # two copies of one block
>>> rep.summary()["rel_error"]["mean"]
0.0
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ._checks import check_positive_int
from .linop import as_operator
from .vectors import dot, norm, unit_probe

__all__ = ["BlockDiagReport", "BlockRow", "block_diagonal_test", "default_blocks"]

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer|block)\.\d+)\.")


def default_blocks(names) -> dict[str, list[str]]:
    """One block per transformer layer (``...layers.N.``, ``...h.N.``, ``...blocks.N.``), the
    other parameters grouped by their module (embeddings, final norm, head, ...).

    >>> names = ["model.layers.0.q.weight", "model.layers.0.k.weight",
    ...          "model.layers.1.q.weight", "lm_head.weight"]
    >>> default_blocks(names)  # doctest: +NORMALIZE_WHITESPACE
    {'model.layers.0': ['model.layers.0.q.weight', 'model.layers.0.k.weight'],
     'model.layers.1': ['model.layers.1.q.weight'], 'lm_head': ['lm_head.weight']}
    """
    out: dict[str, list[str]] = {}
    for n in names:
        m = _LAYER.match(n)
        key = m.group(1) if m else (n.rsplit(".", 1)[0] if "." in n else n)
        out.setdefault(key, []).append(n)
    return out


@dataclass(frozen=True)
class BlockRow:
    """One block's comparison for one probe."""

    block: str
    probe: int
    num_params: int
    rel_error: float
    cosine: float
    abs_error: float


@dataclass
class BlockDiagReport:
    """Rows of ``BlockRow`` (one per block and probe) and their summary."""

    blocks: list[BlockRow]
    config: dict

    def summary(self) -> dict:
        """Mean ± std over rows of each metric, and the number of blocks."""
        out = {"num_blocks": len({r.block for r in self.blocks})}
        for key in ("rel_error", "cosine", "abs_error"):
            x = np.array([getattr(r, key) for r in self.blocks], dtype=np.float64)
            out[key] = {"mean": float(np.nanmean(x)), "std": float(np.nanstd(x))}
        return out

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``config``, one dict per row in ``blocks``, and ``summary``."""
        return {
            "config": self.config,
            "blocks": [asdict(r) for r in self.blocks],
            "summary": self.summary(),
        }


def block_diagonal_test(
    op, blocks=None, num_probes: int = 1, seed: int = 0, *, probe: str = "gaussian"
) -> BlockDiagReport:
    """Compare ``Hv`` with its block-diagonal proxy, block by block (module docstring).

    Args:
        op: an operator (``HessianOperator``, ``DenseOperator``, anything ``as_operator`` takes);
            blocks are named by ``op.param_names``.
        blocks: ``None`` (``default_blocks``), a list of parameter-name groups, or a dict
            ``{block name: [parameter names]}``. Parameters in no block are left out of every
            masked probe but still count in ``Hv``.
        num_probes: probes ``unit_probe(op, seed + s, kind=probe)`` (unit norm).

    >>> import torch
    >>> from hessian_spectra import DenseOperator
    >>> class TwoBlocks(DenseOperator):  # H on two parameters a (2 entries) and b (1 entry)
    ...     def __init__(self, H):
    ...         super().__init__(H)
    ...         self.params = [torch.zeros(2, dtype=H.dtype), torch.zeros(1, dtype=H.dtype)]
    ...         self.param_names = ["a", "b"]
    ...     def matvec(self, v):
    ...         y = self.H @ torch.cat(v)
    ...         return [y[:2], y[2:]]
    >>> H = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    >>> rep = block_diagonal_test(TwoBlocks(H))  # a and b do not couple: H is block diagonal
    >>> [r.block for r in rep.blocks], [r.rel_error for r in rep.blocks]
    (['a', 'b'], [0.0, 0.0])
    """
    op = as_operator(op)
    names = list(op.param_names)
    if blocks is None:
        groups = default_blocks(names)
    elif isinstance(blocks, dict):
        groups = {str(k): list(v) for k, v in blocks.items()}
    else:
        groups = {f"block{i}": list(g) for i, g in enumerate(blocks)}
    index = {n: i for i, n in enumerate(names)}
    for b, members in groups.items():
        if not members:
            raise ValueError(f"block {b!r} is empty")
        unknown = [m for m in members if m not in index]
        if unknown:
            raise ValueError(f"block {b!r} names parameters not in op.params: {unknown[:3]}")
    if len(groups) < 2:
        raise ValueError("the block-diagonal test needs at least two blocks")
    num_probes = check_positive_int("num_probes", num_probes)

    rows = []
    for s in range(num_probes):
        v = unit_probe(op, seed + s, kind=probe, dtype=op.vector_dtype)
        h = op.matvec(v)
        for b, members in groups.items():
            idx = [index[m] for m in members]
            inside = set(idx)
            vb = [t if i in inside else torch.zeros_like(t) for i, t in enumerate(v)]
            hb = op.matvec(vb)
            hr = [h[i] for i in idx]  # (h)^(b)
            hbr = [hb[i] for i in idx]  # (h_b)^(b)
            d = [a - c for a, c in zip(hr, hbr)]
            nh, nhb = norm(hr), norm(hbr)
            hbh, dd = dot(hbr, hr), dot(d, d)
            err = math.sqrt(max(dd, 0.0))
            rows.append(
                BlockRow(
                    block=b,
                    probe=s,
                    num_params=int(sum(op.params[i].numel() for i in idx)),
                    rel_error=err / nh if nh > 0 else float("nan"),
                    cosine=hbh / (nh * nhb) if nh > 0 and nhb > 0 else float("nan"),
                    abs_error=err,
                )
            )
    config = {
        "num_probes": num_probes,
        "seed": seed,
        "probe": probe,
        "blocks": groups,
        "method": op.method,
    }
    return BlockDiagReport(blocks=rows, config=config)
