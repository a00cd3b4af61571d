"""The state of a Lanczos run between two steps, and its checkpoint file.

After step ``j`` the recurrence (:func:`hessian_spectra.lanczos`) needs ``alpha_0 .. alpha_j``,
``beta_1 .. beta_{j+1}``, the next vector ``q_{j+1}``, the previous one ``q_j``, the vectors kept
for reorthogonalisation, the scale estimate of the breakdown test, the starting vector's norm
and the seconds spent so far: a :class:`LanczosState`.

**The checkpoint file** is one `safetensors <https://huggingface.co/docs/safetensors>`_ file,
written atomically (a reader never sees half a file, also after ``kill -9``):

- tensors, each one parameter's local piece of a vector, in the basis dtype:
  ``q.{i}`` (``q_{j+1}``), ``kept.{k}.{i}`` (the kept vectors the next step reorthogonalises
  against besides ``q_{j+1}``, oldest first: all of them, or the last ``r − 1`` of a window
  ``r``) and, only when none are kept, ``q_prev.{i}`` (otherwise ``q_j`` is the last kept
  vector). With an offloaded basis (``lanczos(..., basis_dir=...)``) the kept vectors stay in
  their raw files under ``basis_dir`` and the state lists them (``basis``: the file stem and
  the indices ``t``); they are checked (size) when the run resumes;
- metadata ``format`` = ``"hessian_spectra.lanczos_checkpoint"``, ``version`` = ``"1"`` and
  ``state``: JSON with the run's ``config`` and ``alpha``, ``beta``, ``scale``, ``v0_norm``,
  ``seconds`` (and its split ``matvec_seconds``, ``vector_seconds``, ``io_seconds``).

Reading it parses a JSON header and copies raw tensor bytes: nothing in the file is code, and
nothing is ever unpickled (a pickle in its place is refused, not run). Every field is checked
against the run that resumes (settings, step count, number of kept vectors, each tensor's shape
and dtype); a file that does not fit raises :class:`CheckpointError` naming the file and what to
do. Under ``torchrun`` every rank has its own file (``PATH.rank0``, ``PATH.rank1``, ...) and all
ranks must resume from the same step.

>>> import tempfile, pathlib, torch
>>> path = pathlib.Path(tempfile.mkdtemp()) / "lanczos.ckpt"
>>> q0 = [torch.tensor([0.6, 0.8], dtype=torch.float64)]
>>> q1 = [torch.tensor([0.8, -0.6], dtype=torch.float64)]
>>> state = LanczosState(alpha=[1.0], beta=[0.5], q=q1, q_prev=q0, kept=[q0], scale=1.5)
>>> save_checkpoint(path, state, {"num_steps": 2})
>>> back = load_checkpoint(path, {"num_steps": 2}, params=q0, dtype=torch.float64,
...                        num_kept=lambda n: n)
>>> back.alpha, back.beta, back.q[0].tolist()
([1.0], [0.5], [0.8, -0.6])
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as _save_file

from . import distributed as _dist
from ._checks import dtype_name
from ._io import atomic_write_with
from .vectors import Vector

__all__ = [
    "CheckpointError",
    "LanczosState",
    "checkpoint_path",
    "load_checkpoint",
    "resume",
    "save_checkpoint",
]

FORMAT = "hessian_spectra.lanczos_checkpoint"
VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from (not one, damaged, or another run's)."""


@dataclass
class LanczosState:
    """Everything the recurrence needs to take step ``num_steps`` (module docstring).

    Fields:
        alpha: ``alpha_0 .. alpha_{j}`` (float64 scalars as Python floats).
        beta: ``beta_1 .. beta_{j+1}`` (the last one normalised ``q``).
        q: the next Lanczos vector ``q_{j+1}`` (basis dtype).
        q_prev: ``q_j``, or None before the first step.
        kept: the vectors kept for reorthogonalisation, oldest first (may include ``q_prev``).
        scale: the largest ``|alpha| + beta + beta_prev`` seen (the breakdown test's ||H||).
        v0_norm: the norm of the starting vector.
        seconds: wall time spent by the steps so far.
        matvec_seconds, vector_seconds, io_seconds: its split (``LanczosResult``'s fields).
        basis_kept: with an offloaded basis (``basis_dir``), the indices ``t`` of the kept
            vectors, which stay in their files; ``kept`` is then empty.
    """

    alpha: list[float]
    beta: list[float]
    q: Vector
    q_prev: Vector | None
    kept: list[Vector] = field(default_factory=list)
    scale: float = 0.0
    v0_norm: float = 1.0
    seconds: float = 0.0
    matvec_seconds: float = 0.0
    vector_seconds: float = 0.0
    io_seconds: float = 0.0
    basis_kept: list[int] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        """The number of steps taken (``len(alpha)``)."""
        return len(self.alpha)


def checkpoint_path(checkpoint) -> Path | None:
    """This rank's checkpoint file: ``checkpoint`` itself in one process, ``<checkpoint>.rank<r>``
    under ``torch.distributed`` with more than one rank; None stays None.

    >>> checkpoint_path("runs/lanczos.ckpt").name
    'lanczos.ckpt'
    """
    if checkpoint is None:
        return None
    p = Path(checkpoint)
    if _dist.world_size() > 1:
        p = p.with_name(f"{p.name}.rank{_dist.rank()}")
    return p


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor (views of one buffer are fine: they do not overlap)."""
    return t.detach().cpu().contiguous()


def save_checkpoint(
    path, state: LanczosState, config: dict, *, basis_name: str | None = None
) -> None:
    """Write ``state`` and the run's ``config`` to ``path`` atomically (module docstring);
    ``basis_name``: the file stem of an offloaded basis whose ``state.basis_kept`` files the
    checkpoint references.
    """
    tensors = {f"q.{i}": _plain(t) for i, t in enumerate(state.q)}
    for k, vec in enumerate(state.kept):
        tensors.update({f"kept.{k}.{i}": _plain(t) for i, t in enumerate(vec)})
    if not state.kept and state.q_prev is not None:
        tensors.update({f"q_prev.{i}": _plain(t) for i, t in enumerate(state.q_prev)})
    scalars = {
        "config": config,
        "alpha": state.alpha,
        "beta": state.beta,
        "scale": state.scale,
        "v0_norm": state.v0_norm,
        "seconds": state.seconds,
        "matvec_seconds": state.matvec_seconds,
        "vector_seconds": state.vector_seconds,
        "io_seconds": state.io_seconds,
    }
    if basis_name is not None:
        scalars["basis"] = {"name": basis_name, "kept": [int(t) for t in state.basis_kept]}
    meta = {"format": FORMAT, "version": VERSION, "state": json.dumps(scalars)}
    atomic_write_with(path, lambda tmp: _save_file(tensors, str(tmp), metadata=meta))


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_checkpoint(
    path,
    config: dict,
    *,
    params,
    dtype: torch.dtype,
    num_kept: Callable[[int], int],
    basis_name: str | None = None,
) -> LanczosState:
    """The state in ``path``, checked against the run that resumes from it.

    Args:
        path: the checkpoint file (this rank's).
        config: the resuming run's settings; they must equal the ones the file was written with.
        params: the operator's parameters (each tensor's local shape and device).
        dtype: the basis dtype every stored vector must have.
        num_kept: ``num_kept(n)``: how many vectors the file holds after ``n`` steps.
        basis_name: the file stem of the run's offloaded basis (``basis_dir``), whose kept
            vectors the file references instead of holding them.

    Raises:
        CheckpointError: the file is not a checkpoint, is damaged, or does not fit this run.
    """
    path = Path(path)

    def fail(what: str, fix: str = "delete it to start the run afresh") -> CheckpointError:
        return CheckpointError(f"the Lanczos checkpoint {path} {what}; {fix}")

    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:  # a foreign or damaged file
        raise fail(
            f"is not a Lanczos checkpoint (a safetensors file written by "
            f"hessian_spectra.lanczos): {e}",
            "delete it, or pass another checkpoint path",
        ) from None
    with f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise fail(
                f"is not a Lanczos checkpoint of format {FORMAT} version {VERSION} "
                f"(its metadata says format={meta.get('format')!r}, "
                f"version={meta.get('version')!r})",
                "delete it, or pass another checkpoint path",
            )
        try:
            s = json.loads(meta.get("state", ""))
        except json.JSONDecodeError as e:
            raise fail(f"has unreadable JSON state ({e})") from None
        missing = [
            k
            for k in ("config", "alpha", "beta", "scale", "v0_norm", "seconds")
            if not isinstance(s, dict) or k not in s
        ]
        if missing:
            raise fail(f"lacks {', '.join(map(repr, missing))} in its JSON state")
        if s["config"] != config:
            raise fail(
                f"was written by a run with other settings ({s['config']} vs {config})",
                "delete it or use another path",
            )
        for key in ("scale", "v0_norm", "seconds"):
            if not _number(s[key]):
                raise fail(f"has {key}={s[key]!r} where a finite number is expected")
        alpha, beta = s["alpha"], s["beta"]
        if not all(isinstance(a, list) and all(map(_number, a)) for a in (alpha, beta)):
            raise fail("has alpha/beta that are not lists of finite numbers")
        n = len(alpha)
        if not 1 <= n == len(beta) or n >= config.get("num_steps", n + 1):
            raise fail(
                f"holds {n} alpha and {len(beta)} beta: a checkpoint after n steps "
                f"(1 ≤ n < num_steps={config.get('num_steps')}) holds n of each"
            )
        basis_kept: list[int] = []
        ref = s.get("basis")
        if (ref is None) != (basis_name is None):
            raise fail(
                "was written by a run whose basis was "
                + ("in memory" if ref is None else "offloaded to files (basis_dir)")
                + ", unlike this run's",
                "resume with the same basis_dir setting, or delete it",
            )
        if ref is not None:
            ok = isinstance(ref, dict) and ref.get("name") == basis_name
            basis_kept = ref.get("kept") if ok else None
            if not (
                isinstance(basis_kept, list)
                and all(isinstance(t, int) and 0 <= t < n for t in basis_kept)
            ):
                raise fail(f"references another offloaded basis ({ref!r:.120})")
        kept = num_kept(n)
        names = [f"q.{i}" for i in range(len(params))]
        names += [f"kept.{k}.{i}" for k in range(kept) for i in range(len(params))]
        if kept == 0:
            names += [f"q_prev.{i}" for i in range(len(params))]
        have = set(f.keys())
        if have != set(names):
            n_have = len({k.split(".")[1] for k in have if k.startswith("kept.")})
            raise fail(
                f"has tensors {sorted(have - set(names))[:4]} too many and "
                f"{sorted(set(names) - have)[:4]} missing (its kept basis has {n_have} vectors, "
                f"{kept} expected after {n} steps)"
            )
        tensors = {}
        for name in names:
            i = int(name.rsplit(".", 1)[1])
            t, loc = f.get_tensor(name), _dist.local(params[i])
            if tuple(t.shape) != tuple(loc.shape):
                raise fail(
                    f"has {name} of shape {tuple(t.shape)}, but parameter {i} has "
                    f"(local) shape {tuple(loc.shape)}"
                )
            if t.dtype != dtype:
                raise fail(
                    f"has {name} in dtype {dtype_name(t.dtype)}, but the basis dtype is "
                    f"{dtype_name(dtype)}"
                )
            tensors[name] = t.to(loc.device, copy=True)  # own, aligned memory, not the mmap

    def vector(prefix: str) -> Vector:
        return [tensors[f"{prefix}.{i}"] for i in range(len(params))]

    kept_vecs = [vector(f"kept.{k}") for k in range(kept)]
    return LanczosState(
        alpha=[float(a) for a in alpha],
        beta=[float(b) for b in beta],
        q=vector("q"),
        q_prev=kept_vecs[-1] if kept_vecs else vector("q_prev"),
        kept=kept_vecs,
        scale=float(s["scale"]),
        v0_norm=float(s["v0_norm"]),
        seconds=float(s["seconds"]),
        matvec_seconds=float(s.get("matvec_seconds", 0.0)),
        vector_seconds=float(s.get("vector_seconds", 0.0)),
        io_seconds=float(s.get("io_seconds", 0.0)),
        basis_kept=basis_kept,
    )


def resume(
    path: Path | None,
    config: dict,
    *,
    params,
    dtype: torch.dtype,
    num_kept: Callable[[int], int],
    basis_name: str | None = None,
) -> LanczosState | None:
    """The state to resume from: ``load_checkpoint`` when ``path`` exists, else None; under
    ``torch.distributed`` every rank must resume from the same step (else a ``ValueError`` on
    every rank, before any collective could hang).
    """
    if path is None:
        return None
    state, error = None, None
    if path.exists():
        try:
            state = load_checkpoint(
                path,
                config,
                params=params,
                dtype=dtype,
                num_kept=num_kept,
                basis_name=basis_name,
            )
        except CheckpointError as e:
            error = e
    _dist.check_agree(
        -2 if error is not None else -1 if state is None else state.num_steps,
        f"the Lanczos checkpoint step ({path}; -1: no file, -2: unusable file)",
        "A run stopped while the ranks were writing it: delete the checkpoint files to restart.",
    )
    if error is not None:
        raise error
    return state
