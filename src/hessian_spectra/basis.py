"""Where the Lanczos vectors kept for reorthogonalisation live, and the vector work on them.

A Lanczos vector is stored as one flat buffer (this rank's local pieces of all parameters, one
after the other, in the basis dtype) with per-parameter views (:class:`Layout`). The kept
vectors are rows of a :class:`KrylovBasis`, in one of three places:

- ``"memory"`` (default): a ``(capacity, n)`` tensor on the operator's device;
- host memory (``basis_device="cpu"`` with a model on a GPU): the same tensor in CPU memory
  (not pinned: that would lock num_steps vectors of RAM), streamed to the GPU a chunk at a time;
- files (``basis_dir=PATH``): one raw file per vector per rank under ``PATH``
  (``lanczos-<id>.q<t>.rank<r>.bin``: the vector's bytes in the basis dtype, nothing else, never
  unpickled), read a chunk at a time, removed by :meth:`KrylovBasis.close`. A file is written
  by a writer thread while the caller goes on (``lanczos`` stores ``q_j`` before its HVP, so the
  write overlaps the product); every method that reads the files first waits for the writes
  (:meth:`KrylovBasis.flush`). Files are overwritten in place where one can be: a window's
  dropped vector's file becomes the next vector's, and inside :func:`recycled_files` (``slq``
  holds it over its probes) a closed basis leaves its files to the next one. Why: writing a
  *new* file costs the kernel fresh page-cache pages, overwriting an existing one does not; on
  the 2-core development VM a new 538 MB file cost 1.1 s of CPU and an overwrite 0.05 s (disk
  file system, writeback included), and the demo's 32 writes in the caller's thread made it
  46 s slower than keeping the vectors in memory.

The vector work is done in **sweeps** (:meth:`KrylovBasis.sweep`) over chunks of columns: the
flat range ``[a, a + C)`` of every kept row at once, with ``C`` a multiple of 2^16 entries
such that the chunk of ``k`` rows holds about ``CHUNK_BYTES`` (8 MiB) of float32
(:func:`chunk_columns`), cut at parameter boundaries into pieces. Per chunk a sweep first
subtracts ``Q_cᵀ c`` from ``w`` (one ``addmv`` per piece), then takes the dot products ``Q_c w``
of the updated chunk (float32 per block of ``_DOT_BLOCK`` entries, blocks summed in float64: the
accuracy of :func:`hessian_spectra.vectors._dot64`): the second pass of CGS2's update and the
next pass's dots share one read of the basis, while the chunk is in cache. Rows in another
dtype than the arithmetic (a bf16 basis) are converted once per chunk into a reused buffer.
The three places use the same chunks, pieces and kernels, so their numbers are identical. A
file-backed basis holds two chunks of its rows in memory (the one worked on and the next one,
read meanwhile by a reader thread; about ``CHUNK_BYTES`` each, at least 2^16 entries per row)
whatever the number of steps; in a resident one ``lanczos`` writes ``q_j``
straight into its row (:meth:`KrylovBasis.claim`).

>>> import torch
>>> lay = Layout([torch.zeros(2), torch.zeros(1)])
>>> B = KrylovBasis(lay, torch.float64, capacity=4)
>>> B.put(0, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
>>> w = [torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64)]
>>> B.sweep(B.groups(range(1)), w).tolist()
[3.0]
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import distributed as _dist
from .vectors import _DOT_BLOCK, Vector, _as, _compute_dtype, _rows_dot

__all__ = ["CHUNK_BYTES", "KrylovBasis", "Layout", "chunk_columns", "recycled_files"]

CHUNK_BYTES = 1 << 23  # float32 bytes of one chunk of the kept rows in a sweep (8 MiB)


# directory -> the files closed bases left there for the next one to overwrite (while a
# recycled_files context for that directory is open)
_POOLS: dict[Path, list[Path]] = {}


@contextlib.contextmanager
def recycled_files(basis_dir):
    """Within this context a file-backed basis under ``basis_dir`` that is closed leaves its files
    to the next basis there, which overwrites them in place instead of writing new files (the
    probes of one SLQ run: no new page-cache pages after the first probe); the files left over
    are removed when the context ends. Nested contexts for one directory are one. ``None``: no-op.
    """
    key = Path(basis_dir).resolve() if basis_dir is not None else None
    if key is None or key in _POOLS:
        yield
        return
    made = not key.exists()  # the first basis makes it; the context removes it if empty
    _POOLS[key] = []
    try:
        yield
    finally:
        for f in _POOLS.pop(key):
            f.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):  # other ranks' or kept files are there
                key.rmdir()


def chunk_columns(k: int) -> int:
    """The width ``C`` of a sweep's chunks over ``k`` rows: the largest multiple of 2^16
    entries with ``k · C · 4 ≤ CHUNK_BYTES``, at least 2^16 (a function of ``k`` alone, so
    that every place of the basis cuts the same chunks).

    >>> chunk_columns(1) // 2**16, chunk_columns(16) // 2**16, chunk_columns(100) // 2**16
    (32, 2, 1)
    """
    return _DOT_BLOCK * max(1, CHUNK_BYTES // (4 * max(int(k), 1) * _DOT_BLOCK))


class Layout:
    """The flat layout of a vector: this rank's local piece of each parameter, concatenated.

    >>> import torch
    >>> lay = Layout([torch.zeros(2, 2), torch.zeros(3)])
    >>> lay.numel, [tuple(v.shape) for v in lay.views(torch.arange(7.0))]
    (7, [(2, 2), (3,)])
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        locs = [_dist.local(p) for p in params]
        self.shapes = [tuple(t.shape) for t in locs]
        self.sizes = [t.numel() for t in locs]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = self.offsets[-1]
        self.device = locs[0].device if locs else torch.device("cpu")

    def views(self, flat: torch.Tensor) -> Vector:
        """Per-parameter views of a flat ``(numel,)`` buffer (no copy)."""
        return [flat[o : o + n].view(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]

    def columns(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter column slices ``rows[:, o:o+n]`` of a ``(k, numel)`` block of rows."""
        return [rows[:, o : o + n] for o, n in zip(self.offsets, self.sizes)]

    def empty(self, dtype: torch.dtype, device=None) -> torch.Tensor:
        """A new flat buffer."""
        return torch.empty(self.numel, dtype=dtype, device=device or self.device)

    def chunks(self, width: int) -> list[tuple[int, int, list[tuple[int, int, int, int, int]]]]:
        """The flat ranges ``[a, b)`` of ``width`` entries (the last one shorter), each with its
        pieces ``(i, c0, c1, l0, l1)``: columns ``c0:c1`` of the chunk are entries ``l0:l1``
        of parameter ``i`` (empty parameters have none).

        >>> import torch
        >>> Layout([torch.zeros(3), torch.zeros(0), torch.zeros(4)]).chunks(5)
        [(0, 5, [(0, 0, 3, 0, 3), (2, 3, 5, 0, 2)]), (5, 7, [(2, 0, 2, 2, 4)])]
        """
        cache = self.__dict__.setdefault("_chunks", {})
        if width not in cache:
            out = []
            for a in range(0, self.numel, width):
                b = min(a + width, self.numel)
                pieces = []
                for i, (o, n) in enumerate(zip(self.offsets, self.sizes)):
                    lo, hi = max(a, o), min(b, o + n)
                    if lo < hi:
                        pieces.append((i, lo - a, hi - a, lo - o, hi - o))
                out.append((a, b, pieces))
            cache[width] = out
        return cache[width]


def block_dots(Q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Q @ w`` as float64 ``(k,)`` for rows ``Q`` ``(k, n)`` and ``w`` ``(n,)``: one GEMV when
    both are float64; else one GEMV per block of ``_DOT_BLOCK`` columns (converted in cache to
    float64 when either is float64, else to float32), blocks summed in float64.

    >>> import torch
    >>> block_dots(torch.ones(2, 3), torch.tensor([1.0, 2.0, 3.0])).tolist()
    [6.0, 6.0]
    """
    w = w.reshape(-1)
    cd = _compute_dtype(Q.dtype, w.dtype)
    if Q.dtype == w.dtype == torch.float64:
        return torch.mv(Q, w)
    if Q.dtype == w.dtype == cd and Q.stride(-1) == 1 and w.is_contiguous():
        return _rows_dot(Q, w)
    n = w.numel()
    parts = [
        torch.mv(_as(Q[:, i : i + _DOT_BLOCK], cd, 0), _as(w[i : i + _DOT_BLOCK], cd, 1))
        for i in range(0, n, _DOT_BLOCK)
    ]
    if not parts:
        return torch.zeros(Q.shape[0], dtype=torch.float64, device=Q.device)
    return torch.stack(parts).double().sum(0)


def block_subtract(Q: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> None:
    """In place ``w -= Qᵀ c`` (rows ``Q`` ``(k, n)``, coefficients ``c`` ``(k,)``); one ``addmv``
    when ``Q`` has ``w``'s dtype, else one per block of rows converted to ``w``'s dtype.

    >>> import torch
    >>> w = torch.tensor([1.0, 1.0])
    >>> block_subtract(torch.eye(2), torch.tensor([0.5, 2.0], dtype=torch.float64), w)
    >>> w.tolist()
    [0.5, -1.0]
    """
    flat = w.view(-1)
    c = c.to(device=w.device, dtype=w.dtype)
    if Q.dtype == w.dtype:
        flat.addmv_(Q.t(), c, alpha=-1)
        return
    for i in range(0, flat.numel(), _DOT_BLOCK):
        flat[i : i + _DOT_BLOCK].addmv_(_as(Q[:, i : i + _DOT_BLOCK], w.dtype).t(), c, alpha=-1)


class KrylovBasis:
    """The Lanczos vectors kept for reorthogonalisation (module docstring).

    Args:
        layout: the flat layout of one vector (:class:`Layout`).
        dtype: the basis dtype.
        capacity: how many vectors are kept at most (vector ``t`` goes to slot
            ``t mod capacity``; the vector it replaces is dropped).
        device: where the work vectors live (default: the layout's device).
        basis_device: where the kept rows live in memory (default ``device``); ignored with
            ``basis_dir``.
        basis_dir: keep the rows in files under this directory instead (created if missing).
        name: the run's file name stem (default: a fresh random id).

    ``io_seconds`` accumulates the time the caller spent writing and reading files (waiting for
    the writer thread included) and moving rows between host and device; ``write_seconds`` the
    time the writer thread spent writing files (overlapped with the caller's work).
    """

    def __init__(
        self,
        layout: Layout,
        dtype: torch.dtype,
        *,
        capacity: int,
        device=None,
        basis_device=None,
        basis_dir: str | os.PathLike | None = None,
        name: str | None = None,
    ):
        self.layout, self.dtype, self.capacity = layout, dtype, int(capacity)
        self.device = torch.device(device) if device is not None else layout.device
        self.io_seconds = 0.0
        self.write_seconds = 0.0
        self.kept: dict[int, int] = {}  # vector index t -> slot
        self.dir = Path(basis_dir) if basis_dir is not None else None
        self.name = name or f"lanczos-{uuid.uuid4().hex[:12]}"
        self._made_dir = False
        self._bufs = [None, None]  # staging buffers of chunks read from files (grown on demand)
        self._reader = None  # the thread that reads the next chunk from files
        self._writer = None  # the thread that writes stored vectors to their files
        self._writes: list = []  # their futures, until flush()
        self._scratch: dict = {}  # (dtype, slot) -> a chunk converted to that dtype
        if self.dir is not None:
            if not self.dir.exists():
                self.dir.mkdir(parents=True)
                self._made_dir = True
            elif not self.dir.is_dir():
                raise ValueError(f"basis_dir={str(self.dir)!r} exists and is not a directory")
            self._rows = None
        else:
            try:
                where = torch.device(basis_device) if basis_device is not None else self.device
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"basis_device must be a torch device such as 'cpu' or 'cuda:0', got "
                    f"{basis_device!r}"
                ) from None
            self._rows = torch.empty(self.capacity, layout.numel, dtype=dtype, device=where)

    @property
    def streamed(self) -> bool:
        """True when the rows are not on the work device (files, or host memory)."""
        return self._rows is None or self._rows.device != self.device

    def path(self, t: int) -> Path:
        """The file of vector ``t`` (file-backed bases only)."""
        return self.dir / f"{self.name}.q{t}.rank{_dist.rank()}.bin"

    def __len__(self) -> int:
        return len(self.kept)

    def claim(self, t: int) -> torch.Tensor:
        """Keep vector ``t`` in its row, which the caller fills: the row itself, a flat view
        (resident bases only: ``not streamed``); drops vector ``t - capacity``.
        """
        slot = t % self.capacity
        for s in [s for s, sl in self.kept.items() if sl == slot]:
            del self.kept[s]
        self.kept[t] = slot
        return self._rows[slot]

    def put(self, t: int, q: torch.Tensor) -> None:
        """Keep vector ``t`` (a flat buffer in the basis dtype), dropping vector
        ``t - capacity`` (whose file is removed at the next ``put``).

        File-backed: the file is written by the writer thread; a CPU ``q`` is written from its
        own memory, so the caller must not change it before the next :meth:`flush` (which every
        reading method calls first).
        """
        slot = t % self.capacity
        for s in [s for s, sl in self.kept.items() if sl == slot]:
            del self.kept[s]
        t0 = time.perf_counter()
        if self._rows is not None:
            self._rows[slot].copy_(q, non_blocking=False)
        else:
            data = q.detach().to("cpu").contiguous()
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="basis-write")
            # one step late: the last checkpoint may still reference the dropped vector's file;
            # it becomes this vector's file, or else one a closed basis left (recycled_files)
            reuse = [self.path(t - self.capacity - 1)]
            pool = self._pool()
            if pool and t - self.capacity - 1 < 0:  # no dropped vector's file yet
                reuse.append(pool.pop())
            self._writes.append(self._writer.submit(self._write, t, data, reuse))
        if self.streamed:
            self.io_seconds += time.perf_counter() - t0
        self.kept[t] = slot

    def _write(self, t: int, data: torch.Tensor, reuse: list[Path]) -> None:
        """Write vector ``t``'s file from the CPU tensor ``data`` (run in the writer thread):
        to a ``.tmp`` file renamed into place, so a file under the vector's name is whole. The
        ``.tmp`` is the first existing file of ``reuse``, overwritten in place (and cut to
        size), else a new file; the other files of ``reuse`` go.
        """
        t0 = time.perf_counter()
        tmp = self.path(t).with_suffix(".tmp")
        mode = "wb"
        for old in reuse:
            if mode == "wb" and old.is_file():
                os.replace(old, tmp)
                mode = "r+b"
            else:
                old.unlink(missing_ok=True)
        with open(tmp, mode) as f:
            f.write(memoryview(data.view(torch.uint8).numpy()))  # bf16: raw bytes
            f.truncate()
        os.replace(tmp, self.path(t))
        self.write_seconds += time.perf_counter() - t0

    def _pool(self) -> list[Path] | None:
        """The files left for reuse under this basis' directory (a :func:`recycled_files`
        context), or None.
        """
        return _POOLS.get(self.dir.resolve()) if self.dir is not None else None

    def flush(self) -> None:
        """Wait until every stored vector is in its file (the wait counts as I/O time); an
        error of a write is raised here.
        """
        if not self._writes:
            return
        t0 = time.perf_counter()
        pending, self._writes = self._writes, []
        try:
            for f in pending:
                f.result()
        finally:
            self.io_seconds += time.perf_counter() - t0

    def adopt(self, t: int) -> None:
        """Take vector ``t``'s existing file as kept (a resumed run; file-backed bases only)."""
        self.flush()
        p = self.path(t)
        want = self.layout.numel * torch.empty((), dtype=self.dtype).element_size()
        if not p.is_file() or p.stat().st_size != want:
            got = "missing" if not p.is_file() else f"{p.stat().st_size} bytes"
            raise FileNotFoundError(
                f"the offloaded Lanczos vector {p} is {got}, {want} bytes expected; delete the "
                "checkpoint to start the run afresh"
            )
        self.kept[t] = t % self.capacity

    def groups(self, ts: Iterable[int]) -> list[list[int]]:
        """The vectors ``ts`` in sweep order: runs of consecutive slots (one matrix each)."""
        by_slot = sorted((self.kept[t], t) for t in ts)
        out: list[list[int]] = []
        prev = None
        for slot, t in by_slot:
            if out and prev is not None and slot == prev + 1:
                out[-1].append(t)
            else:
                out.append([t])
            prev = slot
        return out

    def vector(self, t: int) -> torch.Tensor:
        """Vector ``t`` as a flat tensor on the work device (a copy when streamed)."""
        t0 = time.perf_counter()
        if self._rows is not None:
            row = self._rows[self.kept[t]]
            if row.device == self.device:
                return row
            out = row.to(self.device)
        else:
            self.flush()
            out = torch.empty(self.layout.numel, dtype=self.dtype)
            with open(self.path(t), "rb", buffering=0) as f:
                _read_into(f, 0, out, self.path(t))
            out = out.to(self.device)
        self.io_seconds += time.perf_counter() - t0
        return out

    def _staging(self, numel: int, slot: int) -> torch.Tensor:
        """A flat host buffer of ``numel`` entries in the basis dtype for rows read from files
        (pinned with a GPU work device), reused from chunk to chunk; two ``slot`` s, so that
        the next chunk is read while this one is worked on.
        """
        buf = self._bufs[slot]
        if buf is None or buf.numel() < numel:
            self._bufs[slot] = None
            pin = self.device.type == "cuda"
            buf = self._bufs[slot] = torch.empty(numel, dtype=self.dtype, pin_memory=pin)
        return buf[:numel]

    def _read(self, groups, a: int, b: int, files, slot: int) -> list[torch.Tensor]:
        """Columns ``a:b`` of the rows of each group read from their files into staging buffer
        ``slot``: ``(len(g), b − a)`` host tensors (run in the reader thread).
        """
        width = b - a
        buf = self._staging(sum(map(len, groups)) * width, slot)
        es = buf.element_size()
        out, r = [], 0
        for g in groups:
            blk = buf[r * width : (r + len(g)) * width].view(len(g), width)
            for i, t in enumerate(g):
                _read_into(files[t], a * es, blk[i], self.path(t))
            out.append(blk)
            r += len(g)
        return out

    def _chunks(self, groups, width: int, files):
        """``(pieces, rows)`` for each chunk of ``width`` columns: the pieces of
        :meth:`Layout.chunks` and the columns of the rows of each group, ``(len(g), b − a)`` on
        the work device. Rows in files are read one chunk ahead by a reader thread (file reads
        release the GIL), into two staging buffers used in turn.
        """
        chunks = self.layout.chunks(width)
        if self._rows is not None:
            for a, b, pieces in chunks:
                s = [self.kept[g[0]] for g in groups]
                blocks = [self._rows[i : i + len(g), a:b] for i, g in zip(s, groups)]
                if self._rows.device != self.device:
                    t0 = time.perf_counter()
                    blocks = [blk.to(self.device) for blk in blocks]
                    self.io_seconds += time.perf_counter() - t0
                yield pieces, blocks
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="basis-read")
        nxt = self._reader.submit(self._read, groups, *chunks[0][:2], files, 0)
        try:
            for i, (_, _, pieces) in enumerate(chunks):
                t0 = time.perf_counter()
                blocks = nxt.result()
                nxt = None
                if i + 1 < len(chunks):
                    a, b = chunks[i + 1][:2]
                    nxt = self._reader.submit(self._read, groups, a, b, files, (i + 1) % 2)
                if self.device.type != "cpu":
                    blocks = [blk.to(self.device) for blk in blocks]
                self.io_seconds += time.perf_counter() - t0
                yield pieces, blocks
        finally:
            if nxt is not None:  # stopped early: let the read in flight finish with its files
                nxt.exception()

    def _convert(self, blocks: list[torch.Tensor], dtype: torch.dtype, slot: int):
        """``blocks`` in ``dtype``: themselves, or converted into a reused buffer."""
        if not blocks or blocks[0].dtype == dtype:
            return blocks
        need = sum(x.numel() for x in blocks)
        key = (dtype, slot)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < need:
            self._scratch[key] = None
            buf = self._scratch[key] = torch.empty(need, dtype=dtype, device=self.device)
        out, o = [], 0
        for x in blocks:
            out.append(buf[o : o + x.numel()].view(x.shape).copy_(x))
            o += x.numel()
        return out

    def sweep(
        self,
        groups: list[list[int]],
        w: Vector,
        subtract: torch.Tensor | None = None,
        dots: bool = True,
        norm: bool = False,
    ) -> torch.Tensor | None:
        """One pass over the kept vectors of ``groups``, chunk by chunk (module docstring):
        first, with ``subtract`` (coefficients ``c`` in the order of ``groups``), in place
        ``w -= Σ c_t q_t``; then, with ``dots``, this rank's float64 sums ``q_t · w`` of the
        updated ``w``, in the order of ``groups`` (the caller all-reduces them); with ``norm``
        one more entry at the end: this rank's ``w · w`` of the updated ``w`` (float32 per
        block of ``_DOT_BLOCK`` entries, summed in float64).
        """
        k = sum(map(len, groups))
        out = torch.zeros(k + int(norm), dtype=torch.float64, device=self.device)
        out = out if dots or norm else None
        if k == 0 or (subtract is None and not dots):
            if norm:
                out[k] = sum(
                    (_sumsq(wi.reshape(-1)) for wi in w),
                    torch.zeros((), dtype=torch.float64, device=self.device),
                )
            return out
        flat = [wi.view(-1) for wi in w]
        wdt = flat[0].dtype
        cd = _compute_dtype(self.dtype, wdt)
        c = subtract.to(device=self.device, dtype=wdt) if subtract is not None else None
        files, chunks = {}, None
        try:
            if self._rows is None:
                self.flush()
                files = {t: open(self.path(t), "rb", buffering=0) for g in groups for t in g}
            chunks = self._chunks(groups, chunk_columns(k), files)
            for pieces, rows in chunks:
                rw = None
                if c is not None:
                    rw, r = self._convert(rows, wdt, 0), 0
                    for Q in rw:
                        cg = c[r : r + Q.shape[0]]
                        for i, c0, c1, l0, l1 in pieces:
                            flat[i][l0:l1].addmv_(Q[:, c0:c1].t(), cg, alpha=-1)
                        r += Q.shape[0]
                if dots:
                    rd, r = (rw if rw is not None and cd == wdt else self._convert(rows, cd, 1)), 0
                    for Q in rd:
                        acc = out[r : r + Q.shape[0]]
                        for i, c0, c1, l0, l1 in pieces:
                            acc += block_dots(Q[:, c0:c1], flat[i][l0:l1])
                        r += Q.shape[0]
                if norm:
                    for i, _, _, l0, l1 in pieces:
                        out[k] += _sumsq(flat[i][l0:l1])
        finally:
            if chunks is not None:
                chunks.close()  # waits for a read in flight before its files close
            for f in files.values():
                f.close()
        return out

    def dots(self, groups: list[list[int]], w: Vector) -> torch.Tensor:
        """This rank's float64 sums ``q_t · w`` for the vectors of ``groups``, in their order
        (the caller all-reduces them): ``sweep(groups, w)``.
        """
        return self.sweep(groups, w)

    def subtract(self, groups: list[list[int]], c: torch.Tensor, w: Vector) -> None:
        """In place ``w -= Σ c_t q_t`` over the vectors of ``groups`` (``c`` in their order)."""
        self.sweep(groups, w, subtract=c, dots=False)

    def close(self, *, keep_files: bool = False) -> None:
        """Drop the rows; remove this run's files (and the directory if it made it and it is
        empty) unless ``keep_files``.
        """
        self._rows = None
        self._bufs = [None, None]
        self._scratch.clear()
        if self._reader is not None:
            self._reader.shutdown()
            self._reader = None
        if self._writer is not None:  # the files are whole (or failed) before they go
            pending, self._writes = self._writes, []
            for f in pending:
                f.exception()  # not raised: a vector never read back changed no number
            self._writer.shutdown()
            self._writer = None
        if self.dir is None or keep_files:
            return
        pool = self._pool()
        for t in list(self.kept):
            if pool is not None and self.path(t).is_file():  # left for the next basis
                free = self.dir / f"free-{self.name}.q{t}.rank{_dist.rank()}.bin"
                os.replace(self.path(t), free)
                pool.append(free)
            else:
                self.path(t).unlink(missing_ok=True)
        for p in self.dir.glob(f"{self.name}.*.rank{_dist.rank()}.*"):
            p.unlink(missing_ok=True)
        self.kept.clear()
        if self._made_dir:
            try:
                self.dir.rmdir()
            except OSError:  # other ranks' (or the user's) files are still there
                pass


def _sumsq(x: torch.Tensor) -> torch.Tensor:
    """``x · x`` of a flat tensor as a float64 scalar: float32 per block of ``_DOT_BLOCK``
    entries (float64 for float64 ``x``), blocks summed in float64.
    """
    if x.dtype == torch.float64:
        return torch.dot(x, x)
    return block_dots(x.view(1, -1), x)[0]


def _read_into(f, offset: int, out: torch.Tensor, path) -> None:
    """Fill the contiguous CPU tensor ``out`` with the bytes of the open file ``f`` from
    ``offset`` on (no intermediate copy); a short file is an ``OSError`` naming ``path``.
    """
    view = memoryview(out.view(torch.uint8).numpy())  # bf16 has no numpy dtype: raw bytes
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"{path}: read {got} bytes at offset {offset}, {len(view)} expected")
        got += n
