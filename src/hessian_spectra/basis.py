"""Where the Lanczos vectors kept for reorthogonalisation live, and the vector work on them.

A Lanczos vector is stored as one flat buffer (this rank's local pieces of all parameters, one
after the other, in the basis dtype) with per-parameter views (:class:`Layout`). The kept
vectors are rows of a :class:`KrylovBasis`, in one of three places:

- ``"memory"`` (default): a ``(capacity, n)`` tensor on the operator's device;
- host memory (``basis_device="cpu"`` with a model on a GPU): the same tensor in CPU memory
  (not pinned: that would lock num_steps vectors of RAM), streamed to the GPU a group of rows
  at a time;
- files (``basis_dir=PATH``): one raw file per vector per rank under ``PATH``
  (``lanczos-<id>.q<t>.rank<r>.bin``: the vector's bytes in the basis dtype, nothing else, never
  unpickled), streamed a group of rows at a time, removed by :meth:`KrylovBasis.close`.

Reorthogonalisation sweeps the kept rows in groups of at most ``GROUP`` (8) rows that are
consecutive in the store's slot order (slot ``t mod capacity`` for vector ``t``); the three
places use the same groups and the same kernels, so their numbers are identical. Per group:
the dot products against ``w`` are one matrix–vector product per block of ``_DOT_BLOCK``
entries (float32 per block, blocks summed in float64: the accuracy of
:func:`hessian_spectra.vectors._dot64`) and the update ``w -= Q_gᵀ c_g`` one ``addmv``. A
streamed basis holds one group (8 vectors) in memory whatever the number of steps (and
``lanczos`` two more for ``q_j``, ``q_{j-1}``); in a resident one ``lanczos`` writes ``q_j``
straight into its row (:meth:`KrylovBasis.claim`).

>>> import torch
>>> lay = Layout([torch.zeros(2), torch.zeros(1)])
>>> B = KrylovBasis(lay, torch.float64, capacity=4)
>>> B.put(0, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
>>> w = [torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64)]
>>> B.dots(B.groups(range(1)), w).tolist()
[3.0]
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from . import distributed as _dist
from .vectors import _DOT_BLOCK, Vector, _as, _compute_dtype, _rows_dot

__all__ = ["GROUP", "KrylovBasis", "Layout"]

GROUP = 8  # rows of the basis per streamed group (and per matrix-vector product); the
# conversion scratch of hessian_spectra.vectors._as holds GROUP blocks


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

    ``io_seconds`` accumulates the time spent writing and reading files and moving rows between
    host and device.
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
        self.kept: dict[int, int] = {}  # vector index t -> slot
        self.dir = Path(basis_dir) if basis_dir is not None else None
        self.name = name or f"lanczos-{uuid.uuid4().hex[:12]}"
        self._made_dir = False
        pin = self.device.type == "cuda"
        if self.dir is not None:
            if not self.dir.exists():
                self.dir.mkdir(parents=True)
                self._made_dir = True
            elif not self.dir.is_dir():
                raise ValueError(f"basis_dir={str(self.dir)!r} exists and is not a directory")
            self._rows = None
            self._buf = torch.empty(
                min(GROUP, self.capacity), layout.numel, dtype=dtype, pin_memory=pin
            )
        else:
            try:
                where = torch.device(basis_device) if basis_device is not None else self.device
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"basis_device must be a torch device such as 'cpu' or 'cuda:0', got "
                    f"{basis_device!r}"
                ) from None
            self._rows = torch.empty(self.capacity, layout.numel, dtype=dtype, device=where)
            self._buf = None

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
        """
        slot = t % self.capacity
        for s in [s for s, sl in self.kept.items() if sl == slot]:
            del self.kept[s]
        if self.dir is not None:  # one step late: the last checkpoint may still reference it
            self.path(t - self.capacity - 1).unlink(missing_ok=True)
        t0 = time.perf_counter()
        if self._rows is not None:
            self._rows[slot].copy_(q, non_blocking=False)
        else:
            data = q.detach().to("cpu").contiguous().view(torch.uint8).numpy()
            tmp = self.path(t).with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(memoryview(data))
            os.replace(tmp, self.path(t))
        if self.streamed:
            self.io_seconds += time.perf_counter() - t0
        self.kept[t] = slot

    def adopt(self, t: int) -> None:
        """Take vector ``t``'s existing file as kept (a resumed run; file-backed bases only)."""
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
        """The vectors ``ts`` in sweep order: runs of consecutive slots, ≤ ``GROUP`` each."""
        by_slot = sorted((self.kept[t], t) for t in ts)
        out: list[list[int]] = []
        prev = None
        for slot, t in by_slot:
            if out and prev is not None and slot == prev + 1 and len(out[-1]) < GROUP:
                out[-1].append(t)
            else:
                out.append([t])
            prev = slot
        return out

    def rows(self, group: Sequence[int]) -> torch.Tensor:
        """The vectors of one group as a ``(len(group), n)`` tensor on the work device."""
        if self._rows is not None:
            s = self.kept[group[0]]
            block = self._rows[s : s + len(group)]
            if block.device == self.device:
                return block
            t0 = time.perf_counter()
            out = block.to(self.device, non_blocking=True)
            self.io_seconds += time.perf_counter() - t0
            return out
        t0 = time.perf_counter()
        buf = self._buf[: len(group)]
        raw = buf.view(torch.uint8).numpy()  # (k, bytes per vector); bf16 has no numpy dtype
        for i, t in enumerate(group):
            target = raw[i]
            with open(self.path(t), "rb") as f:
                got = f.readinto(memoryview(target))
            if got != target.nbytes:
                raise OSError(f"{self.path(t)}: read {got} bytes, {target.nbytes} expected")
        out = buf.to(self.device, non_blocking=True) if self.device.type != "cpu" else buf
        self.io_seconds += time.perf_counter() - t0
        return out

    def vector(self, t: int) -> torch.Tensor:
        """Vector ``t`` as a flat tensor on the work device (a copy when streamed)."""
        r = self.rows([t])[0]
        return r.clone() if self._rows is None else r

    def dots(self, groups: list[list[int]], w: Vector) -> torch.Tensor:
        """This rank's float64 sums ``q_t · w`` for the vectors of ``groups``, in their order
        (the caller all-reduces them).
        """
        out = []
        for g in groups:
            Q = self.rows(g)
            acc = None
            for cols, wi in zip(self.layout.columns(Q), w):
                if cols.shape[1]:
                    d = block_dots(cols, wi)
                    acc = d if acc is None else acc + d
            if acc is None:
                acc = torch.zeros(len(g), dtype=torch.float64, device=self.device)
            out.append(acc)
        if not out:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        return torch.cat(out)

    def subtract(self, groups: list[list[int]], c: torch.Tensor, w: Vector) -> None:
        """In place ``w -= Σ c_t q_t`` over the vectors of ``groups`` (``c`` in their order)."""
        k = 0
        for g in groups:
            Q = self.rows(g)
            cg = c[k : k + len(g)]
            k += len(g)
            for cols, wi in zip(self.layout.columns(Q), w):
                if cols.shape[1]:
                    block_subtract(cols, cg, wi)

    def close(self, *, keep_files: bool = False) -> None:
        """Drop the rows; remove this run's files (and the directory if it made it and it is
        empty) unless ``keep_files``.
        """
        self._rows = self._buf = None
        if self.dir is None or keep_files:
            return
        for t in list(self.kept):
            self.path(t).unlink(missing_ok=True)
        for p in self.dir.glob(f"{self.name}.*.rank{_dist.rank()}.*"):
            p.unlink(missing_ok=True)
        self.kept.clear()
        if self._made_dir:
            try:
                self.dir.rmdir()
            except OSError:  # other ranks' (or the user's) files are still there
                pass
