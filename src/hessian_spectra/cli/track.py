"""``hessian-spectra track``: λ_max (and the trace) of every saved checkpoint of a training run.

``--checkpoints DIR`` is either a folder of Hugging Face ``checkpoint-<step>`` folders (each
with ``model.safetensors``; the learning rate is read from its ``trainer_state.json``) or a
folder of ``*.safetensors`` state dicts whose names carry the step (``step_0100.safetensors``).
Nothing is unpickled: only safetensors files are read. The model (``--model``) gives the
architecture; each checkpoint's weights are loaded into it, in step order, and measured by one
:class:`~hessian_spectra.tracker.CurvatureTracker` (warm-started from the previous checkpoint's
top Ritz vectors). Writes ``track.json`` (one row per checkpoint) and ``track.png`` (λ_max and
2/lr where known against step; the trace on a second axis with ``--trace-matvecs``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .command import Command, Outcome, fmt
from .errors import CliError
from .options import positive_int

__all__ = ["Track", "TrackOptions", "find_checkpoints"]


@dataclass(frozen=True)
class TrackOptions:
    """The options of ``track``."""

    checkpoints: str | None = None
    """The folder of checkpoints."""
    k: int = 1
    """How many of the largest eigenvalues to track."""
    tol: float = 1e-3
    """Relative residual tolerance of each measurement."""
    max_matvecs: int = 100
    """Product budget of one warm (and of one cold) attempt."""
    cold_every: int = 10
    """A cold start every this many checkpoints (0: only when a warm run fails)."""
    trace_matvecs: int = 0
    """HVPs for a trace estimate at every checkpoint (0: none)."""

    def to_dict(self) -> dict:
        """The options as saved in result.json's config."""
        return asdict(self)


def _step_of(name: str) -> int | None:
    nums = re.findall(r"\d+", name)
    return int(nums[-1]) if nums else None


def _lr_of(folder: Path, step: int) -> float | None:
    """The learning rate logged at (or last before) ``step`` in ``trainer_state.json``."""
    f = folder / "trainer_state.json"
    if not f.is_file():
        return None
    try:
        hist = json.loads(f.read_text()).get("log_history", [])
    except (OSError, ValueError, AttributeError):
        return None
    best = None
    for row in hist:
        if isinstance(row, dict) and "learning_rate" in row and row.get("step", 0) <= step:
            if best is None or row["step"] >= best[0]:
                best = (row["step"], float(row["learning_rate"]))
    return best[1] if best and best[1] > 0 else None


def find_checkpoints(folder) -> list[dict]:
    """``[{"path", "step", "lr"}]`` in step order: HF ``checkpoint-*`` folders (their
    ``model.safetensors``) or ``*.safetensors`` files named with their step.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for n in ("step_20.safetensors", "step_3.safetensors"): (d / n).write_bytes(b"")
    0
    0
    >>> [c["step"] for c in find_checkpoints(d)]
    [3, 20]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CliError(f"--checkpoints {folder}: not a folder")
    found = []
    for sub in folder.glob("checkpoint-*"):
        f = sub / "model.safetensors"
        step = _step_of(sub.name)
        if sub.is_dir() and f.is_file() and step is not None:
            found.append({"path": str(f), "step": step, "lr": _lr_of(sub, step)})
    if not found:
        for f in folder.glob("*.safetensors"):
            step = _step_of(f.stem)
            if step is not None:
                found.append({"path": str(f), "step": step, "lr": None})
    if not found:
        raise CliError(
            f"--checkpoints {folder}: no checkpoints found: expected Hugging Face "
            "checkpoint-<step>/model.safetensors folders or <name><step>.safetensors files"
        )
    steps = [c["step"] for c in found]
    if len(set(steps)) != len(steps):
        raise CliError(f"--checkpoints {folder}: two checkpoints have the same step")
    return sorted(found, key=lambda c: c["step"])


def load_weights(model, path: str) -> None:
    """Load a safetensors state dict into ``model`` (tied weights may be missing)."""
    from safetensors.torch import load_file

    try:
        sd = load_file(path)
    except Exception as e:  # noqa: BLE001 - a corrupt file is the user's to fix
        raise CliError(f"--checkpoints: cannot read {path}: {e}") from None
    res = model.load_state_dict(sd, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[n].data_ptr() for n in sd if n in params}
    missing = [
        n for n in res.missing_keys if n not in params or params[n].data_ptr() not in loaded_ptrs
    ]
    if res.unexpected_keys or missing:
        raise CliError(
            f"--checkpoints: {path} does not fit --model: "
            f"missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}"
        )


class Track(Command):
    """The ``track`` command."""

    name = "track"
    help = "λ_max (warm-started Lanczos) of every saved checkpoint of a training run"
    description = (
        "Measure the largest Hessian eigenvalue (and optionally the trace) of every "
        "checkpoint in --checkpoints (Hugging Face checkpoint-<step> folders or "
        "<name><step>.safetensors files), in step order, each Lanczos run "
        "warm-started from the previous checkpoint's top Ritz vectors and stopped "
        "on its residual. Writes track.json and track.png (with 2/lr where the "
        "trainer state gives the learning rate)."
    )
    Options = TrackOptions

    def add_options(self, p) -> None:
        """``--checkpoints`` and the tracker's settings."""
        d = TrackOptions()
        p.add_argument(
            "--checkpoints",
            required=True,
            metavar="DIR",
            help="folder of checkpoint-<step> folders or *.safetensors files",
        )
        p.add_argument(
            "-k",
            "--k",
            type=positive_int,
            default=d.k,
            help=f"how many of the largest eigenvalues (default: {d.k})",
        )
        p.add_argument(
            "--tol",
            type=float,
            default=d.tol,
            help=f"relative residual tolerance (default: {d.tol:g})",
        )
        p.add_argument(
            "--max-matvecs",
            type=positive_int,
            default=d.max_matvecs,
            help=f"HVP budget of one attempt (default: {d.max_matvecs})",
        )
        p.add_argument(
            "--cold-every",
            type=int,
            default=d.cold_every,
            metavar="N",
            help=f"a cold start every N checkpoints (default: {d.cold_every}; 0: "
            "only when a warm run does not converge)",
        )
        p.add_argument(
            "--trace-matvecs",
            type=int,
            default=d.trace_matvecs,
            metavar="S",
            help="HVPs for an XTrace estimate at each checkpoint (default: 0, none)",
        )

    def check(self, config, world_size: int) -> None:
        """One process, the Hessian, sensible numbers."""
        o = config.options
        if world_size > 1:
            raise CliError("track runs in one process (not under torchrun) for now")
        if config.curvature != "hessian":
            raise CliError("track measures the Hessian: drop --curvature")
        if not (0 < o.tol < 1):
            raise CliError(f"--tol must be in (0, 1), got {o.tol}")
        if o.cold_every < 0 or o.trace_matvecs < 0:
            raise CliError("--cold-every and --trace-matvecs must be ≥ 0")

    def run(self, ctx) -> Outcome:
        """Load each checkpoint in turn and measure it with one warm-started tracker."""
        from .._io import atomic_write_text
        from ..tracker import CurvatureTracker

        o, cfg = ctx.config.options, ctx.config
        ckpts = find_checkpoints(o.checkpoints)
        model = ctx.problem.model
        tracker = CurvatureTracker(
            ctx.problem.loss_fn,
            ctx.problem.batches,
            every_n_steps=1,
            k=o.k,
            method=ctx.op.method,
            eps=cfg.eps,
            params=ctx.op.param_names,
            tol=o.tol,
            max_matvecs=o.max_matvecs,
            cold_every=o.cold_every,
            trace_every=1 if o.trace_matvecs else 0,
            trace_matvecs=max(o.trace_matvecs, 1),
            train_mode=cfg.train_mode,
            seed=cfg.seed,
        )
        rows = []
        for c in ckpts:
            load_weights(model, c["path"])
            m = tracker.measure(model, c["step"])
            inner = getattr(tracker.last_operator, "stats", None)
            if inner is not None and hasattr(ctx.op, "stats"):  # the run's HVP count and time
                for key in ("matvecs", "matvec_seconds"):
                    ctx.op.stats[key] += inner[key]
            m["checkpoint"] = c["path"]
            if c["lr"] is not None:
                m["lr"], m["two_over_lr"] = c["lr"], 2.0 / c["lr"]
            rows.append(m)
            ctx.log.info(
                "step %d: lambda_max %.6g (%s, %d HVPs, residual %.2g)",
                c["step"],
                m["lambda_max"],
                "warm" if m["warm"] else "cold",
                m["matvecs"],
                max(m["residuals"]),
            )
            ctx.publish({"measurements": rows}, {})
        estimate = {"measurements": rows, "tol": o.tol, "k": o.k}
        if ctx.rank0:
            atomic_write_text(ctx.out / "track.json", json.dumps(estimate, indent=1))
        bad = [r["step"] for r in rows if not r["converged"]]
        summary = {
            "checkpoints": len(rows),
            "lambda_max_last": rows[-1]["lambda_max"],
            "lambda_max_peak": max(r["lambda_max"] for r in rows),
            "matvecs": sum(r["matvecs"] for r in rows),
            "warm": sum(bool(r["warm"]) for r in rows),
        }
        if bad:
            return Outcome(
                estimate,
                summary,
                status="not_converged",
                problem=f"λ_max did not converge to --tol at step(s) {bad}; raise --max-matvecs",
            )
        return Outcome(estimate, summary)

    def summary_rows(self, result):
        """Checkpoints, the last and the peak λ_max, how many were warm-started."""
        s = result.summary
        return [
            ("checkpoints", str(s.get("checkpoints"))),
            ("lambda_max (last)", fmt(s.get("lambda_max_last"))),
            ("lambda_max (peak)", fmt(s.get("lambda_max_peak"))),
            ("warm starts", f"{s.get('warm')} of {s.get('checkpoints')}"),
        ]

    def figures(self, result: dict, out: Path) -> list[Path]:
        """``track.png``: λ_max (and 2/lr, the trace) against step."""
        est = result.get("track") or {}
        rows = est.get("measurements") or []
        if not rows:
            return []
        return [plot_track(rows, Path(out) / "track.png")]


def plot_track(rows: list[dict], path) -> Path:
    """λ_max against step, 2/lr dashed where known, the trace on a right axis if measured."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write_bytes

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, [r["lambda_max"] for r in rows], "o-", color="C0", label="λ_max")
    thr = [
        (r["step"], r["two_over_lr"])
        for r in rows
        if r.get("two_over_lr") is not None and math.isfinite(r["two_over_lr"])
    ]
    if thr:
        ax.plot(*zip(*thr), "--", color="C3", label="2/lr")
    ax.set_xlabel("step")
    ax.set_ylabel("λ_max")
    ax.grid(alpha=0.3)
    handles = ax.get_lines()
    if any("trace" in r for r in rows):
        ax2 = ax.twinx()
        tr = [(r["step"], r["trace"]) for r in rows if "trace" in r]
        handles = [*handles, *ax2.plot(*zip(*tr), "s:", color="C2", label="trace (right)")]
        ax2.set_ylabel("trace")
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_title("Sharpness during training", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
