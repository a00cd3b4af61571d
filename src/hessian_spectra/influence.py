"""Influence functions with exact inverse-HVPs (Koh & Liang 2017; FSHP §3).

The influence of up-weighting training batch ``z`` on the loss of the query data ``q`` is

    I(z, q) = d L_q(θ*_ε) / dε |_{ε=0} = − ∇L_q(θ)^T (H + λ I)^{-1} ∇l_z(θ),

with ``θ*_ε`` the minimiser of the (damped) training objective plus ``ε l_z``, ``H`` the Hessian
of the training objective (the operator) and λ the damping. A **negative** score means that
up-weighting ``z`` lowers the query loss (a helpful example), a **positive** one that it raises
it (a harmful one). We solve ``(H + λI) s = ∇L_q`` once by CG (``cg_solve``) and score every
candidate by ``−s · ∇l_z``: one CG solve plus one gradient per candidate. The gradients come
from the operator's own objective (same model, loss, parameters, mode and reduction).

When CG does not reach its tolerance (negative curvature: raise ``damping`` above −λ_min; or
``max_iter``), the scores are not the influence that was asked for: ``result.status`` is then
``"not_converged"`` and ``result.converged`` is False.

>>> import hessian_spectra as hs
>>> from hessian_spectra.testing import make_problem
>>> model, loss_fn, batches = make_problem("mlp")
>>> op = hs.HessianOperator(model, loss_fn, batches, method="exact")
>>> res = hs.influence(op, batches[:1], batches, damping=10.0)
>>> res.status, res.scores.shape
('complete', (3,))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._progress import progress_bar
from .operators import HessianOperator
from .solvers import CGInfo, cg_solve
from .vectors import dot

__all__ = ["InfluenceResult", "influence"]


@dataclass
class InfluenceResult:
    """Scores (one per candidate batch, same order; negative = helpful), the query loss and
    the CG report; ``status`` says whether the scores are what was asked for.
    """

    scores: np.ndarray
    query_loss: float
    cg: CGInfo
    damping: float
    config: dict = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        """Whether CG reached its tolerance (else the scores are approximate)."""
        return bool(self.cg.converged)

    @property
    def status(self) -> str:
        """``"complete"`` when CG converged, else ``"not_converged"``."""
        return "complete" if self.converged else "not_converged"

    @property
    def relative_residual(self) -> float:
        """``||r_k|| / ||r_0||`` of the CG solve (0 for a zero right-hand side)."""
        return self.cg.relative_residual

    def to_dict(self) -> dict:
        """A JSON-ready dict (scores as a list, the CG report, status and convergence)."""
        return {
            "scores": self.scores.tolist(),
            "query_loss": self.query_loss,
            "damping": self.damping,
            "status": self.status,
            "converged": self.converged,
            "relative_residual": self.relative_residual,
            "cg": self.cg.to_dict(),
            "config": self.config,
        }


def influence(
    op: HessianOperator,
    query_batches,
    candidates,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iter: int = 100,
    progress: bool = False,
) -> InfluenceResult:
    """Influence of each batch in ``candidates`` on the loss over ``query_batches``.

    Args:
        op: the Hessian of the training objective; its objective (model, loss_fn, parameters,
            mode, reduction) gives the gradients too.
        query_batches: re-iterable batches whose loss (the operator's reduction) is the query.
        candidates: re-iterable of training batches (one score each; a batch of one example
            gives per-example influence).
        damping, tol, max_iter: passed to ``cg_solve``. When CG meets negative curvature or
            runs out of iterations, ``result.status`` is ``"not_converged"`` (raise
            ``damping``, or ``max_iter``).
        progress: a progress bar over the candidates (rank 0 only).

    Returns:
        an :class:`InfluenceResult`; ``scores[j] = −∇L_q^T (H + λI)^{-1} ∇l_j``.
    """
    if not isinstance(op, HessianOperator):
        raise TypeError(
            "influence needs a HessianOperator (its model and loss_fn give the gradients), got "
            f"{type(op).__name__}"
        )
    cands = list(candidates)
    if not cands:
        raise ValueError("candidates is empty: pass at least one training batch to score")
    obj = op.objective
    q_loss, g_q = obj.with_batches(query_batches).gradient()
    s, info = cg_solve(op, g_q, damping=damping, tol=tol, max_iter=max_iter)
    scores = []
    with progress_bar(progress, total=len(cands), desc="influence", unit="batch") as bar:
        for b in cands:
            _, g = obj.with_batches([b]).gradient()
            scores.append(-dot(s, g))
            if bar is not None:
                bar.update(1)
    return InfluenceResult(
        scores=np.asarray(scores),
        query_loss=q_loss,
        cg=info,
        damping=float(damping),
        config={"tol": tol, "max_iter": max_iter, "num_candidates": len(cands)},
    )
