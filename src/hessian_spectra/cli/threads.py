"""How many CPU threads torch uses: one per free core by default, one per core when OpenMP's
threads sleep instead of spinning.

torch's default is one thread per core, and its OpenMP threads *spin* while they wait for each
other: when any other process runs on one of the cores, every parallel region waits for the
thread that shares that core. Measured with ``benchmarks/threads.py`` on 2 cores (a Lanczos step
of a float32 MLP, exact HVPs, medians of 4 interleaved rounds; the machine shared with other
users, load average 2.0-3.2, so "no neighbour" is not idle): with one busy single-threaded
neighbour, 2 spinning threads took 624 ms per step, 1 thread 119 ms, 2 threads with
``OMP_WAIT_POLICY=PASSIVE`` 90 ms, this default 81 ms (it chose 1); without the neighbour
89 / 77 / 81 / 102 ms. (An earlier run at load 3.4-5.4: 2 spinning threads 871 ms without and
2133 ms with the neighbour, 1 thread 129 / 208 ms, 2 PASSIVE threads 93 / 166 ms.) So:

- ``OMP_WAIT_POLICY=PASSIVE`` in the environment (it must be set before torch is imported:
  OpenMP reads it when it loads; setting it later was measured to change nothing): one thread
  per core this process may use (``os.sched_getaffinity``), shared among the ranks of a
  ``torchrun`` job on this machine: a busy neighbour then costs about its share, no more.
- otherwise (spinning threads): one thread per *free* core: those cores minus the ones other
  processes keep busy when the run starts (runnable tasks in ``/proc/loadavg``, the least of a
  few samples), at least one.

``--threads N`` sets the number; ``OMP_NUM_THREADS``, when set, is respected (torchrun sets it
to 1 for several ranks per machine).
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
    minus this one, the least of ``samples`` readings; None where unknown (not Linux).
    """
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
    ``result.json``: ``num_threads``, ``rule``, ``cores``, ``busy_cores``.
    """
    import torch

    cores = usable_cores()
    share = max(1, cores // max(1, ranks_on_node))
    busy = None
    if requested is not None:
        n, rule = int(requested), "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        n, rule = torch.get_num_threads(), "OMP_NUM_THREADS"
    elif os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        n, rule = share, "one per core (OMP_WAIT_POLICY=PASSIVE)"
    else:
        busy = busy_cores()
        n = max(1, min(share, cores - (busy or 0)))
        rule = "one per free core"
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return {"num_threads": n, "rule": rule, "cores": cores, "busy_cores": busy}
