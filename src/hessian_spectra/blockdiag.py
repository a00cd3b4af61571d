"""The block-diagonal hypothesis test (FSHP §6, Tables 6 and 7).

For a unit probe ``v``, ``h = H v``; for each block ``b`` (by default one transformer layer),
``h_b = H v^(b)`` with ``v^(b)`` the probe masked to block ``b``. If ``H`` were block diagonal,
``(h)^(b) == (h_b)^(b)``. Per block and probe:

    abs_error = ||(h)^(b) − (h_b)^(b)||      (FSHP's ||H_block v − Hv|| on block b),
    rel_error = abs_error / ||(h)^(b)||,      cosine((h)^(b), (h_b)^(b)).

The statistics are FSHP Table 6's: mean ± std of each metric over the *layer* blocks and the
probes, pooled, and the number of layer blocks. By default the layer blocks are the transformer
layers (``...layers.N``, ``...h.N``, ``...blocks.N``); the other parameters (embeddings, final
norm, head, ...) form *extra* blocks, grouped by module, which are measured and reported as rows
of their own but left out of the layer statistics. A model without transformer layers (a plain
MLP) takes its module blocks as the layers (``config["layers_found"]`` is then False).
``BlockDiagReport.per_block()`` is the per-layer view (mean ± std over probes; FSHP notes the
last layer as the exception, Table 7). Standard deviations are population ones (``ddof=0``).

Cost: ``num_probes · (num_layers + num_extras + 1)`` HVPs.

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

__all__ = [
    "BlockDiagReport",
    "BlockRow",
    "block_diagonal_test",
    "default_blocks",
    "layer_blocks",
]

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer|block)\.\d+)\.")
_LAYER_NAME = re.compile(r"^(|.*\.)(?:layers|h|blocks|layer|block)\.(\d+)$")
METRICS = ("abs_error", "rel_error", "cosine")


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


def layer_blocks(names) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``default_blocks`` split into ``(layers, extras)``: the transformer-layer blocks in layer
    order (stack by stack, each by its index ``N``), and every other module block.

    >>> names = ["embed.weight", "model.layers.1.w", "model.layers.0.w", "norm.weight"]
    >>> layer_blocks(names)  # doctest: +NORMALIZE_WHITESPACE
    ({'model.layers.0': ['model.layers.0.w'], 'model.layers.1': ['model.layers.1.w']},
     {'embed': ['embed.weight'], 'norm': ['norm.weight']})
    """
    layers, extras, stacks = {}, {}, {}
    for b, members in default_blocks(names).items():
        m = _LAYER_NAME.match(b) if _LAYER.match(members[0]) else None
        if m:
            stacks.setdefault(m.group(1), len(stacks))
            layers[b] = (stacks[m.group(1)], int(m.group(2)), members)
        else:
            extras[b] = members
    order = sorted(layers, key=lambda b: layers[b][:2])
    return {b: layers[b][2] for b in order}, extras


def _layer_numbers(layers) -> dict[str, int]:
    """The layer index of each layer block: ``N`` of its name when those are distinct (one
    stack of layers), else its position (several stacks, or names without an index).
    """
    nums = [_LAYER_NAME.match(b) for b in layers]
    if all(nums) and len({int(m.group(2)) for m in nums}) == len(nums):
        return {b: int(m.group(2)) for b, m in zip(layers, nums)}
    return {b: i for i, b in enumerate(layers)}


def _stats(x) -> dict:
    """``{"mean", "std"}`` of the finite entries of ``x`` (NaN for none)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(x.mean()), "std": float(x.std())}


@dataclass(frozen=True)
class BlockRow:
    """One block's comparison for one probe.

    ``kind`` is ``"layer"`` (in the summary statistics) or ``"extra"`` (reported only);
    ``layer`` is the layer index of a layer block, None for an extra one. ``rel_error`` and
    ``cosine`` are NaN where ``(Hv)^(b)`` (or ``(H v^(b))^(b)``) is zero.
    """

    block: str
    probe: int
    num_params: int
    rel_error: float
    cosine: float
    abs_error: float
    kind: str = "layer"
    layer: int | None = None


@dataclass
class BlockDiagReport:
    """Rows of ``BlockRow`` (per probe: the layer blocks in layer order, then the extra ones),
    their summary and the run's configuration.
    """

    blocks: list[BlockRow]
    config: dict

    def summary(self) -> dict:
        """FSHP Table 6: each metric's mean ± std over the layer blocks and the probes, pooled.

        Keys: ``num_blocks`` (layer blocks), ``num_probes``, ``num_extra_blocks``,
        ``abs_error``/``rel_error``/``cosine`` as ``{"mean", "std"}`` over the layer rows,
        ``num_undefined`` (layer rows whose rel_error or cosine is NaN, left out of the means),
        and ``extra``: per extra block, the three metrics' ``{"mean", "std"}`` over the probes.
        """
        layers = [r for r in self.blocks if r.kind == "layer"]
        extras = list(dict.fromkeys(r.block for r in self.blocks if r.kind == "extra"))
        out = {
            "num_blocks": len({r.block for r in layers}),
            "num_probes": len({r.probe for r in self.blocks}),
            "num_extra_blocks": len(extras),
        }
        for key in METRICS:
            out[key] = _stats([getattr(r, key) for r in layers])
        out["num_undefined"] = sum(
            1 for r in layers if not (math.isfinite(r.rel_error) and math.isfinite(r.cosine))
        )
        out["extra"] = {
            b: {k: _stats([getattr(r, k) for r in self.blocks if r.block == b]) for k in METRICS}
            for b in extras
        }
        return out

    def per_block(self) -> list[dict]:
        """Per block, mean ± std of each metric over the probes (FSHP Table 7's per-layer view):
        layer blocks in layer order, then the extra blocks.

        Each entry: ``block``, ``kind``, ``layer``, ``num_params``, ``num_probes``, and
        ``abs_error``/``rel_error``/``cosine`` as ``{"mean", "std"}``.
        """
        names = list(dict.fromkeys(r.block for r in self.blocks))
        rows = {b: [r for r in self.blocks if r.block == b] for b in names}
        names.sort(key=lambda b: rows[b][0].kind != "layer")  # stable: layers first, in order
        return [
            {
                "block": b,
                "kind": rows[b][0].kind,
                "layer": rows[b][0].layer,
                "num_params": rows[b][0].num_params,
                "num_probes": len(rows[b]),
                **{k: _stats([getattr(r, k) for r in rows[b]]) for k in METRICS},
            }
            for b in names
        ]

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``config``, one dict per row in ``blocks``, ``per_block`` and
        ``summary``.
        """
        return {
            "config": self.config,
            "blocks": [asdict(r) for r in self.blocks],
            "per_block": self.per_block(),
            "summary": self.summary(),
        }


def _groups(blocks, prefix: str) -> dict[str, list[str]]:
    """``{name: [parameter names]}`` from a dict, or from a list of groups named ``prefix{i}``."""
    if isinstance(blocks, dict):
        return {str(k): list(v) for k, v in blocks.items()}
    return {f"{prefix}{i}": list(g) for i, g in enumerate(blocks)}


def _plan(names, blocks, extra_blocks):
    """``(layers, extras, layers_found)`` of ``block_diagonal_test``'s arguments."""
    if blocks is None:
        layers, extras = layer_blocks(names)
        found = bool(layers)
        if not found:  # a model without transformer layers: its module blocks are the layers
            layers, extras = extras, {}
    else:
        layers, extras, found = _groups(blocks, "block"), {}, True
    if extra_blocks is not None:
        extras = _groups(extra_blocks, "extra")
    return layers, extras, found


def block_diagonal_test(
    op,
    blocks=None,
    num_probes: int = 1,
    seed: int = 0,
    *,
    probe: str = "gaussian",
    extra_blocks=None,
) -> BlockDiagReport:
    """Compare ``Hv`` with its block-diagonal proxy, block by block (module docstring).

    Args:
        op: an operator (``HessianOperator``, ``DenseOperator``, anything ``as_operator`` takes);
            blocks are named by ``op.param_names``.
        blocks: the layer blocks: ``None`` (the transformer layers of :func:`layer_blocks`, or
            every module block of a model without them), a list of parameter-name groups
            (named ``block0``, ``block1``, ...), or a dict ``{block name: [parameter names]}``,
            in layer order. Parameters in no block are left out of every masked probe but
            still count in ``Hv``.
        num_probes: probes ``unit_probe(op, seed + s, kind=probe)`` (unit norm); the summary
            pools them with the layers.
        extra_blocks: blocks measured and reported (``kind="extra"``) but left out of the
            summary statistics, as a dict or a list of groups (named ``extra0``, ...). ``None``:
            with ``blocks=None`` the non-layer module blocks (embeddings, final norm, head),
            else none; ``{}``: none.

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
    >>> rep.config["layers_found"]  # no transformer layers: the module blocks are the layers
    False
    >>> rep = block_diagonal_test(TwoBlocks(H), blocks={"a": ["a"]}, extra_blocks={"b": ["b"]})
    >>> [(r.block, r.kind, r.layer) for r in rep.blocks], rep.summary()["num_blocks"]
    ([('a', 'layer', 0), ('b', 'extra', None)], 1)
    """
    op = as_operator(op)
    names = list(op.param_names)
    layers, extras, found = _plan(names, blocks, extra_blocks)
    index = {n: i for i, n in enumerate(names)}
    for b, members in {**layers, **extras}.items():
        if not members:
            raise ValueError(f"block {b!r} is empty")
        unknown = [m for m in members if m not in index]
        if unknown:
            raise ValueError(f"block {b!r} names parameters not in op.params: {unknown[:3]}")
    clash = sorted(set(layers) & set(extras))
    if clash:
        raise ValueError(f"block names {clash[:3]} are both layer and extra blocks: rename one")
    if not layers:
        raise ValueError("the block-diagonal test needs at least one layer block")
    if len(layers) + len(extras) < 2:
        raise ValueError("the block-diagonal test needs at least two blocks")
    num_probes = check_positive_int("num_probes", num_probes)
    numbers = _layer_numbers(layers) if blocks is None and found else None
    plan = [(b, "layer", (numbers or {}).get(b, i), m) for i, (b, m) in enumerate(layers.items())]
    plan += [(b, "extra", None, m) for b, m in extras.items()]

    rows = []
    for s in range(num_probes):
        v = unit_probe(op, seed + s, kind=probe, dtype=op.vector_dtype)
        h = op.matvec(v)
        for b, kind, layer, members in plan:
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
                    kind=kind,
                    layer=layer,
                )
            )
    config = {
        "num_probes": num_probes,
        "seed": seed,
        "probe": probe,
        "blocks": layers,
        "extra_blocks": extras,
        "layers_found": found,
        "method": op.method,
    }
    return BlockDiagReport(blocks=rows, config=config)
