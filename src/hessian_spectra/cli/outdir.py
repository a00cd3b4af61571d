"""The output folder (``--out DIR``) of a run.

- ``DIR`` is created if needed; a file, a path under a file or a folder that cannot be written
  is refused up front (exit 2).
- One run at a time: a run holds ``fcntl.flock`` on ``DIR/.lock`` (which holds its pid); a
  second run on the same folder is refused (exit 2) while the first one runs.
- The figures in ``DIR`` are those of its ``result.json``: when a run first saves its result,
  the standard figures of an earlier run (``plots.FIGURE_FILES``) are removed, and at the end
  any standard figure this run did not draw is removed. Other files are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from .errors import CliError

__all__ = ["LOCK_FILE", "locked", "prepare_out", "remove_figures"]

LOCK_FILE = ".lock"


def prepare_out(out: Path, flag: str = "--out") -> None:
    """Create ``out`` or say in one line why it cannot be used."""
    if out.exists() and not out.is_dir():
        raise CliError(f"{flag} {str(out)!r} is a file, not a folder: choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CliError(
            f"{flag} {str(out)!r} cannot be created: part of its path is a file; "
            "choose another folder"
        ) from None
    except OSError as e:
        raise CliError(
            f"{flag} {str(out)!r} cannot be created ({e.strerror}): choose a folder "
            "you can write to"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {str(out)!r} is not writable: choose a folder you can write to")


@contextlib.contextmanager
def locked(out: Path):
    """Hold an exclusive ``flock`` on ``out/.lock`` (refuse when another run holds it)."""
    import fcntl

    try:
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise CliError(
            f"--out {str(out)!r} is not writable ({e.strerror}): choose a folder you can write to"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise CliError(
                f"another run (pid {other}) is writing to --out {str(out)!r}: wait "
                "for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_figures(out: Path, keep=()) -> None:
    """Remove the standard figures (``plots.FIGURE_FILES``) in ``out`` not named in ``keep``."""
    from ..plots import FIGURE_FILES

    keep = {Path(k).name for k in keep}
    for name in FIGURE_FILES:
        if name not in keep:
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
