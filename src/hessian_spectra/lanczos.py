"""The Lanczos process on a symmetric operator (FSHP eq. 8).

    beta_{j+1} q_{j+1} = H q_j − alpha_j q_j − beta_j q_{j−1},   alpha_j = q_j · H q_j

Reorthogonalisation (``reorth``):
- ``"full"``: every new vector is orthogonalised twice (classical Gram–Schmidt, one batched
  all-reduce per pass) against all stored vectors; memory ``m`` vectors.
- ``r`` (int ≥ 1): a sliding window: only against the last ``r`` vectors; memory ``2 + r``.
- ``"none"`` (or 0): the plain three-term recurrence; memory 2 vectors (+ the matvec's).
  Without reorthogonalisation, Ritz values that have converged reappear as "ghosts"
  (Paige 1971; FSHP Thm 4.1): fine for densities with few steps, wrong for multiplicities.

Vectors are stored in ``basis_dtype`` (bf16 halves memory); every dot product and scalar is
float64 and the matvec runs in the operator's dtype. A step whose ``beta`` falls below
``breakdown_tol · scale`` (scale: the largest ``|alpha| + beta`` seen, an estimate of ||H||)
means an invariant subspace was found: Lanczos stops there and says so, never dividing by ~0.

The state after each step can be written to ``checkpoint`` (atomically; one file per rank) and
a later call with the same path resumes from it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from . import distributed as _dist
from .linop import as_operator
from .vectors import Vector, axpy, cast, check_vector, dot, dots, norm, random_probe, scale

__all__ = ["LanczosResult", "lanczos", "tridiagonal_eigh"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def tridiagonal_eigh(alpha, beta):
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal T(alpha, beta)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    if alpha.size == 0:
        return np.zeros(0), np.zeros((0, 0))
    if alpha.size == 1:
        return alpha.copy(), np.ones((1, 1))
    return eigh_tridiagonal(alpha, beta)


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
    """

    alpha: np.ndarray
    beta: np.ndarray
    breakdown: bool = False
    residual_beta: float = 0.0
    v0_norm: float = 1.0
    config: dict = field(default_factory=dict)
    seconds: float = 0.0
    ritz_values: np.ndarray = field(init=False)
    ritz_weights: np.ndarray = field(init=False)
    ritz_coords: np.ndarray = field(init=False, repr=False)
    basis: list | None = field(default=None, repr=False)

    def __post_init__(self):
        self.alpha = np.asarray(self.alpha, dtype=np.float64)
        self.beta = np.asarray(self.beta, dtype=np.float64)
        if self.beta.size != max(self.alpha.size - 1, 0):
            raise ValueError(f"beta must have length len(alpha) - 1; got {self.beta.size} and {self.alpha.size}")
        vals, vecs = tridiagonal_eigh(self.alpha, self.beta)
        self.ritz_values = vals
        self.ritz_coords = vecs
        w = vecs[0, :] ** 2 if vecs.size else np.zeros(0)
        self.ritz_weights = w / w.sum() if w.size else w

    @property
    def num_steps(self) -> int:
        return int(self.alpha.size)

    @property
    def T(self) -> np.ndarray:
        """The dense tridiagonal (m, m)."""
        return np.diag(self.alpha) + np.diag(self.beta, 1) + np.diag(self.beta, -1)

    def residual_bounds(self) -> np.ndarray:
        """``|beta_m · s_{m,i}|``: the residual norm ||H y_i − θ_i y_i|| of each Ritz pair (exact arithmetic)."""
        if self.alpha.size == 0:
            return np.zeros(0)
        return np.abs(self.residual_beta * self.ritz_coords[-1, :])

    def ritz_vectors(self, indices=None) -> list[Vector]:
        """Ritz vectors ``Q s_i`` (needs the basis: ``lanczos(..., return_basis=True)``)."""
        if self.basis is None:
            raise ValueError("Ritz vectors need the Lanczos basis: run lanczos(..., return_basis=True)")
        idx = range(self.num_steps) if indices is None else indices
        out = []
        for i in idx:
            s = self.ritz_coords[:, i]
            y = [torch.zeros_like(t, dtype=torch.float32 if t.dtype != torch.float64 else t.dtype) for t in self.basis[0]]
            for c, q in zip(s, self.basis):
                axpy(float(c), q, y)
            out.append(y)
        return out

    def to_dict(self) -> dict:
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
        }

    @classmethod
    def from_dict(cls, d: dict) -> LanczosResult:
        return cls(
            alpha=d["alpha"],
            beta=d["beta"],
            breakdown=d.get("breakdown", False),
            residual_beta=d.get("residual_beta", 0.0),
            v0_norm=d.get("v0_norm", 1.0),
            config=d.get("config", {}),
            seconds=d.get("seconds", 0.0),
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


def _checkpoint_path(checkpoint) -> Path | None:
    if checkpoint is None:
        return None
    p = Path(checkpoint)
    if _dist.world_size() > 1:
        p = p.with_name(f"{p.name}.rank{_dist.rank()}")
    return p


def _save_atomic(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lanczos(
    op,
    num_steps: int,
    *,
    v0: Vector | None = None,
    seed: int = 0,
    reorth="full",
    basis_dtype: torch.dtype | str | None = None,
    probe: str = "rademacher",
    breakdown_tol: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    return_basis: bool = False,
    callback=None,
    progress: bool = False,
) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps on ``op`` (module docstring).

    Args:
        op: a ``HessianOperator``, anything with ``matvec`` and ``params``, or a square matrix.
        num_steps: the number of steps m (≤ op.num_params).
        v0: the starting vector; default a seeded ``probe`` (``random_probe(op, seed)``).
        reorth: ``"full"``, ``"none"`` or a window size ``r``.
        basis_dtype: storage dtype of the Lanczos vectors (e.g. ``torch.bfloat16``); default the
            operator's vector dtype. Scalars are always float64.
        breakdown_tol: relative threshold on beta; default ``100 · ε_mach`` of the vector dtype.
        checkpoint: file to save the state to after every step and to resume from.
        return_basis: keep the vectors on the result (``result.basis``) for Ritz vectors;
            requires ``reorth="full"``.
        callback: ``callback(step, alpha, beta)`` after every step.
        progress: show a progress bar over the steps (rank 0).
    """
    op = as_operator(op)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    if num_steps > op.num_params:
        raise ValueError(
            f"num_steps={num_steps} exceeds the operator's dimension {op.num_params}: "
            "a Krylov space has at most that many dimensions; ask for fewer steps"
        )
    window = _parse_reorth(reorth)
    if return_basis and window is not None:
        raise ValueError("return_basis=True needs reorth='full' (the window keeps only the last vectors)")
    work = op.vector_dtype
    if isinstance(basis_dtype, str):
        if basis_dtype not in _DTYPES:
            raise ValueError(f"basis_dtype must be one of {list(_DTYPES)}, got {basis_dtype!r}")
        basis_dtype = _DTYPES[basis_dtype]
    store = basis_dtype or work
    tol = breakdown_tol if breakdown_tol is not None else 100 * torch.finfo(work).eps
    config = {
        "num_steps": num_steps,
        "reorth": reorth if window is None or window == 0 else int(window),
        "basis_dtype": _dtype_name(store),
        "seed": seed if v0 is None else None,
        "probe": probe if v0 is None else "given",
        "method": getattr(op, "method", "dense"),
        "num_params": int(op.num_params),
    }
    ckpt = _checkpoint_path(checkpoint)
    t0 = time.perf_counter()

    state = None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if ckpt is not None:  # per-rank files: every rank must resume from the same step
        _dist.check_agree(
            -1 if state is None else len(state["alpha"]),
            f"the Lanczos checkpoint step ({ckpt}; -1: no file)",
            "A run stopped while the ranks were writing it: delete the checkpoint files to restart.",
        )
    if state is not None:
        if state["config"] != config:
            raise ValueError(
                f"the checkpoint {ckpt} was written by a run with other settings "
                f"({state['config']} vs {config}); delete it or use another path"
            )
        dev = [_dist.local(p).device for p in op.params]
        alphas, betas = state["alpha"], state["beta"]
        q = [t.to(d) for t, d in zip(state["q"], dev)]
        q_prev = None if state["q_prev"] is None else [t.to(d) for t, d in zip(state["q_prev"], dev)]
        kept = [[t.to(d) for t, d in zip(vec, dev)] for vec in state["kept"]]
        scale_est, v0_norm, start = state["scale"], state["v0_norm"], len(alphas)
        t0 -= state.get("seconds", 0.0)
    else:
        if v0 is None:
            v0 = random_probe(op, seed, kind=probe, dtype=work)
        v0 = check_vector(v0, op.params, "v0")
        v0_norm = norm(v0)
        if not (v0_norm > 0 and np.isfinite(v0_norm)):
            raise ValueError(f"the starting vector has norm {v0_norm}; it must be nonzero and finite")
        q = [t.to(store) for t in scale(1.0 / v0_norm, [t.to(work, copy=True) for t in v0])]
        q_prev, kept = None, []
        alphas, betas, scale_est, start = [], [], 0.0, 0

    breakdown, residual = False, 0.0
    bar = None
    if progress and _dist.is_rank0():
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, desc="Lanczos", unit="step", leave=False)
    try:
        for j in range(start, num_steps):
            if window is None or window > 0:
                kept.append(q)
                if window is not None and len(kept) > window:
                    kept.pop(0)
            w = op.matvec(cast(q, work))
            w = [t if t.dtype == work else t.to(work) for t in w]
            alpha = dot(w, q)
            axpy(-alpha, q, w)
            if q_prev is not None:
                axpy(-betas[-1], q_prev, w)
            for _ in range(2 if kept else 0):  # CGS2: twice is enough (Giraud et al. 2005)
                c = dots(kept, w)
                for ci, k in zip(c.tolist(), kept):
                    axpy(-ci, k, w)
            beta = norm(w)
            if not np.isfinite(alpha) or not np.isfinite(beta):
                raise FloatingPointError(f"Lanczos step {j}: alpha={alpha}, beta={beta} are not finite")
            alphas.append(alpha)
            scale_est = max(scale_est, abs(alpha) + beta + (betas[-1] if betas else 0.0))
            residual = beta
            if callback is not None:
                callback(j, alpha, beta)
            if bar is not None:
                bar.update(1)
            if j == num_steps - 1:
                break
            if beta <= tol * scale_est:
                breakdown = True
                break
            betas.append(beta)
            q_prev, q = q, [t.to(store) for t in scale(1.0 / beta, w)]
            if ckpt is not None:
                _save_atomic(
                    {
                        "config": config,
                        "alpha": alphas,
                        "beta": betas,
                        "q": [t.cpu() for t in q],
                        "q_prev": [t.cpu() for t in q_prev],
                        "kept": [[t.cpu() for t in k] for k in kept],
                        "scale": scale_est,
                        "v0_norm": v0_norm,
                        "seconds": time.perf_counter() - t0,
                    },
                    ckpt,
                )
    finally:
        if bar is not None:
            bar.close()
    res = LanczosResult(
        alpha=alphas,
        beta=betas,
        breakdown=breakdown,
        residual_beta=0.0 if breakdown else residual,
        v0_norm=v0_norm,
        config=config,
        seconds=time.perf_counter() - t0,
    )
    if return_basis:
        res.basis = kept[: res.num_steps]
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    return res
