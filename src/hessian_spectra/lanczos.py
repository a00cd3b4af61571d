"""The Lanczos process on a symmetric operator (FSHP eq. 8).

    beta_{j+1} q_{j+1} = H q_j − alpha_j q_j − beta_j q_{j−1},   alpha_j = q_j · H q_j

Reorthogonalisation (``reorth``):
- ``"full"``: every new vector is orthogonalised against all stored vectors by classical
  Gram–Schmidt (one batched all-reduce per pass), a second time when the first pass removed
  more than ``1 − 1/√2`` of its norm (Kahan–Parlett, "twice is enough"); memory ``m`` vectors.
- ``r`` (int ≥ 1): a sliding window: only against the last ``r`` vectors; memory
  ``max(r, 2)``.
- ``"none"`` (or 0): the plain three-term recurrence; memory 2 vectors.
Add one work vector ``w`` (and the matvec's own), and two more in the operator's dtype when
``basis_dtype`` differs from it. With the kept vectors streamed (``basis_dir``, or
``basis_device`` other than the operator's) Lanczos holds only ``q_j`` during the product
and, in the vector work, ``w`` and one chunk of the basis (:mod:`hessian_spectra.basis`),
whatever ``m``; plus one vector in the operator's dtype when ``basis_dtype`` differs from it.
  Without reorthogonalisation, Ritz values that have converged reappear as "ghosts"
  (Paige 1971; FSHP Thm 4.1): fine for densities with few steps, wrong for multiplicities.

Vectors are stored in ``basis_dtype`` (bf16 halves memory), each as one flat buffer (rows of a
:class:`~hessian_spectra.basis.KrylovBasis`, in memory, in host memory or in files:
``basis_device``, ``basis_dir``); scalars are float64, dot products of float64 vectors are
float64 and others float32 per block of 2^16 entries summed in float64 (error ≲ 2^-16 ·
Σ|u_i v_i|, :func:`hessian_spectra.vectors.dot`); the matvec runs in the operator's dtype.
Per step the vector work is one dot, one fused update ``w −= alpha q + beta q_prev``, one norm
and one scale (≈ 4.5 copies of a vector); with ``k`` kept vectors the dot and the scale, then
two sweeps of the basis, each reading the ``k`` rows: the three-term update (``q_j`` and
``q_{j-1}`` are rows) with the dots and the norm of its result, then the Gram–Schmidt update
with the dots and the norm of its result (a third sweep for a second pass when one is
needed): ``benchmarks/lanczos_vector_work.py`` measures it.

A step whose ``beta`` falls below ``breakdown_tol · scale`` (scale: the largest
``|alpha| + beta`` seen, an estimate of ||H||) means an invariant subspace was found: Lanczos
stops there and says so, never dividing by ~0.

The state after each step can be written to ``checkpoint`` and a later call with the same path
resumes from it (:mod:`hessian_spectra.lanczos_state`: safetensors + JSON, one file per rank,
never unpickled).

>>> import torch
>>> from hessian_spectra import DenseOperator
>>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)))
>>> res = lanczos(op, 4)
>>> res.ritz_values.round(12).tolist()
[1.0, 2.0, 3.0, 4.0]
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from . import distributed as _dist
from ._checks import check_positive_int, dtype_name, parse_dtype
from ._progress import progress_bar
from .basis import KrylovBasis, Layout
from .lanczos_state import LanczosState, checkpoint_path, resume, save_checkpoint
from .linop import as_operator
from .vectors import Vector, _as, axpy, cast, check_vector, dot, norm, random_probe, scale

__all__ = ["GhostWarning", "LanczosResult", "lanczos", "tridiagonal_eigh"]


def tridiagonal_eigh(alpha, beta):
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal T(alpha, beta).

    >>> vals, vecs = tridiagonal_eigh([2.0, 2.0], [1.0])
    >>> vals.tolist()
    [1.0, 3.0]
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    if alpha.size == 0:
        return np.zeros(0), np.zeros((0, 0))
    if alpha.size == 1:
        return alpha.copy(), np.ones((1, 1))
    return eigh_tridiagonal(alpha, beta)


def _floats(d: Mapping, key: str, default=None) -> np.ndarray:
    """``d[key]`` as a 1-D float64 array of finite numbers, or a ValueError naming the key."""
    x = d.get(key, default)
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        a = None
    if a is None or a.ndim != 1 or not np.all(np.isfinite(a)):
        raise ValueError(
            f"LanczosResult.from_dict: {key!r} must be a list of finite numbers, got {x!r:.80}"
        )
    return a


def _scalar(d: Mapping, key: str, default: float) -> float:
    """``d[key]`` (default ``default``) as a float, or a TypeError naming the key."""
    x = d.get(key, default)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"LanczosResult.from_dict: {key!r} must be a number, got {x!r:.80}")
    return float(x)


@dataclass
class LanczosResult:
    """The tridiagonal ``T_m`` of one Lanczos run and its eigen-decomposition.

    Fields:
        alpha: diagonal of T (length m), float64.
        beta: off-diagonal of T (length m − 1), float64.
        ritz_values: eigenvalues of T, ascending (the quadrature nodes of SLQ).
        ritz_weights: squared first components of T's eigenvectors (sum to 1).
        breakdown: True when an invariant subspace was found after m < num_steps steps.
        residual_beta: beta_{m} after the last step (the size of the next residual), or 0.0.
        v0_norm: the norm of the starting vector (before normalisation).
        config: the settings of the run (num_steps asked, reorth, basis dtype, seed, method).
        seconds: wall time of the run.
        matvec_seconds: the part of ``seconds`` spent in the operator's products.
        vector_seconds: the part spent in vector work (dots, updates, reorthogonalisation).
        io_seconds: the part spent in basis files, host–device transfers and checkpoints.
        vector_dtype: the dtype the products and the recurrence ran in (the operator's vector
            dtype; its machine epsilon sets the ghost test's tolerance), or None if unknown.

    >>> r = LanczosResult(alpha=[2.0, 2.0], beta=[1.0])
    >>> r.ritz_values.tolist(), r.ritz_weights.round(12).tolist()
    ([1.0, 3.0], [0.5, 0.5])
    """

    alpha: np.ndarray
    beta: np.ndarray
    breakdown: bool = False
    residual_beta: float = 0.0
    v0_norm: float = 1.0
    config: dict = field(default_factory=dict)
    seconds: float = 0.0
    matvec_seconds: float = 0.0
    vector_seconds: float = 0.0
    io_seconds: float = 0.0
    vector_dtype: str | None = None
    ritz_values: np.ndarray = field(init=False)
    ritz_weights: np.ndarray = field(init=False)
    ritz_coords: np.ndarray = field(init=False, repr=False)
    basis: list | None = field(default=None, repr=False)

    def __post_init__(self):
        self.alpha = np.asarray(self.alpha, dtype=np.float64)
        self.beta = np.asarray(self.beta, dtype=np.float64)
        if self.beta.size != max(self.alpha.size - 1, 0):
            raise ValueError(
                f"beta must have length len(alpha) - 1; got {self.beta.size} and {self.alpha.size}"
            )
        vals, vecs = tridiagonal_eigh(self.alpha, self.beta)
        self.ritz_values = vals
        self.ritz_coords = vecs
        w = vecs[0, :] ** 2 if vecs.size else np.zeros(0)
        self.ritz_weights = w / w.sum() if w.size else w

    @property
    def num_steps(self) -> int:
        """The number of steps taken (m; fewer than asked after a breakdown)."""
        return int(self.alpha.size)

    @property
    def T(self) -> np.ndarray:
        """The dense tridiagonal (m, m)."""
        return np.diag(self.alpha) + np.diag(self.beta, 1) + np.diag(self.beta, -1)

    def residual_bounds(self) -> np.ndarray:
        """``|beta_m · s_{m,i}|``: the residual norm ||H y_i − θ_i y_i|| of each Ritz pair
        (exact arithmetic).
        """
        if self.alpha.size == 0:
            return np.zeros(0)
        return np.abs(self.residual_beta * self.ritz_coords[-1, :])

    @property
    def unit_roundoff(self) -> float:
        """Machine epsilon of the dtype the recurrence ran in (``vector_dtype``; else
        ``config["basis_dtype"]``; else float64).
        """
        from .ghosts import unit_roundoff

        return unit_roundoff(self.vector_dtype or self.config.get("basis_dtype"))

    def ghost_indices(self, tol: float | None = None) -> np.ndarray:
        """Indices into ``ritz_values`` of the spurious copies of converged Ritz values (FSHP
        Thm 4.1), by the Cullum–Willoughby test (:mod:`hessian_spectra.ghosts`); ``tol``
        default ``m · ε · ||T||₁`` (ε: ``unit_roundoff``). A run with full
        reorthogonalisation (``config["reorth"] == "full"``) is tested for copies only: a
        Ritz value of ~zero weight is genuine there.

        >>> LanczosResult(alpha=[1.0, 2.0, 3.0], beta=[0.5, 0.0]).ghost_indices().tolist()
        [2]
        """
        from .ghosts import ghost_indices

        return ghost_indices(
            self.alpha,
            self.beta,
            tol=tol,
            eps=self.unit_roundoff,
            full_reorth=self.config.get("reorth") == "full",
        )

    @property
    def num_ghosts(self) -> int:
        """The number of ghosts (``len(ghost_indices())``): 0 under full reorthogonalisation
        (in exact arithmetic, always).

        >>> LanczosResult(alpha=[2.0, 2.0], beta=[1.0]).num_ghosts
        0
        """
        return int(self.ghost_indices().size)

    def orthogonality_loss(self) -> np.ndarray:
        """Estimated ``max_{k<j} |q_j · q_k|`` at each step j, from ``alpha`` and ``beta`` by
        the ω-recurrence (no basis needed; :mod:`hessian_spectra.ghosts`), with the run's
        reorthogonalisation (``config["reorth"]``) taken into account.

        >>> r = LanczosResult(alpha=[1.0, 2.0, 3.0], beta=[1.0, 1.0], config={"reorth": "full"})
        >>> bool(r.orthogonality_loss().max() < 1e-15)
        True
        """
        from .ghosts import orthogonality_loss

        reorth = self.config.get("reorth", "full")
        window = None if reorth == "full" else 0 if reorth in ("none", None, 0) else int(reorth)
        return orthogonality_loss(self.alpha, self.beta, eps=self.unit_roundoff, window=window)

    def ritz_vectors(self, indices=None) -> list[Vector]:
        """Ritz vectors ``Q s_i`` (needs the basis: ``lanczos(..., return_basis=True)``)."""
        if self.basis is None:
            raise ValueError(
                "Ritz vectors need the Lanczos basis: run lanczos(..., return_basis=True)"
            )
        idx = range(self.num_steps) if indices is None else indices
        out = []
        for i in idx:
            s = self.ritz_coords[:, i]
            y = [
                torch.zeros_like(t, dtype=torch.float32 if t.dtype != torch.float64 else t.dtype)
                for t in self.basis[0]
            ]
            for c, q in zip(s, self.basis):
                axpy(float(c), q, y)
            out.append(y)
        return out

    def to_dict(self) -> dict:
        """A JSON-ready dict (the tridiagonal, nodes, weights, flags, config, seconds and their
        split).
        """
        return {
            "alpha": self.alpha.tolist(),
            "beta": self.beta.tolist(),
            "ritz_values": self.ritz_values.tolist(),
            "ritz_weights": self.ritz_weights.tolist(),
            "breakdown": bool(self.breakdown),
            "residual_beta": float(self.residual_beta),
            "v0_norm": float(self.v0_norm),
            "config": dict(self.config),
            "seconds": float(self.seconds),
            "matvec_seconds": float(self.matvec_seconds),
            "vector_seconds": float(self.vector_seconds),
            "io_seconds": float(self.io_seconds),
            "vector_dtype": self.vector_dtype,
            **self._ghost_report(),
        }

    def _ghost_report(self) -> dict:
        """``num_ghosts``, ``ghost_indices``, ``ghost_values`` and the final estimated
        ``orthogonality_loss`` (informational: ``from_dict`` recomputes them).
        """
        g = self.ghost_indices()
        w = self.orthogonality_loss()
        return {
            "num_ghosts": int(g.size),
            "ghost_indices": g.tolist(),
            "ghost_values": self.ritz_values[g].tolist(),
            "orthogonality_loss": float(w.max()) if w.size else 0.0,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> LanczosResult:
        """The result back from ``to_dict()`` (nodes and weights recomputed from alpha, beta);
        a malformed dict is a ``ValueError``/``TypeError`` naming the key.

        >>> LanczosResult.from_dict({"alpha": [2.0, 2.0], "beta": [1.0]}).ritz_values.tolist()
        [1.0, 3.0]
        """
        if not isinstance(d, Mapping):
            raise TypeError(
                f"LanczosResult.from_dict expected a dict (from LanczosResult.to_dict()), "
                f"got {type(d).__name__}"
            )
        missing = [k for k in ("alpha", "beta") if k not in d]
        if missing:
            raise ValueError(
                f"LanczosResult.from_dict: missing key(s) {', '.join(map(repr, missing))}; "
                "a Lanczos run is stored with its tridiagonal 'alpha' and 'beta'"
            )
        config = d.get("config", {})
        if not isinstance(config, Mapping):
            raise TypeError(
                f"LanczosResult.from_dict: 'config' must be a dict, got {type(config).__name__}"
            )
        return cls(
            alpha=_floats(d, "alpha"),
            beta=_floats(d, "beta"),
            breakdown=bool(d.get("breakdown", False)),
            residual_beta=_scalar(d, "residual_beta", 0.0),
            v0_norm=_scalar(d, "v0_norm", 1.0),
            config=dict(config),
            seconds=_scalar(d, "seconds", 0.0),
            matvec_seconds=_scalar(d, "matvec_seconds", 0.0),
            vector_seconds=_scalar(d, "vector_seconds", 0.0),
            io_seconds=_scalar(d, "io_seconds", 0.0),
            vector_dtype=d.get("vector_dtype") if isinstance(d.get("vector_dtype"), str) else None,
        )


def _parse_reorth(reorth) -> int | None:
    """None for full, 0 for none, r for a window of r."""
    if reorth == "full":
        return None
    if reorth in ("none", None, False):
        return 0
    if isinstance(reorth, bool) or not isinstance(reorth, (int, np.integer)):
        raise ValueError(f"reorth must be 'full', 'none' or a window size r ≥ 0, got {reorth!r}")
    if reorth < 0:
        raise ValueError(f"the reorthogonalisation window must be ≥ 0, got {reorth}")
    return int(reorth)


def _num_kept(window: int | None):
    """The map ``n ↦`` the number of kept vectors a checkpoint after ``n`` steps holds: those
    that step ``n`` reorthogonalises against besides ``q_n`` (all, or the last ``window − 1``).
    """
    return lambda n: n if window is None else min(n, max(window - 1, 0))


def _start(op, v0, seed: int, probe: str, work: torch.dtype, store: torch.dtype) -> LanczosState:
    """The state before step 0: ``q_0 = v0 / ||v0||`` (``v0`` default: a seeded ``probe``)."""
    if v0 is None:
        v0 = random_probe(op, seed, kind=probe, dtype=work)
    v0 = check_vector(v0, op.params, "v0")
    v0_norm = norm(v0)
    if not (v0_norm > 0 and math.isfinite(v0_norm)):
        raise ValueError(f"the starting vector has norm {v0_norm}; it must be nonzero and finite")
    q = [t.to(store) for t in scale(1.0 / v0_norm, [t.to(work, copy=True) for t in v0])]
    return LanczosState(alpha=[], beta=[], q=q, q_prev=None, v0_norm=v0_norm)


_UPDATE_BLOCK = 1 << 16  # entries per cache-sized block of the fused three-term update


def _three_term(w: Vector, q: Vector, alpha: float, q_prev: Vector | None, beta: float) -> None:
    """In place ``w -= alpha q + beta q_prev`` in one pass over ``w`` (blocks that stay in
    cache between the two updates); the same arithmetic, entry by entry, as two ``axpy``.
    A float64 ``q`` with a lower-precision ``w`` is converted block by block first (the mixed
    in-place kernel is 50× slower than a copy).
    """
    prev = q_prev if q_prev is not None else [None] * len(w)
    for wi, qi, pi in zip(w, q, prev):
        if qi.dtype == torch.float64 and wi.dtype != torch.float64 and wi.is_contiguous():
            wf, qf = wi.view(-1), qi.reshape(-1)
            pf = pi.reshape(-1) if pi is not None else None
            for s in range(0, wf.numel(), _UPDATE_BLOCK):
                blk = wf[s : s + _UPDATE_BLOCK]
                blk.add_(_as(qf[s : s + _UPDATE_BLOCK], wi.dtype), alpha=-alpha)
                if pf is not None:
                    blk.add_(_as(pf[s : s + _UPDATE_BLOCK], wi.dtype), alpha=-beta)
            continue
        if not wi.is_contiguous():
            wi.add_(qi, alpha=-alpha)
            if pi is not None:
                wi.add_(pi, alpha=-beta)
            continue
        wf, qf = wi.view(-1), qi.reshape(-1)
        pf = pi.reshape(-1) if pi is not None else None
        for s in range(0, wf.numel(), _UPDATE_BLOCK):
            blk = wf[s : s + _UPDATE_BLOCK]
            blk.add_(qf[s : s + _UPDATE_BLOCK], alpha=-alpha)
            if pf is not None:
                blk.add_(pf[s : s + _UPDATE_BLOCK], alpha=-beta)


def _update_and_reorthogonalise(
    w: Vector, basis: KrylovBasis, j: int, alpha: float, beta: float, lo: int
) -> float | None:
    """The three-term update ``w -= alpha q_j + beta q_{j-1}`` and then ``w -= Q Qᵀ w``
    against the kept vectors ``t ≥ lo`` by classical Gram–Schmidt, a second time only when the
    first pass removed much of ``w`` (``‖w'‖ < ‖w‖/√2``, the Kahan–Parlett criterion of "twice
    is enough", Parlett 1998 §6.9; Giraud et al. 2005): with ``w`` nearly orthogonal to the
    basis already, as it is after the three-term update, one pass leaves ``|q·w'|`` at the
    rounding level of the dot products and a second would not lower it.

    ``q_j`` and ``q_{j-1}`` are rows of the basis, so the update needs no vector of its own:
    sweeps of the basis (:meth:`hessian_spectra.basis.KrylovBasis.sweep`), one all-reduce
    after each: the three-term update with the dots (and ``‖w‖``) of its result chunk by
    chunk, then the Gram–Schmidt update with the dots (and ``‖w'‖``) of its result, then, if
    needed, the second update. Returns ``‖w‖`` after it, or None when it must be computed.
    """
    ts = {t for t in basis.kept if t >= lo} | {j} | ({j - 1} if j > 0 else set())
    groups = basis.groups(sorted(ts))
    order = [t for g in groups for t in g]
    c = torch.tensor(
        [alpha if t == j else beta if t == j - 1 else 0.0 for t in order], dtype=torch.float64
    )
    window = torch.tensor([t >= lo for t in order])
    r = _dist.sum_over_shards(basis.sweep(groups, w, subtract=c, norm=True))
    before = math.sqrt(max(float(r[-1]), 0.0))
    r = _dist.sum_over_shards(basis.sweep(groups, w, subtract=r[:-1] * window, norm=True))
    after = math.sqrt(max(float(r[-1]), 0.0))
    if after >= before / math.sqrt(2.0):
        return after
    basis.sweep(groups, w, subtract=r[:-1] * window, dots=False)
    return None


def _basis_name(ckpt) -> str | None:
    """The file stem of an offloaded basis: tied to the checkpoint (so that a resumed run finds
    its files), else a fresh one.
    """
    return None if ckpt is None else f"{ckpt.name.split('.rank')[0]}-basis"


def lanczos(
    op,
    num_steps: int,
    *,
    v0: Vector | None = None,
    seed: int = 0,
    reorth="full",
    basis_dtype: torch.dtype | str | None = None,
    basis_dir: str | os.PathLike | None = None,
    basis_device: torch.device | str | None = None,
    probe: str = "rademacher",
    breakdown_tol: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    return_basis: bool = False,
    callback=None,
    progress: bool = False,
) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps on ``op`` (module docstring).

    Args:
        op: an operator (``HessianOperator``, ``DenseOperator``, anything ``as_operator`` takes),
            or a square matrix.
        num_steps: the number of steps m (≤ op.num_params).
        v0: the starting vector; default a seeded ``probe`` (``random_probe(op, seed)``).
        reorth: ``"full"``, ``"none"`` or a window size ``r``.
        basis_dtype: storage dtype of the Lanczos vectors (e.g. ``torch.bfloat16`` or
            ``"bfloat16"``); default the operator's vector dtype. Scalars are always float64.
        basis_dir: keep the vectors kept for reorthogonalisation in files under this directory
            (one per vector per rank, read a chunk of columns at a time; removed when the run
            ends, also on an error, unless a ``checkpoint`` needs them): the resident memory
            no longer grows with the number of steps (one vector, ``q_j`` during the product
            and ``w`` after it, and two chunks of the basis, beside the operator's own memory).
            The numbers are the same as in memory.
        basis_device: keep them in memory on this device instead of the operator's (e.g.
            ``"cpu"`` for host memory with a model on a GPU); ignored with ``basis_dir``.
        breakdown_tol: relative threshold on beta; default ``100 · ε_mach`` of the vector dtype.
        checkpoint: file to save the state to after every step and to resume from
            (safetensors + JSON, see :mod:`hessian_spectra.lanczos_state`); removed at the end.
            With ``basis_dir`` it references the basis files instead of copying them.
        return_basis: keep the vectors on the result (``result.basis``) for Ritz vectors;
            requires ``reorth="full"``.
        callback: ``callback(step, alpha, beta)`` after every step; returning ``True`` stops
            the run there (the result is that of ``num_steps=step + 1``: a stopping rule, e.g.
            on the Ritz residuals, as :class:`~hessian_spectra.tracker.CurvatureTracker` does).
        progress: show a progress bar over the steps (rank 0).

    The result's ``matvec_seconds``, ``vector_seconds`` and ``io_seconds`` split its
    ``seconds``: the operator's products, the vector work (dots, updates, reorthogonalisation)
    and the basis files / host transfers / checkpoint writes.

    >>> import torch
    >>> from hessian_spectra import DenseOperator
    >>> eigs = torch.cat([torch.linspace(0, 1, 98), torch.tensor([50.0, 100.0])]).double()
    >>> res = lanczos(DenseOperator(torch.diag(eigs)), 20, seed=0)  # outliers converge first
    >>> res.ritz_values[-2:].round(9).tolist(), res.alpha.shape, res.beta.shape
    ([50.0, 100.0], (20,), (19,))
    """
    op = as_operator(op)
    num_steps = check_positive_int("num_steps", num_steps)
    if num_steps > op.num_params:
        raise ValueError(
            f"num_steps={num_steps} exceeds the operator's dimension {op.num_params}: "
            "a Krylov space has at most that many dimensions; ask for fewer steps"
        )
    window = _parse_reorth(reorth)
    if return_basis and window is not None:
        raise ValueError(
            "return_basis=True needs reorth='full' (the window keeps only the last vectors)"
        )
    work = op.vector_dtype
    store = parse_dtype(basis_dtype, "basis_dtype") or work
    tol = breakdown_tol if breakdown_tol is not None else 100 * torch.finfo(work).eps
    config = {
        "num_steps": num_steps,
        "reorth": reorth if window is None or window == 0 else int(window),
        "basis_dtype": dtype_name(store),
        "seed": int(seed) if v0 is None else None,
        "probe": probe if v0 is None else "given",
        "method": op.method,
        "num_params": int(op.num_params),
    }
    if basis_dir is not None and window != 0:
        config["basis_storage"] = "files"
    ckpt = checkpoint_path(checkpoint)
    t0 = time.perf_counter()
    layout = Layout(op.params)
    basis = None
    if window != 0:
        basis = KrylovBasis(
            layout,
            store,
            capacity=(num_steps if window is None else max(window, 2)),
            basis_device=basis_device,
            basis_dir=basis_dir,
            name=_basis_name(ckpt),
        )
    ok = False
    try:
        res = _run(
            op,
            num_steps,
            window,
            basis,
            layout,
            v0,
            seed,
            probe,
            work,
            store,
            tol,
            config,
            ckpt,
            t0,
            callback,
            progress,
        )
        if return_basis:
            res.basis = [
                layout.views(basis.vector(t).clone() if basis.streamed else basis.vector(t))
                for t in range(res.num_steps)
            ]
        ok = True
    finally:
        if basis is not None:  # files stay for a checkpoint to resume from after an error
            basis.close(keep_files=not ok and ckpt is not None)
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    if window == 0 and not res.breakdown:
        _warn_ghosts(res)
    return res


class GhostWarning(UserWarning):
    """Lanczos without reorthogonalisation produced ghosts (spurious copies of Ritz values)."""


def _warn_ghosts(res: LanczosResult) -> None:
    """Warn (``GhostWarning``) when a run without reorthogonalisation has ghosts."""
    n = res.num_ghosts
    if n:
        import warnings

        warnings.warn(
            f"Lanczos with reorth='none' and {res.num_steps} steps produced {n} ghost(s) "
            f"(spurious copies of converged Ritz values, FSHP Thm 4.1; estimated loss of "
            f"orthogonality {res.orthogonality_loss().max():.2g}): the density's weights are "
            "still usable, multiplicities and counts are not; use reorth='full' or a window, "
            "or fewer steps",
            GhostWarning,
            stacklevel=3,
        )


def _run(
    op,
    num_steps,
    window,
    basis,
    layout,
    v0,
    seed,
    probe,
    work,
    store,
    tol,
    config,
    ckpt,
    t0,
    callback,
    progress,
) -> LanczosResult:
    """The steps of :func:`lanczos` (its arguments, checked)."""
    st = resume(
        ckpt,
        config,
        params=op.params,
        dtype=store,
        num_kept=_num_kept(window) if basis is None or basis.dir is None else (lambda n: 0),
        basis_name=basis.name if basis is not None and basis.dir is not None else None,
    )
    if st is None:
        st = _start(op, v0, seed, probe, work, store)
    t0 -= st.seconds
    n0 = st.num_steps
    io_s = st.io_seconds
    matvec_s = st.matvec_seconds
    vector_s = st.vector_seconds
    # q_j and q_{j-1} as flat buffers in the basis dtype: rows of a resident basis (no copy
    # to keep them); without a basis two buffers used in turn; with a streamed one (files, host
    # memory) one buffer: q_j, in the basis once the step starts, is not needed after the dot
    # for alpha (the update takes q_j and q_{j-1} from the basis), and q_{j+1} takes its place
    # (a file is written from that buffer during the HVP; the sweep waits for it, then the
    # buffer is free)
    resident = basis is not None and not basis.streamed
    streamed = basis is not None and basis.streamed
    flat = [] if resident else [layout.empty(store) for _ in range(1 if streamed else 2)]
    bufs: dict[int, torch.Tensor] = {}

    def place(t: int, vec: Vector | None) -> None:
        if resident:
            buf = basis.claim(t)
        else:
            buf = flat[t % len(flat)]
        if vec is not None:
            for view, x in zip(layout.views(buf), vec):
                view.copy_(x)
        bufs[t] = buf

    if basis is not None and n0:
        if basis.dir is not None:
            for t in st.basis_kept:
                basis.adopt(t)
        for k, vec in enumerate(st.kept):
            t = n0 - len(st.kept) + k
            if resident:
                place(t, vec)
            else:
                tmp = layout.empty(store)
                for view, x in zip(layout.views(tmp), vec):
                    view.copy_(x)
                basis.put(t, tmp)
                del tmp
    if n0 and n0 - 1 not in bufs and not (streamed and n0 - 1 in basis.kept):
        place(n0 - 1, st.q_prev)
        if streamed:
            basis.put(n0 - 1, bufs.pop(n0 - 1))
            basis.flush()  # its buffer takes q_{n0} next
    place(n0, st.q)
    st.q = st.q_prev = None
    st.kept = []
    # with a basis in another dtype: q_j (and q_{j-1}) also in the operator's dtype, buffers
    # kept for the run (the matvec's input, then the dot and the three-term update: no
    # conversion in them); one with a streamed basis
    qwork = None
    if store != work:
        qwork = [layout.empty(work)] if streamed else [layout.empty(work), layout.empty(work)]
        if n0 and not streamed:
            qwork[(n0 - 1) % 2].copy_(bufs[n0 - 1])
    io_s0 = basis.io_seconds if basis is not None else 0.0
    breakdown, residual = False, 0.0
    with progress_bar(
        progress, total=num_steps, initial=n0, desc="Lanczos", unit="step", leave=False
    ) as bar:
        for j in range(n0, num_steps):
            tv = time.perf_counter()
            if streamed:
                basis.put(j, bufs[j])
                bufs.pop(j - 1, None)
                if qwork is not None:
                    qwork[0].copy_(bufs.pop(j))  # q_j in the basis dtype is in the basis now
                q = layout.views(qwork[0] if qwork is not None else bufs[j])
                q_prev = None  # a row of the basis
            else:
                q = layout.views(bufs[j])  # q_j
                q_prev = layout.views(bufs[j - 1]) if j > 0 else None  # q_{j-1}
                if qwork is not None:
                    qwork[j % 2].copy_(bufs[j])
                    q = layout.views(qwork[j % 2])
                    q_prev = layout.views(qwork[(j - 1) % 2]) if j > 0 else None
            tm = time.perf_counter()
            w = cast(op.matvec(q), work)  # H q_j
            w = [wi if wi.is_contiguous() else wi.contiguous() for wi in w]
            tw = time.perf_counter()
            matvec_s += tw - tm
            alpha = dot(w, q)
            beta = None
            if basis is None:  # w = H q_j − alpha_j q_j − beta_j q_{j−1}
                _three_term(w, q, alpha, q_prev, st.beta[-1] if q_prev is not None else 0.0)
            else:  # the same from the basis' rows, then Gram–Schmidt
                q = q_prev = None
                if streamed:  # q_j is in the basis: its buffer can go
                    bufs.pop(j, None)
                lo = 0 if window is None else j + 1 - window
                beta = _update_and_reorthogonalise(
                    w, basis, j, alpha, st.beta[-1] if j > 0 else 0.0, lo
                )
            beta = norm(w) if beta is None else beta  # beta_{j+1}
            vector_s += (tm - tv) + (time.perf_counter() - tw)
            if not (math.isfinite(alpha) and math.isfinite(beta)):
                raise FloatingPointError(
                    f"Lanczos step {j}: alpha={alpha}, beta={beta} are not finite"
                )
            st.alpha.append(alpha)
            st.scale = max(st.scale, abs(alpha) + beta + (st.beta[-1] if st.beta else 0.0))
            residual = beta
            stop = callback is not None and callback(j, alpha, beta) is True
            if bar is not None:
                bar.update(1)
            if j == num_steps - 1 or stop:  # stop: as if num_steps had been j + 1
                break
            if beta <= tol * st.scale:  # an invariant subspace: T_{j+1} is exact
                breakdown = True
                break
            st.beta.append(beta)
            tv = time.perf_counter()
            place(j + 1, None)  # q_{j+1} = w / beta, over q_{j+1-capacity} (or q_{j-1})
            nxt = bufs[j + 1]
            for view, wi in zip(layout.views(nxt), w):
                torch.mul(wi, 1.0 / beta, out=view)
            w = None
            bufs.pop(j - 1, None)
            vector_s += time.perf_counter() - tv
            if ckpt is not None:
                tc = time.perf_counter()
                prev = bufs[j] if j in bufs else basis.vector(j)
                st.q, st.q_prev = layout.views(nxt), layout.views(prev)
                st.kept = []
                st.basis_kept = []
                if basis is not None:
                    nk = _num_kept(window)(j + 1)
                    keep = sorted(t for t in basis.kept if t <= j)[-nk:] if nk else []
                    if basis.dir is not None:
                        st.basis_kept = keep
                    else:
                        st.kept = [layout.views(basis.vector(t)) for t in keep]
                st.seconds = time.perf_counter() - t0
                st.matvec_seconds = matvec_s
                moved = basis.io_seconds - io_s0 if basis is not None else 0.0
                st.vector_seconds, st.io_seconds = vector_s - moved, io_s + moved
                if basis is not None:
                    basis.flush()  # the checkpoint names files that must be whole
                save_checkpoint(ckpt, st, config, basis_name=basis.name if st.basis_kept else None)
                st.q = st.q_prev = None
                st.kept = []
                prev = None
                io_s += time.perf_counter() - tc

    io_s += basis.io_seconds - io_s0 if basis is not None else 0.0
    vector_s -= basis.io_seconds - io_s0 if basis is not None else 0.0
    return LanczosResult(
        alpha=st.alpha,
        beta=st.beta,
        breakdown=breakdown,
        residual_beta=0.0 if breakdown else residual,
        v0_norm=st.v0_norm,
        config=config,
        seconds=time.perf_counter() - t0,
        matvec_seconds=matvec_s,
        vector_seconds=vector_s,
        io_seconds=io_s,
        vector_dtype=dtype_name(work),
    )
