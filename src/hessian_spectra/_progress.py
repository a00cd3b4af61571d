"""Progress bars: tqdm on rank 0 only, nothing elsewhere or when not asked for."""

from __future__ import annotations

import contextlib

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(
    enabled: bool,
    *,
    total=None,
    initial: int = 0,
    desc: str = "",
    unit: str = "it",
    leave: bool = True,
):
    """A ``tqdm`` bar (``bar.update(n)``) on rank 0 when ``enabled``, else None; closed on exit.

    >>> with progress_bar(False, total=3) as bar:
    ...     bar is None
    True
    """
    from . import distributed as _dist

    bar = None
    if enabled and _dist.is_rank0():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
