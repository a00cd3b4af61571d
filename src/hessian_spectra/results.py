"""Results of a command-line run ↔ ``result.json`` (written atomically).

``result.json`` holds everything needed to redo or re-plot a run:

- ``command``, ``argv`` (the command line), ``config`` (every resolved option), ``status``
  (``running`` / ``interrupted`` / ``complete`` / ``failed``), ``created`` / ``updated`` (UTC);
- ``versions`` (python, torch, transformers, numpy, hessian_spectra, platform);
- ``model`` (spec, source, dtype, device, ``num_params``), ``data`` (source, tokens, batches),
  ``world_size``;
- ``operator`` (method, requested ``eps``, ``eps_unit``: the default step for the first unit probe,
  ``loss`` and ``grad_norm`` at θ);
- ``timings`` (``seconds_per_hvp``, ``seconds_per_gradient``, counts, load and total seconds)
  and ``memory`` (``peak_rss_bytes`` of this process, ``cuda_peak_bytes``);
- the estimate: ``density`` (``SpectralDensity.to_dict()``: per-probe ``alpha``, ``beta``,
  ``ritz_values`` = nodes, ``ritz_weights`` = weights), ``eigs``, ``trace``, ``blockdiag``
  (``BlockDiagReport.to_dict()``), ``eps_sweep`` (rows of ``FDError``) or ``influence``
  (``InfluenceResult.to_dict()``);
- ``summary``: ``lambda_max``, ``lambda_min``, ``trace``, ``negative_mass`` (None where the
  command does not estimate it) and more.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import resource
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["RESULT_FILE", "RunResult", "atomic_write_text", "load_result", "peak_memory", "versions"]

RESULT_FILE = "result.json"
COMMANDS = ("density", "eigs", "trace", "blockdiag", "eps-sweep", "influence")
SUMMARY_KEYS = ("lambda_max", "lambda_min", "trace", "negative_mass")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


@dataclass
class RunResult:
    """One command-line run (module docstring lists the fields)."""

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
    operator: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    density: dict | None = None
    eigs: dict | None = None
    trace: dict | None = None
    blockdiag: dict | None = None
    eps_sweep: dict | None = None
    influence: dict | None = None
    summary: dict = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self):
        if self.command not in COMMANDS:
            raise ValueError(f"unknown command {self.command!r} in a result")
        for k in SUMMARY_KEYS:
            self.summary.setdefault(k, None)

    def to_dict(self) -> dict:
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

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
        raise FileNotFoundError(f"no {RESULT_FILE} in {str(path)!r}: is it the --out folder of a run?")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e.msg})") from None
