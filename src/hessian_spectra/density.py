"""Stochastic Lanczos quadrature (SLQ): spectral density, trace and moments (FSHP eq. 9).

For a unit probe ``v`` and ``m`` Lanczos steps, ``v^T f(H) v ≈ e_1^T f(T_m) e_1 =
sum_i w_i f(θ_i)`` with nodes ``θ_i`` (Ritz values) and weights ``w_i`` (squared first
components of T_m's eigenvectors); the rule is exact for polynomials of degree ≤ 2m − 1.
Averaging over probes gives the spectral density

    ρ(λ) ≈ (1/S) sum_s sum_i w_i^(s) δ(λ − θ_i^(s)),

smoothed with a Gaussian of width σ. **σ rule** (``sigma=None``): ``σ = 0.01 · (λ_max − λ_min)``
over all nodes (``0.01 · max(|λ|, 1)`` when there is one distinct node). Each node's mass is a
full normalised Gaussian, so ``density`` integrates to 1 on any grid covering
``[λ_min − 5σ, λ_max + 5σ]`` (``default_grid`` gives one).

Probe ``s`` uses seed ``seed + s``: probes are the same at every world size and a run can be
extended or resumed probe by probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .lanczos import LanczosResult, lanczos
from .linop import as_operator

__all__ = ["SpectralDensity", "slq"]


@dataclass
class SpectralDensity:
    """SLQ result: one ``LanczosResult`` per probe, and the estimates built from them.

    Fields:
        runs: the per-probe Lanczos runs (their tridiagonals, nodes and weights).
        num_params: dimension P of the operator (to scale normalised traces to tr(H)).
        config: the settings (num_steps, num_probes, seed, reorth, basis dtype, method, eps).
    """

    runs: list[LanczosResult]
    num_params: int
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.runs:
            raise ValueError("a SpectralDensity needs at least one probe's Lanczos run")

    @property
    def num_probes(self) -> int:
        return len(self.runs)

    @property
    def nodes(self) -> np.ndarray:
        """(num_probes, num_steps) Ritz values; runs that broke down early are padded with
        their last node at weight 0."""
        m = max(r.num_steps for r in self.runs)
        return np.stack([np.pad(r.ritz_values, (0, m - r.num_steps), mode="edge") for r in self.runs])

    @property
    def weights(self) -> np.ndarray:
        """(num_probes, num_steps) quadrature weights; each row sums to 1."""
        m = max(r.num_steps for r in self.runs)
        return np.stack([np.pad(r.ritz_weights, (0, m - r.num_steps)) for r in self.runs])

    @property
    def lambda_max(self) -> float:
        return float(max(r.ritz_values[-1] for r in self.runs))

    @property
    def lambda_min(self) -> float:
        return float(min(r.ritz_values[0] for r in self.runs))

    def default_sigma(self) -> float:
        lo, hi = self.lambda_min, self.lambda_max
        if hi - lo > 1e-12 * max(abs(lo), abs(hi), 1e-300):
            return 0.01 * (hi - lo)
        return 0.01 * max(abs(hi), 1.0)

    def default_grid(self, num: int = 1001, sigma: float | None = None) -> np.ndarray:
        s = self.default_sigma() if sigma is None else sigma
        return np.linspace(self.lambda_min - 5 * s, self.lambda_max + 5 * s, num)

    def density(self, grid=None, sigma: float | None = None) -> np.ndarray:
        """Gaussian-smoothed density on ``grid`` (module docstring); integrates to 1."""
        s = self.default_sigma() if sigma is None else float(sigma)
        if not s > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        grid = self.default_grid(sigma=s) if grid is None else np.asarray(grid, dtype=np.float64)
        nodes, weights = self.nodes.reshape(-1), self.weights.reshape(-1) / self.num_probes
        z = (grid[:, None] - nodes[None, :]) / s
        return (np.exp(-0.5 * z**2) @ weights) / (s * math.sqrt(2 * math.pi))

    def moment(self, k: int) -> float:
        """``∫ λ^k ρ(λ) dλ`` ≈ tr(H^k) / P (exact per probe for k ≤ 2m − 1)."""
        return float(np.mean(np.sum(self.weights * self.nodes**k, axis=1)))

    def trace(self) -> float:
        """SLQ estimate of tr(H) = P · mean_probe sum_i w_i θ_i."""
        return self.num_params * self.moment(1)

    def trace_std_error(self) -> float:
        """Standard error of ``trace()`` across probes (nan with one probe)."""
        per = self.num_params * np.sum(self.weights * self.nodes, axis=1)
        return float(np.std(per, ddof=1) / math.sqrt(len(per))) if len(per) > 1 else float("nan")

    def negative_mass(self, threshold: float = 0.0) -> float:
        """Fraction of the spectrum below ``-threshold``: mean over probes of sum of w_i over θ_i < −threshold."""
        return float(np.mean(np.sum(self.weights * (self.nodes < -threshold), axis=1)))

    def summary(self) -> dict:
        """The headline numbers: lambda_max, lambda_min, trace, negative_mass (names fixed by API.md)."""
        return {
            "lambda_max": self.lambda_max,
            "lambda_min": self.lambda_min,
            "trace": self.trace(),
            "trace_std_error": self.trace_std_error(),
            "negative_mass": self.negative_mass(),
            "num_probes": self.num_probes,
            "num_steps": int(max(r.num_steps for r in self.runs)),
            "sigma": self.default_sigma(),
        }

    def to_dict(self) -> dict:
        return {
            "num_params": int(self.num_params),
            "config": dict(self.config),
            "runs": [r.to_dict() for r in self.runs],
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SpectralDensity:
        return cls(runs=[LanczosResult.from_dict(r) for r in d["runs"]], num_params=d["num_params"], config=d.get("config", {}))


def slq(
    op,
    num_steps: int,
    num_probes: int,
    *,
    seed: int = 0,
    reorth="full",
    basis_dtype=None,
    probe: str = "rademacher",
    runs: list[LanczosResult] | None = None,
    on_probe=None,
    checkpoint_dir=None,
    progress: bool = False,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature with ``num_probes`` probes of ``num_steps`` steps.

    Args:
        op: a ``HessianOperator``, anything with ``matvec``/``params``, or a square matrix.
        runs: Lanczos runs already finished (probes 0..len(runs)−1): they are kept and the
            rest are computed, so an interrupted run resumes probe by probe.
        on_probe: ``on_probe(index, SpectralDensity_so_far)`` after every probe (save there).
        checkpoint_dir: a folder for mid-probe Lanczos state (``probe{s}.pt``).
        Other arguments as in ``lanczos``.
    """
    op = as_operator(op)
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    done = list(runs or [])
    if len(done) > num_probes:
        raise ValueError(f"{len(done)} finished runs given but only num_probes={num_probes} asked")
    config = {
        "num_steps": int(num_steps),
        "num_probes": int(num_probes),
        "seed": int(seed),
        "reorth": reorth,
        "basis_dtype": str(basis_dtype).replace("torch.", "") if basis_dtype is not None else None,
        "probe": probe,
        "method": getattr(op, "method", "dense"),
        "eps": getattr(op, "eps", None),
    }
    bar = None
    if progress:
        from tqdm.auto import tqdm

        from . import distributed as _dist

        if _dist.is_rank0():
            bar = tqdm(total=num_probes, initial=len(done), desc="SLQ probes", unit="probe")
    try:
        for s in range(len(done), num_probes):
            ck = None if checkpoint_dir is None else f"{checkpoint_dir}/probe{s}.pt"
            done.append(
                lanczos(op, num_steps, seed=seed + s, reorth=reorth, basis_dtype=basis_dtype,
                        probe=probe, checkpoint=ck, progress=progress)
            )
            if bar is not None:
                bar.update(1)
            if on_probe is not None:
                on_probe(s, SpectralDensity(list(done), op.num_params, config))
    finally:
        if bar is not None:
            bar.close()
    return SpectralDensity(done, op.num_params, config)
