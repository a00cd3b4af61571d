"""The frozen run configuration: what the parser fills and every later step reads.

``RunConfig`` holds the options every analysis command shares (model, data, operator, run);
``options`` holds the command's own (a frozen dataclass defined next to the command). Nothing
changes it after it is built: ``method="auto"`` and the other defaults that depend on the world
size are resolved before (``from_namespace``). ``to_dict()`` is ``result.json``'s ``config``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .._checks import DTYPES, check_positive_int
from ..data import DataConfig
from .options import DEFAULTS

__all__ = ["CURVATURES", "PARALLEL_SETUPS", "RunConfig", "from_namespace", "resolve_parallel"]

_METHODS = ("fd", "exact", "jvp")
PARALLEL_SETUPS = ("none", "fsdp", "hsdp", "dp")
CURVATURES = ("hessian", "ggn", "ef")
# run settings that are not part of the analysed problem, hence not in result.json's config
_NOT_SAVED = ("options", "threads", "quiet", "debug")


@dataclass(frozen=True)
class RunConfig:
    """One run of an analysis command, fully resolved (module docstring).

    >>> cfg = RunConfig(command="trace", seq_len=64)
    >>> cfg.data_config().seq_len, cfg.to_dict()["method"]
    (64, 'exact')
    """

    command: str
    """The command name (``density``, ``eigs``, ...)."""
    model: str = "embedded"
    """Model spec: embedded, a Hugging Face id or folder, a .gguf file, or module:factory."""
    dtype: str = "float32"
    """Parameter dtype name (``_checks.DTYPES``)."""
    attn_implementation: str | None = None
    """transformers attention kernel (None: the model's)."""
    device: str | None = None
    """Device to load on (None: CUDA if available, else CPU; a factory's model stays put)."""
    device_map: str | None = None
    """accelerate device map (e.g. ``auto``), one process only."""
    trust_remote_code: bool = False
    """Allow a checkpoint's own modelling code."""
    allow_download: bool = False
    """Let transformers download a hub id missing from the local cache."""
    data: str | None = None
    """Text data path, dataset name or built-in source (``builtin:prose``,
    ``builtin:python-code``; None: the embedded prose)."""
    text_field: str = "text"
    """JSONL / dataset field holding the text."""
    split: str = "train"
    """Hugging Face dataset split."""
    seq_len: int = DEFAULTS["seq_len"]
    """Tokens per row."""
    batch_size: int = DEFAULTS["batch_size"]
    """Rows per batch."""
    num_batches: int | None = None
    """First N batches (None: ``DEFAULTS['num_batches']`` unless ``subsample``)."""
    subsample: float | None = None
    """Fraction (0, 1] of all batches, evenly spaced."""
    loss_on: str = "all"
    """``all`` tokens or ``completion`` tokens only (JSONL pairs, ``builtin:python-code``)."""
    prompt_field: str = "prompt"
    """JSONL prompt field (``loss_on="completion"``)."""
    completion_field: str = "completion"
    """JSONL completion field (``loss_on="completion"``)."""
    method: str = "exact"
    """HVP method, resolved: ``fd``, ``exact`` or ``jvp``."""
    eps: float | None = None
    """Fixed fd step (None: the per-direction default)."""
    max_fd_error: float | None = None
    """Refuse fd products whose estimated relative error exceeds this (None: no threshold)."""
    stencil: str = "central"
    """fd formula: ``central`` or ``four-point``."""
    train_mode: bool = False
    """Analyse the train-mode objective."""
    curvature: str = "hessian"
    """The matrix analysed: ``hessian``, ``ggn`` (generalised Gauss–Newton) or ``ef``
    (empirical Fisher)."""
    params: tuple | None = None
    """Names of the parameters to analyse (None: all)."""
    parallel: str = "none"
    """How the model is spread over the ranks under torchrun: ``fsdp``, ``hsdp`` or ``dp``
    (``none``: one process, nothing to spread)."""
    replicate: int | None = None
    """Copies of the model (1 for fsdp, the world size for dp, R for hsdp; None in one
    process)."""
    seed: int = 0
    """Probe s uses seed + s."""
    out: str = "runs/out"
    """Output folder."""
    threads: int | None = None
    """torch CPU threads (None: one per free core, see ``threads.choose_threads``)."""
    quiet: bool = False
    """No progress bars."""
    debug: bool = False
    """Full tracebacks and library logging."""
    options: object = None
    """The command's own options (a frozen dataclass of its module)."""

    def __post_init__(self):
        for name in ("seq_len", "batch_size") + (("num_batches",) if self.num_batches else ()):
            check_positive_int(name, getattr(self, name))
        if self.threads is not None:
            check_positive_int("threads", self.threads)
        if self.dtype not in DTYPES:
            raise ValueError(
                f"dtype must be one of float32, float64, bfloat16, float16, got {self.dtype!r}"
            )
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS} once resolved, got {self.method!r}")
        if self.eps is not None and not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be a positive finite number or None, got {self.eps!r}")
        if self.max_fd_error is not None and not (
            self.max_fd_error > 0 and math.isfinite(self.max_fd_error)
        ):
            raise ValueError(
                f"max_fd_error must be a positive finite number or None, got {self.max_fd_error!r}"
            )
        if self.stencil not in ("central", "four-point"):
            raise ValueError(f"stencil must be 'central' or 'four-point', got {self.stencil!r}")
        if self.subsample is not None and not (0 < self.subsample <= 1):
            raise ValueError(f"subsample must be a fraction in (0, 1], got {self.subsample!r}")
        if self.num_batches is not None and self.subsample is not None:
            raise ValueError("give either num_batches or subsample, not both")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.parallel not in PARALLEL_SETUPS:
            raise ValueError(f"parallel must be one of {PARALLEL_SETUPS}, got {self.parallel!r}")
        if self.loss_on not in ("all", "completion"):
            raise ValueError(f"loss_on must be 'all' or 'completion', got {self.loss_on!r}")
        if self.params is not None and not isinstance(self.params, tuple):
            object.__setattr__(self, "params", tuple(self.params))  # hashable, still frozen

    def data_config(self, path: str | None = None) -> DataConfig:
        """The ``DataConfig`` of these options, for ``path`` (default: ``data``)."""
        num = self.num_batches if (self.num_batches or self.subsample) else DEFAULTS["num_batches"]
        return DataConfig(
            path=self.data if path is None else path,
            text_field=self.text_field,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            num_batches=num,
            subsample=self.subsample,
            loss_on=self.loss_on,
            prompt_field=self.prompt_field,
            completion_field=self.completion_field,
            split=self.split,
        )

    def to_dict(self) -> dict:
        """``result.json``'s ``config``: the shared options, then the command's (flat)."""
        d = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _NOT_SAVED
        }
        if d["params"] is not None:
            d["params"] = list(d["params"])
        if self.options is not None:
            d.update(
                self.options.to_dict()
                if hasattr(self.options, "to_dict")
                else dataclasses.asdict(self.options)
            )
        return d


def resolve_parallel(parallel: str | None, replicate: int | None, world_size: int):
    """``(parallel, replicate)`` as run: ``("none", None)`` in one process, else the setup
    (default ``fsdp``) and its number of copies; a ``ValueError`` naming the flag for a setting
    that cannot work (also in one process, where ``--replicate 2`` cannot be honoured).

    >>> resolve_parallel(None, None, 4), resolve_parallel("hsdp", 2, 4)
    (('fsdp', 1), ('hsdp', 2))
    >>> resolve_parallel("dp", None, 1)
    ('none', None)
    """
    from ..distributed import replicate_size

    if replicate is not None and parallel != "hsdp":
        raise ValueError(
            f"--replicate {replicate} applies to --parallel hsdp (got --parallel "
            f"{parallel or 'fsdp (the default)'})"
        )
    setup = parallel or "fsdp"
    R = replicate_size(setup, replicate, world=world_size)  # its words become flags (errors)
    return ("none", None) if world_size == 1 else (setup, R)


def from_namespace(ns, command, world_size: int) -> RunConfig:
    """A ``RunConfig`` from parsed arguments; ``command`` resolves its options and method."""
    shared = {f.name for f in dataclasses.fields(RunConfig)} - {"command", "options", "method"}
    kw = {k: getattr(ns, k) for k in shared if hasattr(ns, k)}
    kw["parallel"], kw["replicate"] = resolve_parallel(
        getattr(ns, "parallel", None), getattr(ns, "replicate", None), world_size
    )
    method = ns.method if ns.method != "auto" else ("fd" if world_size > 1 else "exact")
    options = command.options_from(ns, world_size)
    method, eps = command.resolve_method(method, kw.get("eps"))
    return RunConfig(command=command.name, method=method, options=options, **{**kw, "eps": eps})
