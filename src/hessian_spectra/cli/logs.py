"""Logging of a run (stderr through tqdm, ``log.txt`` on rank 0, errors only on other ranks),
quieter third-party libraries, and SIGTERM turned into an interruption.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from .errors import Terminated

__all__ = ["logging_to", "quiet_libraries", "sigterm_interrupts"]

log = logging.getLogger("hessian_spectra.cli")


class _TqdmHandler(logging.Handler):
    """Log lines to stderr through ``tqdm.write`` so they do not break the progress bars."""

    def emit(self, record):
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


@contextlib.contextmanager
def logging_to(out: Path | None, write: bool, debug: bool):
    """Log to stderr and (rank 0) to ``out/log.txt``; undone on exit."""
    handlers = []
    if write:
        sh = _TqdmHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(sh)
        if out is not None:
            fh = logging.FileHandler(out / "log.txt", encoding="utf-8")
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
            handlers.append(fh)
    else:  # other ranks: errors only, marked with the rank
        from .. import distributed

        eh = logging.StreamHandler(sys.stderr)
        eh.setLevel(logging.ERROR)
        eh.setFormatter(logging.Formatter(f"[rank {distributed.rank()}] %(message)s"))
        handlers.append(eh)
    old_level, old_prop = log.level, log.propagate
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    for h in handlers:
        log.addHandler(h)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            # warnings (ghosts, fd fallbacks, ...) go to stderr and log.txt like every log line
            warnings.showwarning = lambda message, category, *_a, **_k: log.warning(
                "warning: %s (%s)", message, category.__name__
            )
            yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(old_level)
        log.propagate = old_prop


@contextlib.contextmanager
def sigterm_interrupts():
    """While inside, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main thread, so
    a scheduler's stop unwinds like Ctrl-C; a second SIGTERM kills as usual.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated("SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def quiet_libraries(debug: bool) -> None:
    if debug:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception as e:  # noqa: BLE001 - quieter logs are a nicety, never a failure
        log.debug("could not quiet transformers: %s", e)
