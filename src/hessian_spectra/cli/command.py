"""What a command is: its options, its run, its summary rows and its figures, in one object.

A new analysis command is one new module with a ``Command`` subclass, listed in
``cli/__init__.COMMANDS``: the parser, the run configuration, ``result.json`` (its estimate is
written under ``results.result_key(name)``), the printed summary and ``plot`` all take it from
there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Command", "Context", "Outcome", "fmt"]


def fmt(x, spec: str = ".6g") -> str:
    """A number for the summary table; ``n/a`` for None."""
    return "n/a" if x is None else format(x, spec)


@dataclass
class Outcome:
    """What a command's run returns.

    Fields:
        estimate: the JSON-able estimate (``result.json[result_key(command)]``).
        summary: headline numbers (merged into ``result.json["summary"]``).
        status: ``complete``, or ``not_converged`` for a result that is not what was asked
            for (exit status 3).
        problem: one line saying what is wrong when ``status`` is not ``complete``.
    """

    estimate: dict
    summary: dict = field(default_factory=dict)
    status: str = "complete"
    problem: str | None = None


@dataclass
class Context:
    """What a command's run may use.

    Fields:
        config: the frozen ``RunConfig`` (its ``options`` are the command's).
        op: the curvature operator.
        problem: the loaded ``problem.Problem`` (model, loss_fn, batches, info, loaded model).
        out: the output folder; rank0: whether this process writes.
        previous: the saved ``result.json`` dict of the run being resumed, else None.
        publish: ``publish(estimate, summary)`` saves a partial result (status ``running``).
        draw: ``draw()`` redraws the figures of the partial result (rank 0).
        log: the CLI's logger.
    """

    config: object
    op: object
    problem: object
    out: Path
    rank0: bool
    previous: dict | None
    publish: object
    draw: object
    log: object


class Command:
    """Base class of the analysis commands (module docstring)."""

    name: str = ""
    help: str = ""
    description: str = ""
    #: frozen dataclass of the command's own options (field names = argparse dests)
    Options: type | None = None
    #: whether --resume applies (the command's Options then has a ``resume`` field)
    resumable: bool = False
    #: said in the log when the run is interrupted
    interrupted_hint: str = ""

    @property
    def out_default(self) -> str:
        return f"runs/{self.name}"

    def add_options(self, parser) -> None:
        """Add the command's own options to its sub-parser."""

    def options_from(self, ns, world_size: int):
        """The command's ``Options`` from parsed arguments (world-size-dependent defaults
        resolved here).
        """
        if self.Options is None:
            return None
        return self.Options(
            **{f.name: getattr(ns, f.name) for f in dataclasses.fields(self.Options)}
        )

    def resolve_method(self, method: str, eps):
        """The HVP method and fd step this command runs with (most: as asked)."""
        return method, eps

    def check(self, config, world_size: int) -> None:
        """Refuse settings this command cannot run with (raise ``CliError``), before loading."""

    def run(self, ctx: Context) -> Outcome:
        raise NotImplementedError

    def summary_rows(self, result) -> list[tuple[str, str]]:
        """(name, value) rows of the printed summary, from the ``RunResult``."""
        return []

    def tables(self, result) -> str | None:
        """A table printed before the summary (e.g. one line per block), or None."""
        return None

    def figures(self, result: dict, out: Path) -> list[Path]:
        """Draw the run's figures from its ``result.json`` dict into ``out``."""
        from ..plots import plot_result

        return plot_result(result, out)
