"""A problem: a model, its loss and its batches, loaded from a model spec and a data config.

``load_problem`` is what the command line does before it builds an operator, and what a Python
user wants for the same models: one call from a spec (``models.parse_model_spec``) to
``(model, loss_fn, batches, info)``.

- A ``package.module:factory`` spec brings its own loss and batches; the data config is unused.
- Any other spec (embedded, Hugging Face id or folder, ``.gguf``) gets ``data.causal_lm_loss``
  and the batches of ``data`` (a ``DataConfig``; default: the embedded prose, one batch).

Under ``torchrun`` (``world_size > 1``) the batches are split over the ranks with
``partition.shard_batches``: nothing is dropped, a rank with fewer batches runs ``ZeroWeight``
padding, so the objective is the same at every world size. ``info`` describes the *global*
data (every rank's batches), the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import distributed as _dist
from .data import DataConfig, DataError, causal_lm_loss, count_target_tokens, make_batches
from .models import LoadedModel, load_model, max_positions, parse_model_spec, resolve_device
from .partition import shard_batches

__all__ = ["EMBEDDED_DATA", "Problem", "load_problem"]

EMBEDDED_DATA = "embedded:pydoc_data.topics"


@dataclass
class Problem:
    """What ``load_problem`` returns (also unpacks as ``model, loss_fn, batches, info``).

    Fields:
        model: the ``torch.nn.Module`` (eval mode; not sharded).
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, weight)``.
        batches: this rank's batches (all of them in one process).
        info: the global data: ``source``, ``num_batches`` and, for text data, ``config``
            (``DataConfig.to_dict()``) and ``target_tokens``; for ``builtin:python-code`` also
            ``python`` (the version) and ``pairs`` (pairs read, ``data.make_batches``).
        loaded: the ``LoadedModel`` (spec, tokenizer, source, load seconds, ...).
    """

    model: object
    loss_fn: object
    batches: list
    info: dict = field(default_factory=dict)
    loaded: LoadedModel | None = None

    def __iter__(self):
        return iter((self.model, self.loss_fn, self.batches, self.info))


def _split(batches, rank: int, world_size: int):
    """This rank's share of a sequence of batches (``shard_batches``); other iterables (a
    DataLoader) are read whole by every rank.
    """
    if world_size > 1 and isinstance(batches, (list, tuple)):
        return shard_batches(batches, rank, world_size)
    return batches


def load_problem(
    model="embedded",
    data: DataConfig | None = None,
    *,
    dtype="float32",
    attn_implementation=None,
    device=None,
    device_map=None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> Problem:
    """Load the model of the spec ``model`` and its data (module docstring).

    Args:
        model: a model spec string or ``ModelSpec`` (``models`` module docstring).
        data: how to build text batches (ignored by a factory spec); None: ``DataConfig()``
            with one batch of the embedded prose.
        dtype, attn_implementation, device, device_map, trust_remote_code, allow_download:
            as in ``models.load_model``; ``device`` None: CUDA when available (this rank's
            GPU under torchrun), else CPU; a factory's model moves only when ``device`` is given.
        rank, world_size: this process's share of the batches; default: the torchrun job's.

    Raises ``ModelError`` / ``DataError`` (both ``ValueError``) with what to do; ``seq_len``
    beyond the model's ``max_position_embeddings`` / ``n_positions`` is refused up front.

    >>> import sys, types
    >>> from hessian_spectra.testing import make_problem
    >>> mod = sys.modules["my_factories"] = types.ModuleType("my_factories")
    >>> mod.mlp = lambda: make_problem("mlp")  # a factory: () -> (model, loss_fn, batches)
    >>> model, loss_fn, batches, info = load_problem("my_factories:mlp")
    >>> info["source"], info["num_batches"] == len(batches)
    ('factory', True)
    """
    rank = _dist.rank() if rank is None else rank
    world_size = _dist.world_size() if world_size is None else world_size
    spec = parse_model_spec(model) if not hasattr(model, "kind") else model
    if spec.kind == "factory":
        lm = load_model(spec, dtype=dtype, device=device)
        n = len(lm.batches) if hasattr(lm.batches, "__len__") else None
        info = {"source": "factory", "num_batches": n}
        return Problem(lm.model, lm.loss_fn, _split(lm.batches, rank, world_size), info, lm)
    data = DataConfig(num_batches=1) if data is None else data
    device = resolve_device(device, device_map)  # default: CUDA when available, else CPU
    lm = load_model(
        spec,
        dtype=dtype,
        attn_implementation=attn_implementation,
        device=device,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        allow_download=allow_download,
    )
    limit = max_positions(lm.model)
    if limit is not None and data.seq_len > limit:
        raise DataError(
            f"seq_len {data.seq_len} exceeds the model's limit of {limit} positions "
            f"({_limit_name(lm.model)} in its config): use seq_len <= {limit}"
        )
    source_info: dict = {}  # a built-in code source: Python version, pairs used
    batches = make_batches(lm.tokenizer, data, info=source_info)  # the global data (all ranks)
    info = {
        "source": data.path or EMBEDDED_DATA,
        **source_info,
        "config": data.to_dict(),
        "num_batches": len(batches),
        "target_tokens": count_target_tokens(batches),
    }
    return Problem(lm.model, causal_lm_loss, _split(batches, rank, world_size), info, lm)


def _limit_name(model) -> str:
    cfg = getattr(model, "config", None)
    return next(
        (
            n
            for n in ("n_positions", "max_position_embeddings")
            if isinstance(getattr(cfg, n, None), int)
        ),
        "max_position_embeddings",
    )
