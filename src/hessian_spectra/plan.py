"""A cost model to plan a run: memory per rank and time per Lanczos step, before running it.

``plan_run`` adds up what one rank holds during a Lanczos run (FSHP §5, App. B) from the
model size, the world size and the parallel layout, the number of steps, the
reorthogonalisation and the basis dtype:

- ``params``: this rank's parameters (``P / shard`` entries; ``shard`` = world size under
  ``fsdp``, world size / ``replicate`` under ``hsdp``, 1 under ``dp``);
- ``grads``: the gradient of the same entries (the HVP's two gradient passes reuse it);
- ``snapshot``: ``method="fd"`` keeps one copy of the local parameters to restore them
  bit-for-bit after each product;
- ``hvp_out``: the product ``Hv`` and the Lanczos work vector ``w`` (two vectors in the
  operator's dtype);
- ``basis``: the kept Krylov vectors in the basis dtype: ``num_steps`` rows for ``"full"``,
  ``max(window, 2)`` for an integer window, the two of the three-term recurrence for ``"none"``;
  streamed from files (``basis="files"``) only two vectors and two chunks of the rows
  (``hessian_spectra.basis.CHUNK_BYTES`` each: the one worked on, the one read ahead); with a
  basis dtype other than the operator's two more working copies of ``q_j, q_{j-1}``;
- ``fsdp``: FSDP2's own buffers: the gathered parameters of about two blocks (the one running
  and the one prefetched) and the unsharded gradient of one block before its reduce-scatter;
  with ``reshard_after_forward=False`` the whole gathered model stays;
- ``activations``: what the forward keeps for backward; it depends on the architecture and the
  tokens per rank, so it is an input (``activation_bytes``; 0 leaves it out and says so).

The time of a Lanczos step is the HVP (``gradients_per_step`` gradients of
``gradient_seconds`` each: 2 for fd, FSHP's primitive, and 2 more for each product whose fd
step the operator redoes, ``fd_retry_rate`` of them: ``op.stats["fd_retries"] / matvecs``)
plus the vector work (``vector_copies`` passes over the local vector at ``copy_bandwidth``
bytes/s; the copies per step of ``benchmarks/lanczos_vector_work.py``) plus, on more than one
rank, the scalar all-reduces (``scalar_allreduces`` per step at ``allreduce_seconds`` each: the
dots and norms of the recurrence, the loss weights and norms of the fd passes). The FSDP
collectives are inside ``gradient_seconds`` when it is measured at that world size.

``recommend_parallel`` says which layout to use on ``world_size`` devices of
``device_bytes`` each: plain data parallelism when a whole replica fits (no parameter
all-gathers, FSHP App. B), else HSDP with the smallest shard group that fits, else FSDP.

>>> p = plan_run(135_000_000, num_steps=16, reorth="full")
>>> round(p.memory["basis"] / 2**30, 2), round(p.total_bytes / 2**30, 2)
(8.05, 10.56)
>>> round(plan_run(135_000_000, num_steps=16, basis="files").memory["basis"] / 2**30, 2)
1.02
>>> recommend_parallel(7_000_000_000, world_size=8, device_bytes=80 * 2**30, num_steps=80,
...                    basis_dtype="bfloat16", basis="files")
'hsdp'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ._checks import check_positive_int
from .basis import CHUNK_BYTES

__all__ = ["Plan", "plan_run", "recommend_parallel", "scalar_allreduces", "vector_copies"]

_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
PARALLEL = ("fsdp", "hsdp", "dp")


def _bytes_of(name: str, what: str) -> int:
    try:
        return _BYTES[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(_BYTES)}, got {name!r}") from None


def _window(reorth) -> int | None:
    """``None`` for full, 0 for none, the window for an int."""
    if reorth == "full":
        return None
    if reorth in ("none", 0, None):
        return 0
    if isinstance(reorth, int) and reorth > 0:
        return reorth
    raise ValueError(f"reorth must be 'full', 'none' or a positive int window, got {reorth!r}")


def vector_copies(reorth, step: int) -> float:
    """Passes over one vector (read + write = 1) that Lanczos step ``step`` (0-based) costs.

    The floor of the recurrence (FSHP eq. 8): one dot, one fused three-term update, one norm,
    one scale (≈ 4.5); CGS2 against ``j`` kept vectors adds about ``2j`` (two sweeps, each a
    dot and an update over the kept rows, rows read once per sweep).

    >>> vector_copies("none", 10), vector_copies(2, 10), vector_copies("full", 10)
    (4.5, 8.5, 26.5)
    """
    w = _window(reorth)
    kept = step + 1 if w is None else min(step + 1, w)
    return 4.5 + 2.0 * kept


# scalar all-reduces of one fd product on more than one rank (counted in
# benchmarks/scaling.py): ||v|| and κ(v); whether θ changed (version counters, then the p.data
# fingerprint), whether θ's norms and the ∇L(θ) sample are stale (one each: every rank takes
# the same branch); the loss weights of the two passes, the even part and ||Hv||; a redone
# product repeats the last four
FD_PRODUCT_ALLREDUCES = 9
FD_RETRY_ALLREDUCES = 4


def scalar_allreduces(reorth, method: str = "fd", fd_retry_rate: float = 0.0) -> float:
    """Scalar all-reduces per Lanczos step on more than one rank (mean over the products).

    The recurrence: the dot for alpha, then with a kept basis the two Gram–Schmidt sweeps (one
    all-reduce each, their dots and ``‖w‖`` together), without one ``‖w‖``; an fd product
    ``FD_PRODUCT_ALLREDUCES``, and ``FD_RETRY_ALLREDUCES`` more when its step is redone
    (``fd_retry_rate`` of the products). ``"exact"`` / ``"jvp"`` products are not counted.

    >>> scalar_allreduces("full"), scalar_allreduces("none"), scalar_allreduces(4, "fd", 0.5)
    (12.0, 11.0, 14.0)
    """
    recurrence = 2.0 if _window(reorth) == 0 else 3.0
    if method != "fd":
        return recurrence
    return recurrence + FD_PRODUCT_ALLREDUCES + FD_RETRY_ALLREDUCES * float(fd_retry_rate)


@dataclass(frozen=True)
class Plan:
    """Memory per rank (bytes, by component) and, when timings are given, seconds per step."""

    inputs: dict
    memory: dict
    step_seconds: dict | None = None
    notes: list = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """The sum of the memory components."""
        return int(sum(self.memory.values()))

    def to_dict(self) -> dict:
        """A JSON-ready dict (inputs, memory by component, total, step seconds, notes)."""
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d

    def table(self) -> str:
        """The components one per line, in GiB, then the total and the step time.

        >>> print(plan_run(1_000_000, num_steps=4).table().splitlines()[0])
        params           0.004 GiB
        """
        lines = [f"{k:<14} {v / 2**30:>7.3f} GiB" for k, v in self.memory.items()]
        lines.append(f"{'total':<14} {self.total_bytes / 2**30:>7.3f} GiB")
        if self.step_seconds:
            s = self.step_seconds
            lines.append(
                f"{'step':<14} {s['total']:>7.3f} s  (HVP {s['hvp']:.3f} s, vectors "
                f"{s['vectors']:.3f} s, {100 * s['vectors'] / s['hvp']:.1f}% of the HVP, "
                f"all-reduces {s['collectives']:.3f} s)"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan_run(
    num_params: int,
    *,
    world_size: int = 1,
    parallel: str = "fsdp",
    replicate: int = 1,
    num_steps: int = 16,
    reorth="full",
    basis_dtype: str = "float32",
    param_dtype: str = "float32",
    vector_dtype: str | None = None,
    method: str = "fd",
    basis: str = "memory",
    num_blocks: int = 32,
    reshard_after_forward: bool = True,
    activation_bytes: int = 0,
    gradient_seconds: float | None = None,
    copy_bandwidth: float | None = None,
    fd_retry_rate: float = 0.0,
    allreduce_seconds: float | None = None,
) -> Plan:
    """Memory per rank and time per Lanczos step of a run (module docstring).

    Args:
        num_params: parameters analysed (all ranks together).
        world_size: ranks; ``parallel``: ``"fsdp"`` (every rank a shard), ``"hsdp"``
            (``replicate`` groups of ``world_size / replicate`` shards) or ``"dp"`` (every rank a
            whole replica).
        num_steps, reorth, basis_dtype: the Lanczos run (``reorth``: ``"full"``, ``"none"`` or a
            window); ``basis``: ``"memory"`` or ``"files"`` (``basis_dir``).
        param_dtype: the model's dtype; ``vector_dtype``: the operator's (default: the
            parameters').
        method: ``"fd"`` (keeps a snapshot) or ``"exact"`` / ``"jvp"``.
        num_blocks: the FSDP blocks (transformer layers; default 32, a 7B Llama's); a block
            holds ``num_params / num_blocks`` entries.
        activation_bytes: what the forward keeps for backward on this rank (architecture- and
            token-dependent: measure one gradient, or 0 to leave it out).
        gradient_seconds: one gradient on this rank at this world size (it includes FSDP's
            gathers and reduce-scatters); ``copy_bandwidth``: bytes per second of a vector copy
            (read + write). Both given: ``step_seconds`` is filled.
        fd_retry_rate: the fraction of fd products whose step the operator redoes (2 more
            gradients each; ``op.stats["fd_retries"] / op.stats["matvecs"]`` of a short run).
        allreduce_seconds: one scalar all-reduce at this world size (0 or None: left out;
            ignored on one rank).
    """
    num_params = check_positive_int("num_params", num_params)
    world_size = check_positive_int("world_size", world_size)
    num_steps = check_positive_int("num_steps", num_steps)
    num_blocks = check_positive_int("num_blocks", num_blocks)
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if basis not in ("memory", "files"):
        raise ValueError(f"basis must be 'memory' or 'files', got {basis!r}")
    if method not in ("fd", "exact", "jvp"):
        raise ValueError(f"method must be 'fd', 'exact' or 'jvp', got {method!r}")
    if parallel == "hsdp" and (replicate < 1 or world_size % replicate):
        raise ValueError(
            f"hsdp needs the world size ({world_size}) divisible by replicate ({replicate})"
        )
    pb = _bytes_of(param_dtype, "param_dtype")
    bb = _bytes_of(basis_dtype, "basis_dtype")
    vb = _bytes_of(vector_dtype or param_dtype, "vector_dtype")
    shard = {"fsdp": world_size, "hsdp": world_size // max(replicate, 1), "dp": 1}[parallel]
    local = math.ceil(num_params / shard)
    w = _window(reorth)
    staged = 0
    if w == 0:
        rows = 2  # q_j, q_{j-1}
    elif basis == "files":  # q_j / q_{j+1}, and two chunks of the rows (worked on, read ahead)
        rows = 2
        staged = 2 * CHUNK_BYTES
    else:
        rows = num_steps if w is None else min(num_steps, max(w, 2))
    memory = {
        "params": local * pb,
        "grads": local * pb,
        "snapshot": local * pb if method == "fd" else 0,
        "hvp_out": 2 * local * vb,
        "basis": rows * local * bb + staged + (2 * local * vb if bb != vb else 0),
        "fsdp": 0,
        "activations": int(activation_bytes),
    }
    if shard > 1:
        block = math.ceil(num_params / num_blocks)
        memory["fsdp"] = (num_params if not reshard_after_forward else 2 * block) * pb + block * pb
    notes = []
    if not activation_bytes:
        notes.append("activations left out (activation_bytes=0): add one gradient's peak")
    if not 0.0 <= float(fd_retry_rate) <= 1.0:
        raise ValueError(f"fd_retry_rate must be in [0, 1], got {fd_retry_rate!r}")
    if allreduce_seconds is not None and not float(allreduce_seconds) >= 0.0:
        raise ValueError(f"allreduce_seconds must be ≥ 0, got {allreduce_seconds!r}")
    step = None
    if gradient_seconds is not None and copy_bandwidth is not None:
        grads = 2.0 + 2.0 * float(fd_retry_rate) if method == "fd" else 2.5
        hvp = grads * float(gradient_seconds)
        mean_copies = sum(vector_copies(reorth, j) for j in range(num_steps)) / num_steps
        vec = mean_copies * 2 * local * vb / float(copy_bandwidth)
        calls = scalar_allreduces(reorth, method, fd_retry_rate) if world_size > 1 else 0.0
        coll = calls * float(allreduce_seconds or 0.0)
        step = {
            "hvp": hvp,
            "vectors": vec,
            "collectives": coll,
            "total": hvp + vec + coll,
            "gradients_per_step": grads,
            "copies_per_step": mean_copies,
            "scalar_allreduces_per_step": calls,
        }
        if world_size > 1 and not allreduce_seconds:
            notes.append("scalar all-reduces left out (allreduce_seconds not given)")
    inputs = {
        "num_params": num_params,
        "world_size": world_size,
        "parallel": parallel,
        "replicate": replicate if parallel == "hsdp" else 1,
        "shard_size": shard,
        "num_steps": num_steps,
        "reorth": reorth,
        "basis_dtype": basis_dtype,
        "param_dtype": param_dtype,
        "vector_dtype": vector_dtype or param_dtype,
        "method": method,
        "basis": basis,
        "num_blocks": num_blocks,
        "reshard_after_forward": reshard_after_forward,
        "fd_retry_rate": float(fd_retry_rate),
    }
    return Plan(inputs=inputs, memory=memory, step_seconds=step, notes=notes)


def recommend_parallel(num_params: int, *, world_size: int, device_bytes: int, **kw) -> str:
    """``"dp"``, ``"hsdp"`` or ``"fsdp"``: the cheapest layout whose plan fits ``device_bytes``.

    Plain data parallelism moves no parameters (one gradient all-reduce per pass) and is the
    fastest when a whole replica fits (FSHP App. B), with 20% to spare (the plan misses per-rank
    fixed costs: collective buffers, allocator slack; 4–23% measured at world sizes 1–4);
    otherwise HSDP with the smallest shard group (a divisor of ``world_size``) that fits;
    otherwise FSDP over all ranks. Raises ``ValueError`` when not even that fits (then: a bf16
    or file basis, more ranks).

    >>> recommend_parallel(135_000_000, world_size=2, device_bytes=80 * 2**30)
    'dp'
    """
    budget = 0.8 * device_bytes
    if plan_run(num_params, world_size=world_size, parallel="dp", **kw).total_bytes <= budget:
        return "dp"
    for shard in range(2, world_size):
        if world_size % shard:
            continue
        p = plan_run(
            num_params,
            world_size=world_size,
            parallel="hsdp",
            replicate=world_size // shard,
            **kw,
        )
        if p.total_bytes <= budget:
            return "hsdp"
    p = plan_run(num_params, world_size=world_size, parallel="fsdp", **kw)
    if p.total_bytes <= budget:
        return "fsdp"
    raise ValueError(
        f"no layout fits {device_bytes / 2**30:.1f} GiB per device: FSDP over {world_size} "
        f"ranks needs {p.total_bytes / 2**30:.1f} GiB; keep the basis in files (basis_dir), "
        "in bfloat16, or use fewer steps or more ranks"
    )
