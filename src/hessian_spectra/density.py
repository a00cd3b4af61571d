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

**Negative mass.** ``negative_mass(threshold)`` is the mass of the nodes below ``−threshold``.
On real models nearly all weight sits on one node at ≈ 0 whose sign is rounding noise
(−2e-4 next to λ_max ≈ 500 on SmolLM2-135M), so the summary's headline ``negative_mass`` uses
``threshold = NEGATIVE_MASS_REL_TOL · max(|λ_max|, |λ_min|)`` (1e-3 of the spectrum's scale) and
reports the raw mass below 0 as ``negative_mass_below_zero``.

Probe ``s`` uses seed ``seed + s``: probes are the same at every world size and a run can be
extended or resumed probe by probe.

>>> import torch
>>> from hessian_spectra import DenseOperator
>>> op = DenseOperator(torch.diag(torch.linspace(-1.0, 2.0, 50, dtype=torch.float64)))
>>> dens = slq(op, 10, 4, seed=0)
>>> dens.nodes.shape, round(dens.trace(), 6)  # tr(H) = 25, and the trace of a diagonal is exact
((4, 10), 25.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ._checks import check_positive_int, dtype_name, parse_dtype, std_error
from ._progress import progress_bar
from .basis import recycled_files
from .lanczos import LanczosResult, lanczos
from .linop import as_operator

__all__ = ["NEGATIVE_MASS_REL_TOL", "SpectralDensity", "slq"]

#: The summary's ``negative_mass`` counts nodes below ``−NEGATIVE_MASS_REL_TOL · max|λ|``.
NEGATIVE_MASS_REL_TOL = 1e-3


@dataclass
class SpectralDensity:
    """SLQ result: one ``LanczosResult`` per probe, and the estimates built from them.

    Fields:
        runs: the per-probe Lanczos runs (their tridiagonals, nodes and weights).
        num_params: dimension P of the operator (to scale normalised traces to tr(H)).
        config: the settings (num_steps, num_probes, seed, reorth, basis dtype, method, eps).

    >>> run = LanczosResult(alpha=[2.0, 2.0], beta=[1.0])  # nodes 1 and 3, weights 1/2 each
    >>> dens = SpectralDensity([run], num_params=10)
    >>> dens.trace(), dens.moment(2)
    (20.0, 5.0)
    """

    runs: list[LanczosResult]
    num_params: int
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.runs:
            raise ValueError("a SpectralDensity needs at least one probe's Lanczos run")

    @property
    def num_probes(self) -> int:
        """The number of probes (Lanczos runs)."""
        return len(self.runs)

    @property
    def nodes(self) -> np.ndarray:
        """(num_probes, num_steps) Ritz values; runs that broke down early are padded with
        their last node at weight 0.
        """
        m = max(r.num_steps for r in self.runs)
        return np.stack(
            [np.pad(r.ritz_values, (0, m - r.num_steps), mode="edge") for r in self.runs]
        )

    @property
    def weights(self) -> np.ndarray:
        """(num_probes, num_steps) quadrature weights; each row sums to 1."""
        m = max(r.num_steps for r in self.runs)
        return np.stack([np.pad(r.ritz_weights, (0, m - r.num_steps)) for r in self.runs])

    @property
    def lambda_max(self) -> float:
        """The largest node over all probes (estimates the largest eigenvalue)."""
        return float(max(r.ritz_values[-1] for r in self.runs))

    @property
    def lambda_min(self) -> float:
        """The smallest node over all probes (estimates the smallest eigenvalue)."""
        return float(min(r.ritz_values[0] for r in self.runs))

    def default_sigma(self) -> float:
        """The smoothing width of the σ rule (module docstring)."""
        lo, hi = self.lambda_min, self.lambda_max
        if hi - lo > 1e-12 * max(abs(lo), abs(hi), 1e-300):
            return 0.01 * (hi - lo)
        return 0.01 * max(abs(hi), 1.0)

    def default_grid(self, num: int = 1001, sigma: float | None = None) -> np.ndarray:
        """``num`` points over ``[λ_min − 5σ, λ_max + 5σ]``, where the density integrates to 1."""
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
        return std_error(self.num_params * np.sum(self.weights * self.nodes, axis=1))

    def negative_mass(self, threshold: float = 0.0) -> float:
        """Fraction of the spectrum below ``−threshold``: the mean over probes of the sum of the
        weights w_i of the nodes θ_i < −threshold (``threshold=0``: the raw mass below zero).
        """
        return float(np.mean(np.sum(self.weights * (self.nodes < -threshold), axis=1)))

    def negative_mass_threshold(self) -> float:
        """``NEGATIVE_MASS_REL_TOL · max(|λ_max|, |λ_min|)``: nodes closer to 0 than this are
        not counted as negative curvature in the summary (module docstring).
        """
        return NEGATIVE_MASS_REL_TOL * max(abs(self.lambda_max), abs(self.lambda_min))

    def summary(self) -> dict:
        """The headline numbers (the first four names fixed by API.md).

        ``lambda_max``, ``lambda_min``, ``trace`` (+ ``trace_std_error``), ``negative_mass``: the
        mass below ``−negative_mass_threshold`` (module docstring), ``negative_mass_below_zero``:
        the raw mass of nodes < 0 (counts the near-zero bulk), ``num_probes``, ``num_steps``,
        ``sigma``.

        >>> from hessian_spectra import LanczosResult
        >>> bulk_and_outliers = LanczosResult(alpha=[-1e-9, -1.0, 1.0], beta=[0.0, 0.0])
        >>> s = SpectralDensity([bulk_and_outliers], 3).summary()
        >>> s["negative_mass"], s["negative_mass_below_zero"]  # the node at -1e-9 is the bulk
        (0.0, 1.0)
        """
        threshold = self.negative_mass_threshold()
        return {
            "lambda_max": self.lambda_max,
            "lambda_min": self.lambda_min,
            "trace": self.trace(),
            "trace_std_error": self.trace_std_error(),
            "negative_mass": self.negative_mass(threshold),
            "negative_mass_threshold": threshold,
            "negative_mass_below_zero": self.negative_mass(),
            "num_probes": self.num_probes,
            "num_steps": int(max(r.num_steps for r in self.runs)),
            "sigma": self.default_sigma(),
            "num_ghosts": int(sum(r.num_ghosts for r in self.runs)),
        }

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``num_params``, ``config``, ``runs`` (``LanczosResult.to_dict``)
        and ``summary``.
        """
        return {
            "num_params": int(self.num_params),
            "config": dict(self.config),
            "runs": [r.to_dict() for r in self.runs],
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> SpectralDensity:
        """The density back from ``to_dict()``; a malformed dict is a ``ValueError`` /
        ``TypeError`` naming what is missing or wrong.

        >>> d = {"num_params": 10, "runs": [{"alpha": [2.0, 2.0], "beta": [1.0]}]}
        >>> SpectralDensity.from_dict(d).trace()
        20.0
        """
        if not isinstance(d, Mapping):
            raise TypeError(
                f"SpectralDensity.from_dict expected a dict (from SpectralDensity.to_dict()), "
                f"got {type(d).__name__}"
            )
        missing = [k for k in ("num_params", "runs") if k not in d]
        if missing:
            raise ValueError(
                f"SpectralDensity.from_dict: missing key(s) {', '.join(map(repr, missing))}; "
                "a density is stored with 'num_params' and its per-probe 'runs'"
            )
        runs, config = d["runs"], d.get("config", {})
        if not isinstance(runs, list):
            raise TypeError(
                f"SpectralDensity.from_dict: 'runs' must be a list of Lanczos runs "
                f"(LanczosResult.to_dict()), got {type(runs).__name__}"
            )
        if not isinstance(config, Mapping):
            raise TypeError(
                f"SpectralDensity.from_dict: 'config' must be a dict, got {type(config).__name__}"
            )
        parsed = []
        for i, r in enumerate(runs):
            try:
                parsed.append(LanczosResult.from_dict(r))
            except (TypeError, ValueError) as e:
                raise type(e)(f"SpectralDensity.from_dict: runs[{i}]: {e}") from None
        try:
            num_params = check_positive_int("num_params", d["num_params"])
        except ValueError as e:
            raise ValueError(f"SpectralDensity.from_dict: {e}") from None
        return cls(runs=parsed, num_params=num_params, config=dict(config))


def slq(
    op,
    num_steps: int,
    num_probes: int,
    *,
    seed: int = 0,
    reorth="full",
    basis_dtype=None,
    basis_dir=None,
    basis_device=None,
    probe: str = "rademacher",
    runs: list[LanczosResult] | None = None,
    on_probe=None,
    checkpoint_dir=None,
    progress: bool = False,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature with ``num_probes`` probes of ``num_steps`` steps.

    Args:
        op: an operator (``HessianOperator``, ``DenseOperator``, anything ``as_operator``
            takes), or a square matrix.
        runs: Lanczos runs already finished (probes 0..len(runs)−1): they are kept and the
            rest are computed, so an interrupted run resumes probe by probe.
        on_probe: ``on_probe(index, SpectralDensity_so_far)`` after every probe (save there).
        checkpoint_dir: a folder for mid-probe Lanczos state (``probe{s}.safetensors``, see
            :mod:`hessian_spectra.lanczos_state`).
        basis_dir, basis_device: where each probe's Lanczos vectors are kept (files, host
            memory), as in ``lanczos``; the first probe's files are overwritten in place by
            the next probes' vectors (:func:`~hessian_spectra.basis.recycled_files`) and
            removed at the end.
        Other arguments as in ``lanczos``.

    >>> import torch
    >>> from hessian_spectra import DenseOperator
    >>> op = DenseOperator(torch.diag(torch.tensor([-1.0, 1.0, 2.0, 3.0], dtype=torch.float64)))
    >>> dens = slq(op, 4, 2)  # 4 steps span the whole space: the nodes are the eigenvalues
    >>> dens.nodes.round(12).tolist()
    [[-1.0, 1.0, 2.0, 3.0], [-1.0, 1.0, 2.0, 3.0]]
    """
    op = as_operator(op)
    num_probes = check_positive_int("num_probes", num_probes)
    done = list(runs or [])
    if len(done) > num_probes:
        raise ValueError(f"{len(done)} finished runs given but only num_probes={num_probes} asked")
    config = {
        "num_steps": check_positive_int("num_steps", num_steps),
        "num_probes": num_probes,
        "seed": int(seed),
        "reorth": reorth,
        "basis_dtype": dtype_name(parse_dtype(basis_dtype, "basis_dtype")),
        "probe": probe,
        "method": op.method,
        "eps": getattr(op, "eps", None),  # fd operators only: not part of the Operator contract
    }
    # the probes' basis files: written once, then overwritten in place (basis.recycled_files)
    with (
        recycled_files(basis_dir),
        progress_bar(
            progress, total=num_probes, initial=len(done), desc="SLQ probes", unit="probe"
        ) as bar,
    ):
        for s in range(len(done), num_probes):
            ck = None if checkpoint_dir is None else f"{checkpoint_dir}/probe{s}.safetensors"
            done.append(
                lanczos(
                    op,
                    num_steps,
                    seed=seed + s,
                    reorth=reorth,
                    basis_dtype=basis_dtype,
                    basis_dir=basis_dir,
                    basis_device=basis_device,
                    probe=probe,
                    checkpoint=ck,
                    progress=progress,
                )
            )
            if bar is not None:
                bar.update(1)
            if on_probe is not None:
                on_probe(s, SpectralDensity(list(done), op.num_params, config))
    return SpectralDensity(done, op.num_params, config)
