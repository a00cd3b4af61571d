"""Influence functions with exact inverse-HVPs (Koh & Liang 2017; FSHP §3).

The influence of up-weighting training batch ``z`` on the loss of the query data ``q`` is

    I(z, q) = − ∇L_q(θ)^T (H + λ I)^{-1} ∇l_z(θ),

with ``H`` the Hessian of the training objective (the operator) and λ the damping. We solve
``(H + λI) s = ∇L_q`` once by CG (``cg_solve``) and score every candidate by ``−s · ∇l_z``,
so the cost is one CG solve plus one gradient per candidate. A negative score means that
up-weighting ``z`` lowers the query loss (a helpful example), a positive one that it raises it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .operators import HessianOperator
from .solvers import CGInfo, cg_solve
from .vectors import dot

__all__ = ["InfluenceResult", "influence"]


@dataclass
class InfluenceResult:
    """Scores (one per candidate batch, same order), the query loss and the CG report."""

    scores: np.ndarray
    query_loss: float
    cg: CGInfo
    damping: float
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "scores": self.scores.tolist(),
            "query_loss": self.query_loss,
            "damping": self.damping,
            "cg": self.cg.to_dict(),
            "config": self.config,
        }


def influence(op: HessianOperator, query_batches, candidates, *, damping: float = 0.0, tol: float = 1e-6,
              max_iter: int = 100, progress: bool = False) -> InfluenceResult:
    """Influence of each batch in ``candidates`` on the average loss over ``query_batches``.

    Args:
        op: the Hessian of the training objective (its model, loss_fn and parameters are used
            for the gradients too).
        query_batches: re-iterable batches whose dataset-averaged loss is the query.
        candidates: re-iterable of training batches (one score each; a batch of one example
            gives per-example influence).
        damping, tol, max_iter: passed to ``cg_solve``; when CG meets negative curvature it
            stops early and says so in ``result.cg`` (raise ``damping``).
    """
    if not isinstance(op, HessianOperator):
        raise TypeError("influence needs a HessianOperator (its model and loss_fn give the gradients)")
    kw = dict(params=op.param_names, train_mode=op.train_mode, check_determinism=False)
    q_loss, g_q = HessianOperator(op.model, op.loss_fn, query_batches, **kw).gradient()
    s, info = cg_solve(op, g_q, damping=damping, tol=tol, max_iter=max_iter)
    cands = list(candidates)
    if not cands:
        raise ValueError("candidates is empty: pass at least one training batch to score")
    it = cands
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cands, desc="influence", unit="batch")
    scores = []
    for b in it:
        _, g = HessianOperator(op.model, op.loss_fn, [b], **kw).gradient()
        scores.append(-dot(s, g))
    return InfluenceResult(scores=np.asarray(scores), query_loss=q_loss, cg=info, damping=float(damping),
                           config={"tol": tol, "max_iter": max_iter, "num_candidates": len(cands)})
