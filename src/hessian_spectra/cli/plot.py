"""``hessian-spectra plot``: re-draw one saved run, or overlay several density runs."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from .errors import EXIT_OK, PROG, CliError, classify
from .options import positive_float

__all__ = ["add_plot_parser", "run_plot"]


def add_plot_parser(sub) -> None:
    pl = sub.add_parser(
        "plot",
        help="re-draw one saved run, or overlay several (density runs)",
        description="Re-draw the figures of saved runs from their result.json "
        "only. One DIR: figures are rewritten in DIR (or --out). "
        "Several: an overlay in --out.",
    )
    pl.add_argument("dirs", nargs="+", metavar="DIR", help="--out folders of earlier runs")
    pl.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where to write (default: DIR for one run, runs/overlay for several)",
    )
    pl.add_argument(
        "--labels",
        nargs="+",
        default=None,
        help="legend labels, one per DIR (default: model, method, eps, basis)",
    )
    pl.add_argument(
        "--sigma",
        type=positive_float,
        default=None,
        help="Gaussian smoothing width in eigenvalue units (default: 1%% of each "
        "run's spectral range)",
    )
    pl.add_argument("--debug", action="store_true", help="full tracebacks")


def run_plot(ns, commands) -> int:
    """Draw; every failure is one line on stderr (exit 2 for bad folders and files)."""
    try:
        for w in _plot(ns, commands):
            print(w)
        return EXIT_OK
    except Exception as e:  # noqa: BLE001
        code, msg = classify(e)
        if ns.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return code


def _plot(ns, commands) -> list:
    from ..plots import plot_density, plot_ritz
    from ..results import load_result
    from .outdir import prepare_out

    results = [load_result(d) for d in ns.dirs]
    if ns.labels is not None and len(ns.labels) != len(ns.dirs):
        raise CliError(f"--labels needs one label per DIR: got {len(ns.labels)} for {len(ns.dirs)}")
    if len(results) == 1:
        r = results[0]
        out = Path(ns.out or ns.dirs[0])
        prepare_out(out)
        if (ns.sigma is not None or ns.labels is not None) and r.get("density"):
            return [
                plot_density(r, out / "density.png", labels=ns.labels, sigma=ns.sigma),
                plot_ritz(r, out / "ritz.png", labels=ns.labels),
            ]
        command = commands.get(r.get("command"))
        if command is not None:
            written = command.figures(r, out)
        else:
            from ..plots import plot_result

            written = plot_result(r, out)
        if not written:
            raise CliError(f"{ns.dirs[0]} holds a {r.get('command')!r} run: nothing to draw")
        return written
    keep = [
        (r, d, lab)
        for r, d, lab in zip(results, ns.dirs, ns.labels or [None] * len(results))
        if r.get("density")
    ]
    if len(keep) < len(results):
        skipped = [str(d) for r, d in zip(results, ns.dirs) if not r.get("density")]
        print(
            f"{PROG}: note: skipping runs without a density: {', '.join(skipped)}", file=sys.stderr
        )
    if not keep:
        raise CliError("none of the runs has a spectral density to overlay")
    out = Path(ns.out or "runs/overlay")
    prepare_out(out)
    rs = [k[0] for k in keep]
    labels = [k[2] for k in keep] if ns.labels else None
    return [
        plot_density(rs, out / "density.png", labels=labels, sigma=ns.sigma),
        plot_ritz(rs, out / "ritz.png", labels=labels),
    ]
