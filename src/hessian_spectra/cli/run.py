"""One run of an analysis command: the configuration, the problem, the operator, the command's
run, saving after every step it publishes, figures, the printed summary and the exit status.

Ctrl-C (exit 130) and SIGTERM (exit 143) end a run the same way: finished work is saved with
``status: interrupted``. The output folder's rules (one run at a time, stale figures) are in
``outdir``; logging and signals in ``logs``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from .errors import (
    EXIT_INTERRUPTED,
    EXIT_NUMERICAL,
    EXIT_OK,
    EXIT_TERMINATED,
    PROG,
    CliError,
    Terminated,
    classify,
)
from .logs import logging_to, quiet_libraries, sigterm_interrupts
from .outdir import locked, prepare_out, remove_figures

__all__ = ["check_resume", "run_command"]

log = logging.getLogger("hessian_spectra.cli")


# ------------------------------------------------------------------------------ the run
def run_command(command, ns, argv, hard_exit: bool = False) -> int:
    """Set up torchrun if present, run ``command`` with the parsed arguments ``ns``, tear down."""
    from .. import distributed

    created = distributed.setup() if distributed.under_torchrun() else False
    code = 1
    try:
        code = _Run(command, ns, argv).main()
        return code
    finally:
        if created:  # barrier on success; hard_exit ends the process (see distributed.teardown)
            distributed.teardown(exit_code=code, hard_exit=hard_exit)


class _Run:
    """The state of one run (kept here, never on the parsed arguments)."""

    def __init__(self, command, ns, argv):
        from .. import distributed

        self.command, self.ns, self.argv = command, ns, argv
        self.rank0 = distributed.is_rank0()
        self.world_size = distributed.world_size()
        self.out = Path(ns.out)
        self.result = None
        self.problem_line = None
        self.fresh = True  # no earlier result of this run in --out (figures there are stale)

    def main(self) -> int:
        debug = self.ns.debug
        try:
            if self.rank0:
                prepare_out(self.out)
            with contextlib.ExitStack() as stack:
                if self.rank0:
                    stack.enter_context(locked(self.out))
                stack.enter_context(logging_to(self.out if self.rank0 else None, self.rank0, debug))
                stack.enter_context(sigterm_interrupts())
                return self._guarded()
        except CliError as e:  # before logging exists (folder, lock)
            if debug:
                traceback.print_exc()
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return e.code

    def _guarded(self) -> int:
        quiet_libraries(self.ns.debug)
        try:
            return self._execute()
        except KeyboardInterrupt as e:
            term = isinstance(e, Terminated)
            hint = self.command.interrupted_hint.format(out=self.out) if self.result else ""
            log.error("%s%s", "terminated (SIGTERM)" if term else "interrupted", hint)
            self._save_final("interrupted", "terminated (SIGTERM)" if term else "interrupted")
            return EXIT_TERMINATED if term else EXIT_INTERRUPTED
        except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit code
            code, msg = classify(e)
            if self.ns.debug:
                log.error("%s", traceback.format_exc())
            log.error("%s: error: %s", PROG, msg)
            self._save_final("failed", msg)
            return code

    def _save_final(self, status, error) -> None:
        if self.result is not None and self.rank0:
            self.result.status, self.result.error = status, error
            with contextlib.suppress(Exception):
                self._save()

    def _save(self, status=None) -> None:
        if status:
            self.result.status = status
        self.result.timings = self._timings()
        if self.rank0:
            if self.fresh:  # the first save replaces an earlier run: its figures go with it
                remove_figures(self.out, keep=())
                self.fresh = False
            self.result.save(self.out)

    def _draw(self) -> list:
        try:
            return self.command.figures(self.result.to_dict(), self.out)
        except Exception as e:  # noqa: BLE001 - a figure must never lose a result
            from .errors import first_line

            log.warning("could not draw the figures: %s", first_line(e))
            return []

    def _timings(self) -> dict:
        s = self.op.stats
        return {
            "seconds_per_hvp": s["matvec_seconds"] / s["matvecs"] if s["matvecs"] else None,
            "seconds_per_gradient": (
                s["gradient_seconds"] / s["gradients"] if s["gradients"] else None
            ),
            "num_hvps": s["matvecs"],
            "num_gradients": s["gradients"],
            "hvp_seconds": s["matvec_seconds"],
            "gradient_seconds": s["gradient_seconds"],
            "load_seconds": self.load_seconds,
            "total_seconds": time.perf_counter() - self.t0,
        }

    def _execute(self) -> int:
        from .. import distributed
        from .._checks import dtype_name
        from ..problem import load_problem
        from ..results import RunResult, load_result, versions
        from .command import Context
        from .config import from_namespace
        from .report import print_summary
        from .threads import choose_threads

        self.t0 = time.perf_counter()
        cmd = self.command
        cfg = from_namespace(self.ns, cmd, self.world_size)
        cmd.check(cfg, self.world_size)
        check_curvature(cfg, self.world_size)
        check_parallel_method(cfg, self.world_size)
        threads = choose_threads(cfg.threads, ranks_on_node=_ranks_on_node(self.world_size))
        config = cfg.to_dict()

        previous = None
        if getattr(cfg.options, "resume", False):
            try:
                previous = load_result(self.out)
            except FileNotFoundError:
                log.info("--resume: no result.json in %s yet; starting a new run", self.out)
            else:
                check_resume(previous, config)
                self.fresh = False

        if self.world_size > 1 and cfg.device_map:
            raise CliError(
                "--device-map spreads one process over devices; under torchrun the "
                "model is sharded with FSDP2 instead"
            )
        if not cfg.allow_download:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        problem = load_problem(
            cfg.model,
            cfg.data_config(),
            dtype=cfg.dtype,
            attn_implementation=cfg.attn_implementation,
            device=cfg.device,
            device_map=cfg.device_map,
            trust_remote_code=cfg.trust_remote_code,
            allow_download=cfg.allow_download,
        )
        lm = problem.loaded
        self.load_seconds = lm.seconds
        log.info(
            "model: %s (%s, %s parameters, %s) loaded in %.1f s",
            lm.spec,
            lm.source,
            f"{lm.num_params:,}",
            str(next(lm.model.parameters()).dtype).replace("torch.", ""),  # a factory's own
            lm.seconds,
        )
        if problem.info.get("target_tokens") is not None:
            c = problem.info["config"]
            log.info(
                "data: %s, %d batch(es) of %d x %d tokens, %d target tokens",
                problem.info["source"],
                problem.info["num_batches"],
                c["batch_size"],
                c["seq_len"],
                problem.info["target_tokens"],
            )
        model = problem.model
        if self.world_size > 1:
            model = distributed.parallelize(model, cfg.parallel, replicate=cfg.replicate)
            log.info(
                "parallel: %s over %d ranks (%d cop%s of the model, each split over %d)",
                cfg.parallel,
                self.world_size,
                cfg.replicate,
                "y" if cfg.replicate == 1 else "ies",
                self.world_size // cfg.replicate,
            )

        self.op = op = build_operator(cfg, model, problem)
        result = self.result = RunResult(
            command=cmd.name,
            argv=[PROG, *self.argv],
            config=config,
            versions=versions(),
            model={
                "spec": str(lm.spec),
                "kind": lm.spec.kind,
                "source": lm.source,
                "dtype": dtype_name(op.param_dtype),
                "device": str(next(model.parameters()).device),
                "num_params": int(op.num_params),
                "num_params_model": int(lm.num_params),
                "load_seconds": lm.seconds,
                **lm.info,
            },
            data=problem.info,
            world_size=self.world_size,
            threads=threads,
        )
        if previous is not None:
            result.created = previous.get("created", result.created)

        log.info("gradient pass at θ (loss, gradient norm, timing) ...")
        loss, g = op.gradient()
        from ..vectors import norm, unit_probe

        # the default fd step for the first (unit, seed-0 Rademacher) probe; later Lanczos
        # vectors get their own step (HessianOperator docstring). Calibrates the fd error model.
        eps_unit = None
        if op.method == "fd":
            eps_unit = op.eps if op.eps is not None else op.eps_for(unit_probe(op, 0))
            if getattr(op, "max_fd_error", None) is not None:  # a fixed --eps checked too:
                op.calibrate_fd()  # calibrated here, not inside the first HVP's time
        result.operator = {
            "curvature": cfg.curvature,
            "method": op.method,
            "eps": cfg.eps,
            "eps_unit": eps_unit,
            "loss": loss,
            "grad_norm": norm(g),
            "train_mode": cfg.train_mode,
        }
        fd_model = getattr(op, "fd_model", None)  # HessianOperator with fd
        if op.method == "fd":
            result.operator.update(
                stencil=cfg.stencil,
                max_fd_error=cfg.max_fd_error,
                fd_model=fd_model.to_dict() if fd_model else None,
            )
            if fd_model is not None:
                log.info(
                    "fd error model: truncation a0 %.3g, rounding b %.3g, best step along "
                    "the calibration probe %.3g (%d gradient passes)",
                    op.fd_model.a0,
                    op.fd_model.b,
                    op.fd_model.step0,
                    op.fd_model.gradients,
                )
        del g
        log.info(
            "loss %.6g, |grad| %.4g, fd step for a unit direction %s",
            loss,
            result.operator["grad_norm"],
            f"{eps_unit:.3g}" if eps_unit is not None else "n/a",
        )

        def publish(estimate, summary):
            result.estimate = estimate
            result.summary = {**result.summary, **summary}
            self._save("running")

        ctx = Context(
            config=cfg,
            op=op,
            problem=problem,
            out=self.out,
            rank0=self.rank0,
            previous=previous,
            publish=publish,
            draw=self._draw,
            log=log,
        )
        outcome = cmd.run(ctx)
        if op.method == "fd" and getattr(op, "fd_model", None) is not None:
            result.operator["fd_model"] = op.fd_model.to_dict()  # also one calibrated later
        result.estimate = outcome.estimate
        result.summary = {**result.summary, **outcome.summary, **_fd_summary(op)}
        result.error = outcome.problem
        self._save(outcome.status)
        if outcome.status != "complete":
            log.warning("%s: %s", outcome.status, outcome.problem)
        if self.rank0:
            written = self._draw()
            remove_figures(self.out, keep=written)
            print_summary(cmd, result, self.out, outcome.problem)
        return EXIT_OK if outcome.status == "complete" else EXIT_NUMERICAL


def _fd_summary(op) -> dict:
    """The fd products' error estimates for the summary.

    The largest, the number of products redone at their estimated best step, and the
    calibration's cost (empty without fd).
    """
    if getattr(op, "fd_model", None) is None:
        return {}
    return {
        "fd_max_rel_error_estimate": op.stats["fd_max_rel_error_estimate"],
        "fd_retries": op.stats["fd_retries"],
        "fd_calibration_gradients": op.stats["fd_calibration_gradients"],
    }


def _ranks_on_node(world_size: int) -> int:
    """Torchrun ranks sharing this machine (``LOCAL_WORLD_SIZE``), 1 in one process."""
    if world_size == 1:
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    except ValueError:
        return world_size


# options whose values must match for --resume to continue a run
RESUME_KEYS = (
    "model",
    "dtype",
    "data",
    "text_field",
    "seq_len",
    "batch_size",
    "num_batches",
    "subsample",
    "loss_on",
    "prompt_field",
    "completion_field",
    "split",
    "train_mode",
    "method",
    "eps",
    "params",
    "steps",
    "reorth",
    "basis_dtype",
    "seed",
    "curvature",
    "per_block",
)
# commands that take --curvature ggn|ef (the others need the Hessian's own methods)
CURVATURE_COMMANDS = ("density", "eigs", "trace", "blockdiag")


def check_resume(previous: dict, config: dict) -> None:
    """Refuse --resume of a run with other settings (RESUME_KEYS) or of another command."""
    if previous.get("command") != config["command"]:
        raise CliError(
            f"--resume: the run in --out is a {previous.get('command')!r} run, "
            f"not {config['command']!r}"
        )
    old = {"curvature": "hessian", "per_block": False, **previous.get("config", {})}

    def norm(v):
        return list(v) if isinstance(v, tuple) else v

    diff = [
        f"{k}: {old.get(k)!r} -> {config.get(k)!r}"
        for k in RESUME_KEYS
        if k in config and norm(old.get(k)) != norm(config.get(k))
    ]
    if diff:
        raise CliError(
            "--resume with other settings than the saved run ("
            + "; ".join(diff)
            + "): use the same options or another --out"
        )


def check_curvature(cfg, world_size: int) -> None:
    """Refuse --curvature where it does not apply, before anything is loaded."""
    if cfg.curvature == "hessian":
        return
    if cfg.command not in CURVATURE_COMMANDS:
        raise CliError(
            f"--curvature {cfg.curvature} applies to {', '.join(CURVATURE_COMMANDS)}; "
            f"{cfg.command} analyses the Hessian only"
        )
    if cfg.curvature == "ggn" and cfg.method == "jvp":
        raise CliError("--curvature ggn takes --method exact or fd (jvp is a Hessian method)")
    if cfg.curvature == "ef" and world_size > 1:
        raise CliError(
            f"--curvature ef runs in one process (per-example gradients are not "
            f"available under FSDP2, --parallel {cfg.parallel} included): run without "
            "torchrun, or use --curvature ggn"
        )


def check_parallel_method(cfg, world_size: int) -> None:
    """Refuse --method exact/jvp under torchrun (every --parallel setup runs FSDP2 hooks),
    before anything is loaded.
    """
    if world_size > 1 and cfg.curvature != "ef" and cfg.method != "fd":
        raise CliError(
            f"--method {cfg.method} is not available under torchrun (--parallel "
            f"{cfg.parallel}): FSDP2 has no double backward or forward AD through its hooks; "
            "use --method fd (the default under torchrun), or run in one process"
        )


def build_operator(cfg, model, problem):
    """The operator of ``cfg.curvature`` on the loaded problem (``--params`` globs expanded)."""
    from .. import EmpiricalFisherOperator, GGNOperator, HessianOperator
    from ..ggn import split_loss
    from ..per_block import select_params

    params = cfg.params
    if params is not None:
        try:
            params = select_params([n for n, _ in model.named_parameters()], params)
        except ValueError as e:
            raise CliError(f"--params: {e}") from None
    common = {"params": params, "train_mode": cfg.train_mode, "progress": not cfg.quiet}
    if cfg.curvature == "ggn":
        parts = split_loss(problem.loss_fn)
        if parts is None:
            raise CliError(
                "--curvature ggn needs the loss split into the model's outputs and the "
                "loss of those outputs: language models (embedded, a Hugging Face id "
                "or folder, a .gguf file) have it; a module:factory must return "
                "hessian_spectra.ggn.SplitLoss(forward_fn, loss_of_output_fn) as its "
                "loss_fn"
            )
        return GGNOperator(model, *parts, problem.batches, method=cfg.method, eps=cfg.eps, **common)
    if cfg.curvature == "ef":
        return EmpiricalFisherOperator(
            model, problem.loss_fn, problem.batches, per_example="auto", **common
        )
    return HessianOperator(
        model,
        problem.loss_fn,
        problem.batches,
        method=cfg.method,
        eps=cfg.eps,
        max_fd_error=cfg.max_fd_error,
        stencil=cfg.stencil,
        **common,
    )
