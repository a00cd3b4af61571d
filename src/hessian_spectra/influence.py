"""Influence functions with exact inverse-HVPs (Koh & Liang 2017; FSHP §3).

The influence of up-weighting a training example ``z`` on the loss of the query data ``q`` is

    I(z, q) = d L_q(θ*_ε) / dε |_{ε=0} = − ∇L_q(θ)^T (H + λ I)^{-1} ∇l_z(θ),

with ``θ*_ε`` the minimiser of the (damped) training objective plus ``ε l_z``, ``H`` the Hessian
of the training objective (the operator) and λ the damping. A **negative** score means that
up-weighting ``z`` lowers the query loss (a helpful example), a **positive** one that it raises
it (a harmful one). We solve ``(H + λI) s = ∇L_q`` once by CG (``cg_solve``) and score every
candidate by ``−s · ∇l_z``: one CG solve plus one gradient per candidate. The gradients come
from the operator's own objective (same model, loss, parameters, mode and reduction).

**Per example** (the default): every row of every candidate batch is scored on its own
(:func:`split_batch` cuts a batch into batches of one), so there is one score per training
sequence, with ``batch_index`` / ``row_index`` saying where it came from. ``l_z`` is then
``loss_fn`` on that one row, with its own weight ``w_z`` (e.g. its number of target tokens);
with ``reduction="sum"`` the gradient is ``w_z ∇l_z``, as a batch's is ``w_b ∇l_b``. Where a
batch's loss is the weighted mean of its rows' losses (``l_b = Σ_i w_i l_i / w_b``: no
interaction between rows, as in eval mode without batch norm), the scores add up exactly:
a batch's score is ``Σ_i (w_i / w_b) · score_i`` (``"mean"``) or ``Σ_i score_i`` (``"sum"``).
A row of weight 0 (no target tokens) is not part of the objective: its score is 0. Cost: one
gradient per example. ``per_example=False`` scores whole batches instead.

**Damping** ``"auto"`` (the default) takes λ from a short Lanczos run
(:func:`~hessian_spectra.solvers.auto_damping`: about ``1.5 · |λ_min|`` on an indefinite
Hessian, at least 1% of ``|λ|_max``), so that ``H + λI`` is positive definite; the choice and
its estimates are in ``result.damping_choice``. A number is used as given.

When CG does not reach its tolerance (negative curvature: raise ``damping`` above −λ_min; or
``max_iter``), the scores are not the influence that was asked for: ``result.status`` is then
``"not_converged"`` and ``result.converged`` is False.

>>> import hessian_spectra as hs
>>> from hessian_spectra.testing import make_problem
>>> model, loss_fn, batches = make_problem("mlp")        # batches of 3, 5 and 2 rows
>>> op = hs.HessianOperator(model, loss_fn, batches, method="exact")
>>> res = hs.influence(op, batches[:1], batches)
>>> res.status, res.scores.shape, res.damping_choice.term
('complete', (10,), 'curvature')
>>> res.batch_index.tolist(), res.row_index.tolist()
([0, 0, 0, 1, 1, 1, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ._progress import progress_bar
from .objective import batch_size
from .operators import HessianOperator
from .partition import ZeroWeight
from .solvers import CGInfo, DampingChoice, auto_damping, cg_solve
from .vectors import dot

__all__ = ["InfluenceResult", "influence", "split_batch"]


@dataclass
class InfluenceResult:
    """Influence scores (negative = helpful, positive = harmful), where each came from, the
    query loss, the damping and the CG report; ``status`` says whether the scores are what was
    asked for.

    Fields:
        scores: one score per example (``per_example``) or per candidate batch, in order.
        batch_index: the candidate batch of each score.
        row_index: its row within that batch (None for per-batch scores).
        weights: the loss weight of each scored example or batch (``loss_fn``'s, or 1).
        query_loss: the query loss ``L_q(θ)``.
        cg: the CG report of the solve ``(H + λI) s = ∇L_q``.
        damping: the λ used.
        damping_choice: how ``damping="auto"`` chose λ (None for a given number).
        per_example: whether the scores are per example.
        config: the settings (tol, max_iter, counts).
    """

    scores: np.ndarray
    batch_index: np.ndarray
    row_index: np.ndarray | None
    weights: np.ndarray
    query_loss: float
    cg: CGInfo
    damping: float
    damping_choice: DampingChoice | None = None
    per_example: bool = True
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

    def most_helpful(self, k: int = 10) -> list[int]:
        """Indices of the (at most) ``k`` most negative scores, most helpful first.

        >>> r = InfluenceResult(np.array([0.5, -2.0, -1.0]), np.zeros(3, int), None,
        ...                     np.ones(3), 0.0, CGInfo(0), 0.0)
        >>> r.most_helpful(5), r.most_harmful(5)
        ([1, 2], [0])
        """
        order = np.argsort(self.scores, kind="stable")
        return [int(i) for i in order if self.scores[i] < 0][:k]

    def most_harmful(self, k: int = 10) -> list[int]:
        """Indices of the (at most) ``k`` most positive scores, most harmful first."""
        order = np.argsort(-self.scores, kind="stable")
        return [int(i) for i in order if self.scores[i] > 0][:k]

    def to_dict(self) -> dict:
        """A JSON-ready dict: scores with their batch and row, the damping (and how it was
        chosen), the CG report, status and convergence.
        """
        return {
            "scores": self.scores.tolist(),
            "batch_index": self.batch_index.tolist(),
            "row_index": None if self.row_index is None else self.row_index.tolist(),
            "weights": self.weights.tolist(),
            "per_example": self.per_example,
            "query_loss": self.query_loss,
            "damping": self.damping,
            "damping_choice": (
                None if self.damping_choice is None else self.damping_choice.to_dict()
            ),
            "status": self.status,
            "converged": self.converged,
            "relative_residual": self.relative_residual,
            "cg": self.cg.to_dict(),
            "config": self.config,
        }


def split_batch(batch) -> list:
    """The examples of ``batch``, each a batch of one (the leading dimension kept).

    Every tensor of ``batch`` (a tensor, or tensors inside tuples, lists and dicts, nested) is
    cut along its first dimension, the number of examples ``B`` (that of the first tensor);
    other objects (numbers, strings, None) go to every example unchanged. A tensor whose first
    dimension is not ``B`` cannot be split (score whole batches instead).

    >>> ex = split_batch({"input_ids": torch.arange(6).reshape(2, 3), "scale": 0.5})
    >>> len(ex), ex[1]["input_ids"].tolist(), ex[1]["scale"]
    (2, [[3, 4, 5]], 0.5)
    """
    if isinstance(batch, ZeroWeight):
        return [ZeroWeight(e) for e in split_batch(batch.batch)]
    B = batch_size(batch)
    if B is None:
        raise ValueError(
            "cannot split this batch into examples: it holds no tensor with a batch dimension. "
            "Score whole batches (per_example=False)."
        )
    return [_row(batch, i, B) for i in range(B)]


def _row(x, i: int, B: int):
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            return x
        if x.shape[0] != B:
            raise ValueError(
                f"cannot split this batch into its {B} examples: it holds a tensor of shape "
                f"{tuple(x.shape)} whose first dimension is not {B}. Score whole batches "
                "(per_example=False), or give every tensor the batch dimension first."
            )
        return x[i : i + 1]
    if isinstance(x, dict):
        return type(x)((k, _row(v, i, B)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        rows = [_row(v, i, B) for v in x]
        return type(x)(*rows) if hasattr(x, "_fields") else type(x)(rows)
    return x


def _weighted_gradient(obj, batch):
    """``(w, ∇)`` of one batch under the objective: ``w`` its weight, ``∇`` the gradient of the
    objective restricted to it (``∇l`` for ``"mean"``, ``w ∇l`` for ``"sum"``); ``∇`` is None
    when ``w`` is 0 (the batch is not part of the objective).
    """
    one = obj.with_batches([batch])
    one.progress = False
    one.first_use()
    with one.stash_grads(), one.mode():
        rec = one.grad_pass(1.0, "")
        w = float(rec.weights[0])
        if w == 0.0 and math.isfinite(float(rec.losses[0])):
            return 0.0, None
        N = one.normaliser(rec)
        g = one.read_grads()
        torch._foreach_mul_(g, one.grad_scale / N)
    one.check_finite(g, what="gradient")
    return w, g


def influence(
    op: HessianOperator,
    query_batches,
    candidates,
    *,
    per_example: bool = True,
    damping: float | str = "auto",
    damping_steps: int = 20,
    tol: float = 1e-6,
    max_iter: int = 100,
    progress: bool = False,
) -> InfluenceResult:
    """Influence of each example (or batch) of ``candidates`` on the loss over ``query_batches``.

    Args:
        op: the Hessian of the training objective; its objective (model, loss_fn, parameters,
            mode, reduction) gives the gradients too.
        query_batches: re-iterable batches whose loss (the operator's reduction) is the query.
        candidates: re-iterable of training batches.
        per_example: one score per example (row) of every candidate batch (module docstring;
            one gradient each), else one per batch.
        damping: λ ≥ 0 added to H, or ``"auto"``: chosen by
            :func:`~hessian_spectra.solvers.auto_damping` from ``damping_steps`` Lanczos steps
            so that ``H + λI`` is positive definite.
        damping_steps: Lanczos steps (= HVPs) for ``damping="auto"``.
        tol, max_iter: passed to ``cg_solve``. When CG meets negative curvature or runs out of
            iterations, ``result.status`` is ``"not_converged"`` (raise ``damping``, or
            ``max_iter``).
        progress: progress bars over the Lanczos steps and the candidates (rank 0 only).

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
    units = []  # (batch, row or None, the batch to take the gradient of)
    for b, batch in enumerate(cands):
        if per_example:
            units += [(b, r, ex) for r, ex in enumerate(split_batch(batch))]
        else:
            units.append((b, None, batch))
    choice = None
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(f"damping must be a number ≥ 0 or 'auto', got {damping!r}")
        choice = auto_damping(op, num_steps=damping_steps, progress=progress)
        lam = choice.value
    else:
        lam = float(damping)
    obj = op.objective
    q_loss, g_q = obj.with_batches(query_batches).gradient()
    s, info = cg_solve(op, g_q, damping=lam, tol=tol, max_iter=max_iter)
    scores, weights = [], []
    unit = "example" if per_example else "batch"
    with progress_bar(progress, total=len(units), desc="influence", unit=unit) as bar:
        for _, _, batch in units:
            w, g = _weighted_gradient(obj, batch)
            scores.append(0.0 if g is None else -dot(s, g))
            weights.append(w)
            if bar is not None:
                bar.update(1)
    return InfluenceResult(
        scores=np.asarray(scores, dtype=np.float64),
        batch_index=np.asarray([u[0] for u in units], dtype=np.int64),
        row_index=np.asarray([u[1] for u in units], dtype=np.int64) if per_example else None,
        weights=np.asarray(weights, dtype=np.float64),
        query_loss=q_loss,
        cg=info,
        damping=float(lam),
        damping_choice=choice,
        per_example=bool(per_example),
        config={
            "tol": tol,
            "max_iter": max_iter,
            "damping": damping if isinstance(damping, str) else float(damping),
            "damping_steps": damping_steps if choice is not None else None,
            "per_example": bool(per_example),
            "num_candidates": len(cands),
            "num_scores": len(units),
        },
    )
