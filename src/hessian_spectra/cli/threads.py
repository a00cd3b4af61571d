"""How many CPU threads torch uses: one per free core by default.

torch's default is one thread per core. Its OpenMP threads spin-wait for each other, so when
another process keeps one of the cores busy, every parallel region waits for the thread that
shares that core: measured on 2 cores with one busy neighbour, a 2-thread Lanczos step of an
MLP took 3.5x its idle time, a 1-thread step 2.1x (issue 13, item 14;
``benchmarks/threads.py`` repeats the measurement). So the default is one thread per *free*
core: the cores this process may run on (``os.sched_getaffinity``), divided among the ranks
of a ``torchrun`` job on this node, minus the cores that other processes keep busy when the
run starts (runnable tasks in ``/proc/loadavg``, least of a few samples), at least one.
``--threads N`` sets it; ``OMP_NUM_THREADS``, when set, is respected (torchrun sets it to 1).
"""

from __future__ import annotations

import os
import time

__all__ = ["busy_cores", "choose_threads", "usable_cores"]


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval_s: float = 0.02) -> int | None:
    """Cores other processes keep busy now: runnable tasks (``/proc/loadavg``, 4th field)
    minus this one, the least of ``samples`` readings; None where unknown (not Linux)."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(running - 1, 0))  # this process is one of the runnable tasks
        if i + 1 < samples:
            time.sleep(interval_s)
    return min(counts)


def choose_threads(requested: int | None = None, *, ranks_on_node: int = 1) -> dict:
    """Set ``torch.set_num_threads`` (module docstring) and return what was chosen, for
    ``result.json``: ``num_threads``, ``rule``, ``cores``, ``busy_cores``."""
    import torch

    cores = usable_cores()
    busy = None
    if requested is not None:
        n, rule = int(requested), "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        n, rule = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        busy = busy_cores()
        share = max(1, cores // max(1, ranks_on_node))
        n = max(1, min(share, cores - (busy or 0)))
        rule = "one per free core"
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return {"num_threads": n, "rule": rule, "cores": cores, "busy_cores": busy}
