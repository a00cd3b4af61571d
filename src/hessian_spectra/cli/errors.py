"""Exit codes, the CLI's error type, and the wording of library errors in terms of flags."""

from __future__ import annotations

import re

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NUMERICAL",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "PROG",
    "CliError",
    "Terminated",
    "classify",
    "first_line",
    "with_flags",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NUMERICAL = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): 128 + 2
EXIT_TERMINATED = 143  # SIGTERM (what schedulers send): 128 + 15
PROG = "hessian-spectra"


class CliError(Exception):
    """A user-facing failure: ``str(e)`` is one line, ``code`` the exit status."""

    def __init__(self, msg: str, code: int = EXIT_USAGE):
        super().__init__(msg)
        self.code = code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C (finished work saved)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (a ``KeyError`` says which key is missing)."""
    s = str(e).strip()
    if isinstance(e, KeyError):
        s = f"missing key {s}"
    return s.splitlines()[0] if s else type(e).__name__


# API argument names that are CLI flags under another spelling. Bare names are rewritten only
# when they cannot be ordinary words (they contain "_", or are listed in _BARE).
_FLAG_NAMES = (
    "seq_len",
    "batch_size",
    "num_batches",
    "subsample",
    "text_field",
    "prompt_field",
    "completion_field",
    "loss_on",
    "split",
    "attn_implementation",
    "allow_download",
    "trust_remote_code",
    "train_mode",
    "device_map",
    "device",
    "dtype",
    "method",
    "eps",
    "eps_values",
    "reference",
    "damping",
    "cg_tol",
    "cg_max_iter",
    "query_data",
    "basis_dtype",
    "reorth",
    "steps",
    "probes",
    "num_steps",
    "num_probes",
    "params",
    "threads",
    "max_fd_error",
    "stencil",
    "parallel",
    "replicate",
)
_ALIASES = {
    "num_steps": "steps",
    "num_probes": "probes",
    "max_iter": "cg_max_iter",
    "tol": "cg_tol",
}
_BARE = {"subsample", "damping"}
_ASSIGN = re.compile(r"(?<![\w./-])(" + "|".join(_FLAG_NAMES) + r")=(['\"]?)([\w.:+-]+)\2")
_NAME = re.compile(
    r"(?<![\w./-])(" + "|".join(n for n in _FLAG_NAMES if "_" in n or n in _BARE) + r")(?![\w(=])"
)


def _flag(name: str) -> str:
    return "--" + _ALIASES.get(name, name).replace("_", "-")


def _assign(m: re.Match) -> str:
    name, value = m.group(1), m.group(3).replace("torch.", "")
    if value == "True":
        return _flag(name)
    if value == "False":
        return f"no {_flag(name)}"
    if value == "None":
        return f"no {_flag(name)} (the default)"
    return f"{_flag(name)} {value}"


def with_flags(msg: str) -> str:
    """A library message in the command line's words: ``seq_len`` -> ``--seq-len``,
    ``allow_download=True`` -> ``--allow-download``, ``dtype=torch.float32`` -> ``--dtype float32``.

    >>> with_flags('use seq_len <= 256 or attn_implementation="eager"')
    'use --seq-len <= 256 or --attn-implementation eager'
    """
    return _NAME.sub(lambda m: _flag(m.group(1)), _ASSIGN.sub(_assign, msg))


def classify(e: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an exception that ended a run."""
    if isinstance(e, CliError):
        return e.code, str(e)
    if isinstance(e, FloatingPointError):
        return EXIT_NUMERICAL, f"numerical failure: {with_flags(first_line(e))}"
    if isinstance(e, (ValueError, TypeError, NotImplementedError, FileNotFoundError)):
        return EXIT_USAGE, with_flags(first_line(e))
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return EXIT_ERROR, (
            f"out of memory: {first_line(e)} (use fewer --steps, --reorth none or "
            "an INT window, --basis-dtype bfloat16, or less data per batch)"
        )
    return EXIT_ERROR, f"{type(e).__name__}: {first_line(e)} (rerun with --debug for the traceback)"
