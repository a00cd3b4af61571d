"""Results of a command-line run ↔ ``result.json`` (written atomically).

``result.json`` holds everything needed to redo or re-plot a run:

- ``command``, ``argv`` (the command line), ``config`` (the frozen run configuration: every
  resolved option), ``status`` (``STATUSES``: ``running`` / ``complete`` / ``not_converged`` /
  ``interrupted`` / ``failed``), ``created`` / ``updated`` (UTC);
- ``versions`` (python, torch, transformers, numpy, hessian_spectra, platform);
- ``model`` (spec, source, dtype, device, ``num_params``), ``data`` (source, tokens, batches),
  ``world_size``, ``threads`` (CPU threads used and the rule that chose them);
- ``operator`` (method, requested ``eps``, ``eps_unit``: the default step for the first unit probe,
  ``loss`` and ``grad_norm`` at θ);
- ``timings`` (``seconds_per_hvp``, ``seconds_per_gradient``, counts, load and total seconds)
  and ``memory`` (``peak_rss_bytes`` of this process, ``cuda_peak_bytes``);
- the estimate: ``density`` (``SpectralDensity.to_dict()``: per-probe ``alpha``, ``beta``,
  ``ritz_values`` = nodes, ``ritz_weights`` = weights), ``eigs``, ``trace``, ``blockdiag``
  (``BlockDiagReport.to_dict()``), ``eps_sweep`` (rows of ``FDError``) or ``influence``
  (``InfluenceResult.to_dict()``);
- ``summary``: ``lambda_max``, ``lambda_min``, ``trace``, ``negative_mass`` (None where the
  command does not estimate it; for ``density`` the mass below ``-negative_mass_threshold``,
  with the raw ``negative_mass_below_zero`` beside it: ``SpectralDensity.summary()``) and more.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._io import atomic_write_text

__all__ = [
    "RESULT_FILE",
    "STATUSES",
    "RunResult",
    "atomic_write_text",
    "load_result",
    "peak_memory",
    "result_key",
    "versions",
]

RESULT_FILE = "result.json"
#: ``status`` values: a run is ``running`` until it ends ``complete``, ``not_converged`` (a result
#: that is not what was asked for, e.g. CG stopped early), ``interrupted`` (Ctrl-C, SIGTERM;
#: finished work saved) or ``failed`` (``error`` says why).
STATUSES = ("running", "complete", "not_converged", "interrupted", "failed")
SUMMARY_KEYS = ("lambda_max", "lambda_min", "trace", "negative_mass")
# The estimate keys of the commands that existed when result.json was first written: results
# keep them (null when not this command's) so that readers of older files find the same keys.
# A new command needs no entry here: its estimate is written under ``result_key(command)``.
_LEGACY_ESTIMATE_KEYS = ("density", "eigs", "trace", "blockdiag", "eps_sweep", "influence")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """Versions of the software a result depends on."""
    import numpy
    import torch

    from . import __version__

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "hessian_spectra": __version__,
        "platform": platform.platform(),
    }
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    return out


def peak_memory() -> dict:
    """Peak resident memory of this process (``getrusage`` maxrss) and peak CUDA allocation."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    out = {"peak_rss_bytes": int(rss_bytes), "cuda_peak_bytes": None}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001, S110 - memory reporting must never fail a run
        pass
    return out


def _clean(x):
    """JSON-safe: numpy scalars/arrays to Python, non-finite floats to None."""
    try:
        import numpy as np

        if isinstance(x, np.ndarray):
            return _clean(x.tolist())
        if isinstance(x, np.generic):
            return _clean(x.item())
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


def result_key(command: str) -> str:
    """The top-level key of ``result.json`` that holds a command's estimate
    (``"eps-sweep"`` -> ``"eps_sweep"``).

    >>> result_key("eps-sweep")
    'eps_sweep'
    """
    return command.replace("-", "_")


@dataclass
class RunResult:
    """One command-line run (the module docstring lists the fields).

    ``estimate`` is the command's result (a JSON-able dict); ``to_dict()`` writes it under
    ``result_key(command)`` (``density``, ``eigs``, ``trace``, ``blockdiag``, ``eps_sweep``,
    ``influence``, ...), the key ``result.json`` has always used.

    >>> r = RunResult(command="trace", estimate={"estimate": 2.0}, summary={"trace": 2.0})
    >>> d = r.to_dict()
    >>> d["trace"], d["density"], d["summary"]["trace"]
    ({'estimate': 2.0}, None, 2.0)
    >>> RunResult.from_dict(d).estimate
    {'estimate': 2.0}
    """

    command: str
    argv: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    status: str = "running"
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    versions: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    world_size: int = 1
    threads: dict = field(default_factory=dict)
    operator: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    estimate: dict | None = None
    summary: dict = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self):
        if not isinstance(self.command, str) or not self.command.replace("-", "_").isidentifier():
            raise ValueError(
                f"a result's command must be a command name such as 'density', got {self.command!r}"
            )
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        for k in SUMMARY_KEYS:
            self.summary.setdefault(k, None)

    def to_dict(self) -> dict:
        """The ``result.json`` dict (JSON-safe: numpy to Python, non-finite floats to None)."""
        d = {k: v for k, v in asdict(self).items() if k != "estimate"}
        out = {}
        for k, v in d.items():  # keep the historical key order: estimates before the summary
            if k == "summary":
                out.update({key: None for key in _LEGACY_ESTIMATE_KEYS})
                out[result_key(self.command)] = self.estimate
            out[k] = v
        return _clean(out)

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        """The inverse of ``to_dict`` (unknown keys are ignored)."""
        known = {f for f in cls.__dataclass_fields__} - {"estimate"}
        kw = {k: v for k, v in d.items() if k in known}
        return cls(**kw, estimate=d.get(result_key(str(d.get("command", "")))))

    def save(self, out_dir) -> Path:
        """Write ``out_dir/result.json`` atomically (updates ``updated`` and ``memory``)."""
        self.updated = _now()
        self.memory = peak_memory()
        path = Path(out_dir) / RESULT_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path


def load_result(path) -> dict:
    """The ``result.json`` dict of a run folder (or of the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULT_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"no {RESULT_FILE} in {str(path)!r}: is it the --out folder of a run?"
        )
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e.msg})") from None
