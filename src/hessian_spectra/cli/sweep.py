"""``hessian-spectra sweep``: a grid of runs of one command, one cell per combination.

    hessian-spectra sweep COMMAND --vary OPTION=V1,V2,... [--vary ...] [COMMAND's options] --out DIR

The cells are the cartesian product of the ``--vary`` lists (any option of COMMAND: ``eps``,
``basis-dtype``, ``reorth``, ``subsample``, ``data``, ``model``, ``dtype``, ``method``, ...; a flag
such as ``per-block`` takes ``on``/``off``). Each cell is a normal run of COMMAND (the same
``main``, in this process) in its own folder ``DIR/NNN_OPTION=V_...``. A sweep is resumable cell
by cell: running the same command again keeps every cell whose ``result.json`` says ``complete``
with the same arguments, continues an interrupted cell with ``--resume`` where COMMAND has it
(``density``) and reruns it otherwise.

Writes ``DIR/sweep.json`` (after every cell): one row per cell with its options, folder, status,
exit code, ``lambda_max``, ``lambda_min``, ``trace``, ``negative_mass``, ``num_ghosts``,
``seconds``, and its distance to the reference cell (the first): ``w1_over_range``, the
Wasserstein-1 distance between the two SLQ measures (nodes and weights, averaged over probes)
divided by the spectral range of the two (max λ_max − min λ_min), and ``rel_diff_lambda_max``,
``rel_diff_lambda_min`` (``(x − x_ref) / |x_ref|``). ``DIR/sweep.png``: the densities, one panel
per combination of all but the last varied option, the last one overlaid in each panel (FSHP
Figs 3–6).

Every cell's command line is checked before the first one runs (a bad option value is exit
status 2 at once). Exit status: 0 when every cell is complete; else that of the first cell that
was not: an interruption (130/143) stops the sweep, any other failure (a model that does not
load, a numerical failure) goes on to the next cell.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import sys
from pathlib import Path

from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, PROG

__all__ = ["EXAMPLE", "add_sweep_parser", "parse_sweep", "run_sweep", "w1_over_range"]

log = logging.getLogger("hessian_spectra.cli")

EXAMPLE = """\
example: FSHP's eps x basis-precision study on the small test model (4 cells):
  hessian-spectra sweep density --vary eps=1e-4,1e-2 --vary basis-dtype=float32,bfloat16 \\
      --model factories:mlp --method fd --steps 20 --probes 2 --out runs/sweep
  (run it again after an interruption: finished cells are kept)
the reorthogonalisation ablation:
  hessian-spectra sweep density --vary reorth=full,none --steps 80 --out runs/reorth"""

DESCRIPTION = (
    "A grid of runs of COMMAND: the cartesian product of the --vary lists, each cell "
    "a normal run in its own folder under --out, resumable cell by cell. Writes "
    "sweep.json (one row per cell: options, lambda_max, lambda_min, trace, negative "
    "mass, ghosts, seconds, and the distance to the first cell: W1 between the "
    "densities over the spectral range, relative differences of the extremes) and "
    "sweep.png (the densities, overlays laid out as a grid). Every other option is "
    "passed to COMMAND unchanged."
)

_FLAG_VALUES = {
    "on": True,
    "true": True,
    "yes": True,
    "1": True,
    "off": False,
    "false": False,
    "no": False,
    "0": False,
}


class SweepUsageError(ValueError):
    """A malformed sweep command line (exit status 2)."""


def add_sweep_parser(sub, commands) -> None:
    """The ``sweep`` entry of the top-level parser (its help; ``parse_sweep`` reads the line)."""
    sp = sub.add_parser(
        "sweep",
        help="a grid of runs of one command (--vary OPTION=V1,V2)",
        description=DESCRIPTION,
        epilog=EXAMPLE,
        add_help=False,
        formatter_class=_raw(),
    )
    _sweep_arguments(sp, commands)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _sweep_arguments(p, commands) -> None:
    p.add_argument("-h", "--help", action="help", help="show this help message and exit")
    p.add_argument(
        "sweep_command",
        metavar="COMMAND",
        choices=sorted(commands),
        help="the command run in every cell: " + ", ".join(commands),
    )
    p.add_argument(
        "--vary",
        action="append",
        metavar="OPTION=V1,V2,...",
        default=[],
        help="an option of COMMAND (without --) and its values, comma-separated; "
        "repeat for more options (cells: the cartesian product)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="folder of the sweep (default: runs/sweep-COMMAND): one subfolder per "
        "cell, sweep.json, sweep.png",
    )


def _help_parser(commands):
    from .options import Parser

    p = Parser(
        prog=f"{PROG} sweep",
        description=DESCRIPTION,
        epilog=EXAMPLE,
        add_help=False,
        formatter_class=_raw(),
    )
    _sweep_arguments(p, commands)
    p.add_argument("options", nargs="*", metavar="...", help="COMMAND's options")
    return p


def _command_parser(command):
    """The sub-parser of ``command`` alone (to check option names and values)."""
    from .options import Parser, add_common

    p = Parser(prog=f"{PROG} {command.name}")
    add_common(p, command.out_default)
    command.add_options(p)
    return p


def parse_sweep(argv, commands) -> dict:
    """``{command, vary: [(option, [values])], out, rest}`` from the words after ``sweep``;
    a ``SweepUsageError`` for a malformed line.

    >>> from hessian_spectra.cli import COMMANDS
    >>> s = parse_sweep(["trace", "--vary", "probes=2,4", "--seed", "1"], COMMANDS)
    >>> s["command"], s["vary"], s["rest"], s["out"]
    ('trace', [('probes', ['2', '4'])], ['--seed', '1'], 'runs/sweep-trace')
    """
    argv = list(argv)
    if not argv or argv[0].startswith("-"):
        raise SweepUsageError(
            f"sweep needs the command to run first: one of "
            f"{', '.join(commands)} (e.g. `{PROG} sweep density --vary ...`)"
        )
    name = argv[0]
    if name not in commands:
        raise SweepUsageError(
            f"sweep: unknown command {name!r}: choose one of {', '.join(commands)}"
        )
    cmd = commands[name]
    parser = _command_parser(cmd)
    actions = parser._option_string_actions  # noqa: SLF001 - argparse's table of options
    vary, out, rest = [], None, []
    it = iter(argv[1:])
    for word in it:
        key, eq, val = word.partition("=")
        if key in ("--vary", "--out"):
            if not eq:
                val = next(it, None)
                if val is None:
                    raise SweepUsageError(f"sweep: {key} needs a value")
            if key == "--out":
                out = val
                continue
            opt, eq2, values = val.partition("=")
            opt = opt.lstrip("-")
            vals = [v.strip() for v in values.split(",")]
            if not eq2 or not opt or not all(vals):
                raise SweepUsageError(
                    f"sweep: --vary {val!r}: expected OPTION=V1,V2,... (e.g. eps=1e-4,1e-2)"
                )
            act = actions.get(f"--{opt}")
            if act is None or opt in ("out", "resume", "help"):
                raise SweepUsageError(
                    f"sweep: --vary {opt}: {name} has no option --{opt} that "
                    f"can be varied (see `{PROG} {name} --help`)"
                )
            if act.nargs == 0:
                bad = [v for v in vals if v.lower() not in _FLAG_VALUES]
                if bad:
                    raise SweepUsageError(
                        f"sweep: --vary {opt}: --{opt} is a flag; give on/off "
                        f"values, got {', '.join(bad)}"
                    )
            if any(o == opt for o, _ in vary):
                raise SweepUsageError(
                    f"sweep: --vary {opt} is given twice: list all its values in one --vary"
                )
            if len(set(vals)) != len(vals):
                raise SweepUsageError(f"sweep: --vary {opt}: a value is listed twice")
            vary.append((opt, vals))
        elif word == "--resume":
            continue  # the sweep decides which cell resumes
        else:
            rest.append(word)
    if not vary:
        raise SweepUsageError("sweep needs at least one --vary OPTION=V1,V2,...")
    for opt, _ in vary:
        flags = set(actions[f"--{opt}"].option_strings)
        if any(w.partition("=")[0] in flags for w in rest):
            raise SweepUsageError(f"sweep: --{opt} is both varied and given: drop one")
    return {
        "command": name,
        "vary": vary,
        "out": out or f"runs/sweep-{name}",
        "rest": rest,
        "flags": {o for o, _ in vary if actions[f"--{o}"].nargs == 0},
    }


def _cell_name(index: int, options: dict) -> str:
    parts = "_".join(f"{k}={v}" for k, v in options.items())
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9._=+-]", "-", parts)[:120]


def _cell_argv(spec: dict, options: dict, folder: Path) -> list[str]:
    argv = [spec["command"], *spec["rest"]]
    for k, v in options.items():
        if k in spec["flags"]:
            if _FLAG_VALUES[v.lower()]:
                argv.append(f"--{k}")
        else:
            argv += [f"--{k}", v]
    return [*argv, "--out", str(folder)]


def _load(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None


def _same_run(saved: dict, argv: list[str]) -> bool:
    old = [a for a in saved.get("argv", [])[1:] if a != "--resume"]
    return old == argv


def run_sweep(argv, commands) -> int:
    """Run the sweep given by the words after ``sweep`` (module docstring); the exit status."""
    if any(a in ("-h", "--help") for a in argv):
        _help_parser(commands).print_help()
        return EXIT_OK
    try:
        spec = parse_sweep(argv, commands)
    except SweepUsageError as e:
        print(f"{PROG} sweep: error: {str(e).removeprefix('sweep: ')}", file=sys.stderr)
        return EXIT_USAGE
    from . import main as cli_main

    out = Path(spec["out"])
    if out.exists() and not out.is_dir():
        print(f"{PROG} sweep: error: --out {str(out)!r} is a file, not a folder", file=sys.stderr)
        return EXIT_USAGE
    out.mkdir(parents=True, exist_ok=True)
    names = [o for o, _ in spec["vary"]]
    cells = [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in spec["vary"]))]
    resumable = commands[spec["command"]].resumable
    plans = [(out / _cell_name(i, o), o) for i, o in enumerate(cells)]
    plans = [(f, o, _cell_argv(spec, o, f)) for f, o in plans]
    from . import build_parser

    for _, options, argv_i in plans:  # every cell's line parses before anything runs
        try:
            build_parser().parse_args(argv_i)
        except SystemExit:
            print(
                f"{PROG} sweep: error: the cell {options} has a bad command line (above)",
                file=sys.stderr,
            )
            return EXIT_USAGE
    rows, code = [], EXIT_OK
    for i, (folder, options, argv_i) in enumerate(plans):
        saved = _load(folder)
        same = saved is not None and _same_run(saved, argv_i)
        if same and saved.get("status") == "complete":
            print(
                f"{PROG} sweep: cell {i + 1}/{len(cells)} {folder.name}: complete, kept",
                file=sys.stderr,
            )
            rc = EXIT_OK
        else:
            again = same and resumable and saved.get("status") in ("running", "interrupted")
            print(
                f"{PROG} sweep: cell {i + 1}/{len(cells)} {folder.name}"
                f"{' (resuming)' if again else ''}",
                file=sys.stderr,
            )
            rc = cli_main(argv_i + (["--resume"] if again else []))
        rows.append(_row(i, options, folder, rc))
        _write(out, spec, cells, rows)
        if rc != EXIT_OK and code == EXIT_OK:
            code = rc
        if rc in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            break
    done = _write(out, spec, cells, rows)
    print(_table(rows), file=sys.stderr)
    try:
        from ..plots import plot_sweep

        plot_sweep(done, {r["cell"]: _load(out / r["cell"]) for r in rows}, out / "sweep.png")
    except Exception as e:  # noqa: BLE001 - a figure must never lose the sweep
        print(f"{PROG} sweep: could not draw sweep.png: {e}", file=sys.stderr)
    print(
        f"{PROG} sweep: {sum(r['status'] == 'complete' for r in rows)}/{len(cells)} cell(s) "
        f"complete; {out / 'sweep.json'}",
        file=sys.stderr,
    )
    return code


def _table(rows: list) -> str:
    """One line per cell: name, status, the extremes, W1/range to the first cell."""

    def f(x, spec=".5g"):
        return "n/a" if x is None else format(x, spec)

    w = max([len(r["cell"]) for r in rows] + [4])
    lines = [
        f"{'cell':<{w}}  {'status':<13}  {'lambda_max':>11}  {'lambda_min':>11}  "
        f"{'W1/range':>9}  {'ghosts':>6}"
    ]
    lines += [
        f"{r['cell']:<{w}}  {r['status']:<13}  {f(r['lambda_max']):>11}  "
        f"{f(r['lambda_min']):>11}  {f(r.get('w1_over_range'), '.3g'):>9}  "
        f"{f(r['num_ghosts'], 'd'):>6}"
        for r in rows
    ]
    return "\n".join(lines)


def _row(i: int, options: dict, folder: Path, rc: int) -> dict:
    saved = _load(folder) or {}
    s = saved.get("summary") or {}
    t = saved.get("timings") or {}
    return {
        "index": i,
        "cell": folder.name,
        "options": dict(options),
        "status": saved.get("status", "missing"),
        "exit_code": rc,
        "lambda_max": s.get("lambda_max"),
        "lambda_min": s.get("lambda_min"),
        "trace": s.get("trace"),
        "negative_mass": s.get("negative_mass"),
        "num_ghosts": _ghosts(saved),
        "seconds": t.get("total_seconds"),
    }


def _ghosts(saved: dict) -> int | None:
    runs = (saved.get("density") or {}).get("runs") or (
        [saved["eigs"]["run"]] if (saved.get("eigs") or {}).get("run") else []
    )
    counts = [r.get("num_ghosts") for r in runs]
    return sum(counts) if counts and None not in counts else None


def _measure(saved: dict | None):
    """(nodes, weights) of a saved ``density`` run's SLQ measure (probes averaged), or None."""
    d = (saved or {}).get("density") or {}
    if not d.get("runs"):
        return None
    import numpy as np

    from ..density import SpectralDensity

    dens = SpectralDensity.from_dict(d)
    return (
        dens.nodes.reshape(-1),
        dens.weights.reshape(-1) / dens.num_probes,
        (np.min(dens.nodes), np.max(dens.nodes)),
    )


def w1_over_range(a, b) -> float:
    """The Wasserstein-1 distance between two discrete measures ``(nodes, weights)`` divided
    by the range they span together (0: identical; at most 1).

    >>> w1_over_range(([0.0, 1.0], [0.5, 0.5]), ([0.0, 1.0], [0.5, 0.5]))
    0.0
    >>> w1_over_range(([0.0], [1.0]), ([1.0], [1.0]))
    1.0
    """
    import numpy as np
    from scipy.stats import wasserstein_distance

    (xa, wa), (xb, wb) = a[:2], b[:2]
    span = max(np.max(xa), np.max(xb)) - min(np.min(xa), np.min(xb))
    if not span > 0:
        return 0.0
    return float(wasserstein_distance(xa, xb, wa, wb) / span)


def _rel(x, ref):
    if x is None or ref is None or not math.isfinite(ref) or ref == 0:
        return None
    return (x - ref) / abs(ref)


def _write(out: Path, spec: dict, cells: list, rows: list) -> dict:
    from .._io import atomic_write_text

    ref = rows[0] if rows else None
    ref_measure = _measure(_load(out / ref["cell"])) if ref else None
    for r in rows:
        m = _measure(_load(out / r["cell"]))
        r["w1_over_range"] = (
            w1_over_range(m, ref_measure) if m is not None and ref_measure is not None else None
        )
        r["rel_diff_lambda_max"] = _rel(r["lambda_max"], ref["lambda_max"])
        r["rel_diff_lambda_min"] = _rel(r["lambda_min"], ref["lambda_min"])
    complete = len(rows) == len(cells) and all(r["status"] == "complete" for r in rows)
    doc = {
        "command": spec["command"],
        "vary": {k: v for k, v in spec["vary"]},
        "options": spec["rest"],
        "num_cells": len(cells),
        "reference": ref["cell"] if ref else None,
        "status": "complete" if complete else "incomplete",
        "cells": rows,
    }
    atomic_write_text(out / "sweep.json", json.dumps(doc, indent=1) + "\n")
    return doc
