"""Curvature during training: λ_max (and the next k−1 eigenvalues) every N steps, warm-started.

:class:`CurvatureTracker` measures the Hessian of ``loss_fn`` over fixed ``probe_batches`` at
the model's current weights every ``every_n_steps`` optimizer steps:

- **Warm start.** Lanczos (full reorthogonalisation, :func:`~hessian_spectra.lanczos.lanczos`
  with ``v0=``) starts from the sum of the previous measurement's top-``k`` Ritz vectors plus a
  small random part (``warm_noise``, so that an eigenvalue rising past the tracked ones still
  has a component to grow from). Between two nearby weight vectors the top eigenvectors move
  little, so a few products suffice where a cold start needs tens.
- **Residual stopping.** After every Lanczos step the top-``k`` Ritz pairs' residual bounds
  ``|β_m s_{m,i}|`` (= ||H y_i − θ_i y_i||) are compared with ``tol · |θ_1|``, and Lanczos
  stops once all are below (``lanczos``'s ``callback`` returning True). Each ``θ_i`` is then
  within ``tol · |θ_1|`` of an eigenvalue of H. A run of ``chunk`` steps that has not converged
  restarts explicitly from the sum of its top Ritz vectors (memory stays ``chunk`` vectors).
- **Cold restarts.** Every ``cold_every``-th measurement, and whenever a warm run has not
  converged within ``max_matvecs`` products, the measurement is redone from a fresh random
  start (a stale vector is never followed silently: ``warm`` and ``cold_reason`` say so).
- **Never changes training.** Parameters, ``.grad``, buffers and train/eval mode are restored
  by the operator after every product (:class:`~hessian_spectra.objective.Objective`); the
  tracker also restores the CPU and CUDA RNG states, never touches the optimizer (it only reads
  its learning rate and, for ``preconditioned=True``, Adam's ``exp_avg_sq``), and keeps no
  autograd graph. A run with the tracker gives bit-identical weights to one without.
- **Logged per measurement** (the dict ``step`` returns): ``step``, ``lambda_max``,
  ``eigenvalues`` (k, descending), ``residuals``, ``converged``, ``matvecs``, ``seconds``,
  ``warm``, ``restarts`` (explicit Lanczos restarts), ``cold_reason``, and with an optimizer
  ``lr``, ``two_over_lr`` and, where the optimizer's edge of stability is known,
  ``stability_threshold``: 2/lr for plain SGD, (2 + 2β)/lr for SGD with heavy-ball momentum β
  (no Nesterov, no dampening), (2 + 2β₁)/((1 − β₁)·lr) for Adam's preconditioned sharpness
  (``preconditioned=True``; Cohen et al. 2022); optionally ``trace``/``trace_std_error`` and a
  ``density``.

Under FSDP2 every rank calls ``step`` (the products are collective); every rank gets the same
numbers and only rank 0 calls ``log_fn``.

>>> import torch
>>> from hessian_spectra.testing import make_problem
>>> model, loss_fn, batches = make_problem("mlp")
>>> tracker = CurvatureTracker(loss_fn, batches, every_n_steps=10, method="exact")
>>> tracker.step(model, 3) is None
True
>>> m = tracker.step(model, 10)
>>> m["converged"], m["warm"], len(m["eigenvalues"])
(True, False, 1)
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from . import distributed as _dist
from ._checks import check_positive_int
from .lanczos import lanczos, tridiagonal_eigh
from .operators import HessianOperator
from .vectors import Vector, axpy, cast, check_vector, norm, random_probe, scale

__all__ = ["CurvatureTracker", "PreconditionedOperator", "adam_preconditioner"]


class PreconditionedOperator:
    """``D H D`` with ``D = diag(d)``: with ``d = P^{-1/2}`` the preconditioned curvature
    ``P^{-1/2} H P^{-1/2}`` (same eigenvalues as ``P^{-1} H``), as the edge-of-stability
    literature measures it for adaptive optimizers.

    >>> import torch
    >>> from hessian_spectra import DenseOperator
    >>> op = PreconditionedOperator(DenseOperator(torch.eye(2, dtype=torch.float64)),
    ...                             [torch.tensor([2.0, 0.5], dtype=torch.float64)])
    >>> op.matvec([torch.ones(2, dtype=torch.float64)])[0].tolist()
    [4.0, 0.25]
    """

    def __init__(self, op, d: Vector):
        self.op = op
        self.d = check_vector(d, op.params, "d")
        self.params = op.params
        self.param_names = op.param_names
        self.num_params = op.num_params
        self.vector_dtype = op.vector_dtype
        self.method = f"preconditioned-{op.method}"

    def matvec(self, v: Vector) -> Vector:
        """``D H D v``."""
        dv = [a * b.to(a.dtype) for a, b in zip(v, self.d)]
        hv = self.op.matvec(dv)
        return [a * b.to(a.dtype) for a, b in zip(hv, self.d)]

    def __matmul__(self, v: Vector) -> Vector:
        return self.matvec(v)


def adam_preconditioner(optimizer, params, dtype=torch.float32) -> tuple[Vector, float] | None:
    """``(P^{-1/2}, threshold)`` from an Adam/AdamW optimizer: ``P = sqrt(v̂) + eps`` with
    ``v̂ = exp_avg_sq / (1 − β₂^t)`` (the step Adam takes is ``−lr · P^{-1} m̂``), and the
    stability threshold ``(2 + 2β₁) / ((1 − β₁) lr)`` of Cohen et al. (2022); None when the
    optimizer has no second-moment state for every parameter yet (before its first step).
    """
    if optimizer is None:
        return None
    d, group_of = [], {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            group_of[id(p)] = g
    for p in params:
        st = optimizer.state.get(p, {})
        g = group_of.get(id(p))
        if g is None or "exp_avg_sq" not in st or "betas" not in g:
            return None
        b1, b2 = g["betas"]
        t = float(st["step"]) if "step" in st else 1.0
        v = st["exp_avg_sq"].detach().to(dtype) / (1.0 - b2**t)
        d.append((v.sqrt() + g.get("eps", 1e-8)).rsqrt())
    g0 = optimizer.param_groups[0]
    b1 = g0["betas"][0]
    return d, (2.0 + 2.0 * b1) / ((1.0 - b1) * float(g0["lr"]))


def _sgd_threshold(optimizer) -> float | None:
    """The edge of stability of (heavy-ball) SGD: (2 + 2β)/lr; None for other optimizers."""
    lr = _learning_rate(optimizer)
    if lr is None or not isinstance(optimizer, torch.optim.SGD):
        return None
    g = optimizer.param_groups[0]
    beta = float(g.get("momentum", 0.0) or 0.0)
    if beta and (g.get("nesterov") or g.get("dampening", 0.0)):
        return None
    return (2.0 + 2.0 * beta) / lr


def _learning_rate(optimizer) -> float | None:
    if optimizer is None:
        return None
    try:
        lr = optimizer.param_groups[0]["lr"]
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
    return lr if lr > 0 else None


@contextlib.contextmanager
def _rng_preserved():
    """The CPU and CUDA RNG states restored afterwards."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _check_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < 1):
        raise ValueError(f"tol must be a relative tolerance in (0, 1), got {tol!r}")
    return float(tol)


class CurvatureTracker:
    """Warm-started λ_max (and the next ``k − 1`` eigenvalues) every ``every_n_steps`` steps
    (module docstring).

    Args:
        loss_fn: ``loss_fn(model, batch)`` → loss or ``(loss, weight)``, as for
            :class:`~hessian_spectra.operators.HessianOperator`.
        probe_batches: the fixed batches the Hessian is measured on (a list; the same every
            measurement, so that the numbers are comparable across steps).
        every_n_steps: measure when ``step % every_n_steps == 0``.
        k: how many of the largest eigenvalues to track.
        method: the HVP method (``"exact"``, ``"jvp"`` or ``"fd"``).
        eps: the fd step (``method="fd"``); default the scale-aware one.
        params: the parameters (names or tensors); default all with ``requires_grad``.
        tol: relative residual tolerance: stop when every tracked residual ≤ ``tol · |λ_max|``.
        chunk: the most steps of one warm Lanczos run (default ``2k + 18``; it stops earlier
            once converged: the residuals are checked after every step); a run that has not
            converged is restarted from its top Ritz vectors. Memory: ``chunk`` vectors.
        cold_steps: the same for the first run of a cold start (default ``2 · chunk``).
        max_matvecs: product budget of one warm (and of one cold) attempt.
        cold_every: redo from a random start every this many measurements (0: only when a warm
            run does not converge).
        warm_noise: relative norm of the random part added to the warm start vector.
        trace_every: also estimate tr(H) every this many measurements (0: never) with
            ``trace_matvecs`` products of ``trace_method``.
        density_every: also an SLQ density every this many measurements (0: never), with
            ``density_steps`` steps and ``density_probes`` probes.
        preconditioned: measure ``P^{-1/2} H P^{-1/2}`` with Adam's second moments (the
            optimizer passed to ``step`` must be Adam/AdamW); the threshold is Adam's.
        reduction, train_mode: as for ``HessianOperator``.
        seed: seeds the random starts and probes (measurement ``i`` uses ``seed + i``).
        log_fn: ``log_fn(metrics)`` on rank 0 after each measurement.
    """

    def __init__(
        self,
        loss_fn,
        probe_batches,
        *,
        every_n_steps: int = 100,
        k: int = 1,
        method: str = "exact",
        eps: float | None = None,
        params=None,
        tol: float = 1e-3,
        chunk: int | None = None,
        cold_steps: int | None = None,
        max_matvecs: int = 100,
        cold_every: int = 10,
        warm_noise: float = 1e-2,
        trace_every: int = 0,
        trace_matvecs: int = 30,
        trace_method: str = "xtrace",
        density_every: int = 0,
        density_steps: int = 30,
        density_probes: int = 2,
        preconditioned: bool = False,
        reduction: str = "mean",
        train_mode: bool = False,
        seed: int = 0,
        log_fn=None,
    ):
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch)")
        self.loss_fn = loss_fn
        self.probe_batches = list(probe_batches)
        if not self.probe_batches:
            raise ValueError("probe_batches is empty: give at least one batch to measure on")
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.k = check_positive_int("k", k)
        self.method, self.eps, self.params = method, eps, params
        self.tol = _check_tol(tol)
        self.chunk = check_positive_int("chunk", chunk or 2 * self.k + 18)
        self.cold_steps = check_positive_int("cold_steps", cold_steps or 2 * self.chunk)
        self.max_matvecs = check_positive_int("max_matvecs", max_matvecs)
        for name, v in (
            ("cold_every", cold_every),
            ("trace_every", trace_every),
            ("density_every", density_every),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer ≥ 0 (0: never), got {v!r}")
        self.cold_every, self.trace_every = cold_every, trace_every
        self.density_every = density_every
        if not (isinstance(warm_noise, (int, float)) and 0 <= warm_noise < 1):
            raise ValueError(f"warm_noise must be in [0, 1), got {warm_noise!r}")
        self.warm_noise = float(warm_noise)
        self.trace_matvecs = check_positive_int("trace_matvecs", trace_matvecs)
        self.trace_method = trace_method
        self.density_steps = check_positive_int("density_steps", density_steps)
        self.density_probes = check_positive_int("density_probes", density_probes)
        self.preconditioned = bool(preconditioned)
        self.reduction, self.train_mode, self.seed = reduction, bool(train_mode), int(seed)
        self.log_fn = log_fn
        self.vectors: list[Vector] | None = None  # the last top-k Ritz vectors
        self.measurements = 0
        self.history: list[dict] = []
        self._checked = False
        self.last_operator = None  # the operator of the last measurement (its .stats)

    def __repr__(self):
        return (
            f"CurvatureTracker(every_n_steps={self.every_n_steps}, k={self.k}, "
            f"method={self.method!r}, tol={self.tol}, measurements={self.measurements})"
        )

    # ------------------------------------------------------------------ measuring
    def should_measure(self, step: int) -> bool:
        """Whether ``step`` is a measurement step (``step % every_n_steps == 0``)."""
        return int(step) % self.every_n_steps == 0

    def operator(self, model, optimizer=None):
        """The operator measured at the model's current weights, and the stability threshold
        (None without an optimizer with a learning rate).
        """
        op = HessianOperator(
            model,
            self.loss_fn,
            self.probe_batches,
            method=self.method,
            eps=self.eps,
            params=self.params,
            reduction=self.reduction,
            train_mode=self.train_mode,
            check_determinism=not self._checked,
        )
        threshold = _sgd_threshold(optimizer)
        if self.preconditioned:
            pre = adam_preconditioner(optimizer, op.params, op.vector_dtype)
            if pre is None:
                raise ValueError(
                    "preconditioned=True needs an Adam/AdamW optimizer with second-moment state "
                    "(exp_avg_sq) for every tracked parameter: pass optimizer= to step() after "
                    "its first step, or use preconditioned=False"
                )
            op, threshold = PreconditionedOperator(op, pre[0]), pre[1]
        return op, threshold

    def step(self, model, step: int, optimizer=None) -> dict | None:
        """Measure when ``step`` is a multiple of ``every_n_steps`` (after the optimizer's
        step); returns the metrics dict (module docstring), or None on other steps.
        """
        if not self.should_measure(step):
            return None
        return self.measure(model, step, optimizer)

    def measure(self, model, step: int = 0, optimizer=None) -> dict:
        """Measure now, whatever the step (``step`` is only logged)."""
        t0 = time.perf_counter()
        with _rng_preserved():
            op, threshold = self.operator(model, optimizer)
            self.last_operator = op
            self._checked = True
            i = self.measurements
            due_cold = self.cold_every > 0 and i % self.cold_every == 0
            reason = None
            if self.vectors is None:
                reason = "first"
            elif due_cold:
                reason = "scheduled"
            elif len(self.vectors[0]) != len(op.params):
                reason = "parameters changed"
            res = None
            if reason is None:
                try:
                    v0 = self._warm_start(op, i)
                except ValueError:
                    v0, reason = None, "stale vectors"
                if v0 is not None:
                    res = self._solve(op, v0, self.chunk)
                    if not res["converged"]:
                        reason = "warm run not converged"
            if reason is not None:
                warm_mv = res["matvecs"] if res else 0
                res = self._solve(
                    op, random_probe(op, self.seed + i, dtype=op.vector_dtype), self.cold_steps
                )
                res["matvecs"] += warm_mv
            self.vectors = res.pop("vectors")
            out = {
                "step": int(step),
                "lambda_max": res["eigenvalues"][0],
                **res,
                "seconds": 0.0,
                "warm": reason is None,
                "cold_reason": reason,
            }
            lr = _learning_rate(optimizer)
            if lr is not None:
                out["lr"], out["two_over_lr"] = lr, 2.0 / lr
            if threshold is not None:
                out["stability_threshold"] = threshold
            if self.trace_every and i % self.trace_every == 0:
                from .estimators import trace

                est = trace(op, self.trace_matvecs, method=self.trace_method, seed=self.seed + i)
                out["trace"], out["trace_std_error"] = float(est.estimate), float(est.std_error)
                out["trace_matvecs"] = self.trace_matvecs
            if self.density_every and i % self.density_every == 0:
                from .density import slq

                steps = min(self.density_steps, op.num_params)
                dens = slq(op, steps, self.density_probes, seed=self.seed + i)
                out["density"] = {
                    "nodes": np.asarray(dens.nodes).tolist(),
                    "weights": np.asarray(dens.weights).tolist(),
                }
        out["seconds"] = time.perf_counter() - t0
        self.measurements += 1
        self.history.append({k: v for k, v in out.items() if k != "density"})
        if self.log_fn is not None and _dist.is_rank0():
            self.log_fn(out)
        return out

    def _warm_start(self, op, i: int) -> Vector:
        """Σ of the previous top Ritz vectors (unit) plus ``warm_noise`` of a random unit one."""
        vs = [check_vector(v, op.params, "the tracker's saved vector") for v in self.vectors]
        v0 = [torch.zeros_like(t, dtype=op.vector_dtype) for t in vs[0]]
        for v in vs:
            axpy(1.0, cast(v, op.vector_dtype), v0)
        n = norm(v0)
        if not (n > 0 and math.isfinite(n)):
            raise ValueError("the saved vectors sum to zero")
        v0 = scale(1.0 / n, v0)
        if self.warm_noise > 0:
            r = random_probe(op, self.seed + 7919 + i, dtype=op.vector_dtype)
            axpy(self.warm_noise / norm(r), r, v0)
        return v0

    def _converged(self, vals: np.ndarray, resid: np.ndarray) -> bool:
        """Top-k Ritz residuals (descending order of values) all ≤ tol·|θ_1|."""
        if vals.size < self.k:
            return False
        scale_ = max(abs(float(vals[0])), np.finfo(float).tiny)
        return bool(np.all(resid[: self.k] <= self.tol * scale_))

    def _solve(self, op, v0: Vector, first: int) -> dict:
        """Lanczos from ``v0``, stopped as soon as the top-k residuals are ≤ tol·|θ_1| (checked
        after every step); a run of ``first`` (then ``chunk``) steps that has not converged is
        restarted from the sum of its top Ritz vectors, up to ``max_matvecs`` products.
        """
        k, P = self.k, op.num_params
        used, restarts = 0, 0
        m = first

        def stop(j, alpha, beta):
            al.append(alpha)
            if len(al) < k:
                be.append(beta)
                return False
            vals, vecs = tridiagonal_eigh(al, be)
            be.append(beta)
            hi = np.arange(len(al) - 1, len(al) - 1 - k, -1)
            return self._converged(vals[hi], np.abs(beta * vecs[-1, hi]))

        while True:
            m = max(min(m, P, self.max_matvecs - used), 1)
            al, be = [], []
            run = lanczos(op, m, v0=v0, reorth="full", return_basis=True, callback=stop)
            used += run.num_steps
            n = run.num_steps
            kk = min(k, n)
            hi = np.arange(n - 1, n - 1 - kk, -1)
            vals, resid = run.ritz_values[hi], run.residual_bounds()[hi]
            converged = (bool(run.breakdown) and kk == k) or self._converged(vals, resid)
            vecs = run.ritz_vectors(hi)
            if converged or used >= self.max_matvecs or n >= P:
                return {
                    "eigenvalues": [float(x) for x in vals],
                    "residuals": [float(x) for x in resid],
                    "converged": converged,
                    "matvecs": used,
                    "restarts": restarts,
                    "vectors": vecs,
                }
            v0 = [torch.zeros_like(t) for t in vecs[0]]
            for y in vecs:
                axpy(1.0, y, v0)
            restarts += 1
            m = self.chunk

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The tracker's state: the warm-start vectors (tensors, local shards under FSDP2),
        the number of measurements and the history; save it with ``torch.save`` or
        safetensors next to the training checkpoint.
        """
        return {
            "measurements": self.measurements,
            "history": [dict(h) for h in self.history],
            "vectors": None
            if self.vectors is None
            else [[t.detach().clone() for t in v] for v in self.vectors],
            "checked": self._checked,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; the vectors are checked against the parameters at
        the next measurement (a mismatch makes that one cold).
        """
        if not isinstance(state, dict) or "measurements" not in state:
            raise TypeError(
                "load_state_dict expects the dict from CurvatureTracker.state_dict(), "
                f"got {type(state).__name__}"
            )
        vecs = state.get("vectors")
        if vecs is not None and not all(
            isinstance(v, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in v)
            for v in vecs
        ):
            raise TypeError("state['vectors'] must be a list of lists of tensors, or None")
        self.measurements = int(state["measurements"])
        self.history = [dict(h) for h in state.get("history", [])]
        self.vectors = None if vecs is None else [[t.clone() for t in v] for v in vecs]
        self._checked = bool(state.get("checked", False))
