"""The run's lifecycle on the command line: resume keeps work, non-converged results say so,
SIGTERM saves, one run per --out, stale figures go, umask modes, threads, and the command
objects (a new command is one new place)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hessian_spectra.cli import EXIT_NUMERICAL, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, main
from hessian_spectra.results import load_result

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

FAST = ["--quiet", "--model", "factories:mlp", "--method", "fd"]
SRC = Path(__file__).resolve().parents[1] / "src"


def test_resume_with_fewer_probes_keeps_every_finished_probe(tmp_path, capsys):
    """Issue 13 item 3: `--resume --probes 1` on a finished 2-probe run rewrote result.json with
    1 probe. Finished probes are never thrown away: both are kept and reported (the summary is
    the 2-probe one, bit for bit), and the log says so."""
    out = tmp_path / "r"
    assert main(["density", *FAST, "--steps", 4, "--probes", 2, "--out", out]) == EXIT_OK
    before = load_result(out)
    capsys.readouterr()
    assert (
        main(["density", *FAST, "--steps", 4, "--probes", 1, "--resume", "--out", out]) == EXIT_OK
    )
    after = load_result(out)
    assert len(after["density"]["runs"]) == 2 and after["status"] == "complete"
    assert after["density"]["runs"] == before["density"]["runs"]
    assert after["summary"]["trace"] == before["summary"]["trace"]
    assert after["summary"]["num_probes"] == 2
    assert "keeping 2 finished probe(s) (more than --probes 1" in (out / "log.txt").read_text()
    assert "kept every finished probe" in capsys.readouterr().out


def test_influence_that_did_not_converge_says_so_and_exits_3(tmp_path, capsys):
    """Issue 13 item 4: with damping 0.01 (the old default) CG meets negative curvature on the
    MLP; the run said status complete, exit 0. Now: status not_converged, exit 3, the printed
    summary and result.json's error say why and what to do."""
    out = tmp_path / "inf"
    args = ["influence", *FAST, "--method", "exact", "--damping", "0.01", "--out", out]
    assert main(args) == EXIT_NUMERICAL
    r = load_result(out)
    assert r["status"] == "not_converged" and not r["summary"]["cg_converged"]
    assert r["summary"]["cg_negative_curvature"] and "raise --damping" in r["error"]
    printed = capsys.readouterr().out
    assert "NOT CONVERGED" in printed and "raise --damping" in printed


def test_influence_default_damping_converges_where_0_01_failed(tmp_path, capsys):
    """Issue 9 item 4: the default damping hit negative curvature on this MLP (relative residual
    5.14). The default is now auto: λ from 20 Lanczos steps, above −λ_min of the dense Hessian,
    recorded in result.json and printed; CG converges, exit 0."""
    import factories
    from conftest import dense_hessian

    out = tmp_path / "inf"
    assert main(["influence", *FAST, "--method", "exact", "--out", out]) == EXIT_OK
    r = load_result(out)
    s, c = r["summary"], r["influence"]["damping_choice"]
    assert r["status"] == "complete" and s["cg_converged"] and s["damping_auto"]
    assert r["config"]["damping"] == "auto" and r["config"]["damping_steps"] == 20
    assert c["value"] == s["damping"] and c["num_steps"] == 20 and c["term"] == "curvature"
    lam_min = float(torch.linalg.eigvalsh(dense_hessian(*factories.mlp()))[0])
    assert lam_min < 0 and s["damping"] + lam_min > 0
    assert "auto from Lanczos" in capsys.readouterr().out


def test_most_harmful_is_the_largest_positive_score():
    """Issue 13 item 4: "most harmful" is the largest *positive* score (influence > 0 raises the
    query loss), "most helpful" the most negative; None when no score has that sign."""
    from hessian_spectra.cli.influence import extremes

    assert extremes([-3.0, 2.0, 0.5]) == {
        "most_helpful": 0,
        "most_harmful": 1,
        "score_min": -3.0,
        "score_max": 2.0,
    }
    assert extremes([1.0, 2.0])["most_helpful"] is None
    assert extremes([-1.0, -2.0])["most_harmful"] is None


def _cli(args, **kw):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "hessian_spectra", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _wait_for_probe(out: Path, proc, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if len(json.loads((out / "result.json").read_text())["density"]["runs"]) >= 1:
                return
        except (FileNotFoundError, json.JSONDecodeError, TypeError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no probe finished")


def test_sigterm_saves_finished_probes_and_exits_143(tmp_path):
    """Issue 13 item 13: SIGTERM (what schedulers send) left status: running. It is handled like
    Ctrl-C: finished probes saved, status interrupted, exit 143 (128 + SIGTERM), one log line
    and no traceback; --resume then completes the run."""
    out = tmp_path / "term"
    args = [
        "density",
        "--quiet",
        "--model",
        "factories:slow_mlp",
        "--method",
        "fd",
        "--steps",
        3,
        "--probes",
        40,
        "--out",
        out,
    ]
    proc = _cli(args)
    _wait_for_probe(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_TERMINATED, err
    r = load_result(out)
    assert r["status"] == "interrupted" and 1 <= len(r["density"]["runs"]) < 40
    assert "Traceback" not in err and "terminated (SIGTERM)" in err and "--resume" in err


def test_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    """Issue 13 item 13: two runs writing one --out interleaved their logs and the last writer
    won. While a run holds the folder's lock, a second run exits 2 naming the holder, and
    leaves the folder alone."""
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run (a separate open file: flock conflicts)
    try:
        assert main(["trace", *FAST, "--probes", 2, "--out", out]) == EXIT_USAGE
    finally:
        os.close(fd)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "another run (pid 4242) is writing to --out" in last and "choose another --out" in last
    assert not (out / "result.json").exists() and not (out / "log.txt").exists()
    assert main(["trace", *FAST, "--probes", 2, "--out", out]) == EXIT_OK  # lock released


def test_concurrent_runs_one_wins(tmp_path):
    """Two real processes on one --out: while the first runs, the second is refused with exit 2
    and writes nothing; the first's result is its own (then stopped with SIGTERM)."""
    out = tmp_path / "race"
    args = [
        "density",
        "--quiet",
        "--model",
        "factories:slow_mlp",
        "--method",
        "fd",
        "--steps",
        3,
        "--probes",
        200,
        "--out",
        out,
    ]
    first = _cli(args)
    _wait_for_probe(out, first)
    second = _cli([*args[:-4], "--probes", 1, "--out", out])
    _, err2 = second.communicate(timeout=120)
    still_running = first.poll() is None
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert still_running and second.returncode == EXIT_USAGE and "is writing to --out" in err2
    assert first.returncode == EXIT_TERMINATED
    r = load_result(out)
    assert r["config"]["probes"] == 200 and r["status"] == "interrupted"


def test_figures_of_another_command_are_removed(tmp_path):
    """Issue 13 item 13: reusing an --out of another command kept its stale figures. After a
    density run, an eigs run in the same folder leaves only eigs.png; a trace run (no figures)
    leaves none; files that are not standard figures are kept."""
    out = tmp_path / "o"
    assert main(["density", *FAST, "--steps", 3, "--probes", 1, "--out", out]) == EXIT_OK
    (out / "mine.png").write_bytes(b"user file")
    assert {p.name for p in out.glob("*.png")} == {"density.png", "ritz.png", "mine.png"}
    assert main(["eigs", *FAST, "-k", 1, "--steps", 3, "--out", out]) == EXIT_OK
    assert {p.name for p in out.glob("*.png")} == {"eigs.png", "mine.png"}
    assert main(["trace", *FAST, "--probes", 2, "--out", out]) == EXIT_OK
    assert {p.name for p in out.glob("*.png")} == {"mine.png"}
    assert load_result(out)["command"] == "trace"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_results_and_figures_get_the_users_umask(tmp_path, umask):
    """Issue 13 item 13: result.json and figures were 0600 (mkstemp) while log.txt was 0644;
    every file a run writes now has mode 0666 & ~umask."""
    old = os.umask(umask)
    try:
        out = tmp_path / "m"
        assert main(["density", *FAST, "--steps", 3, "--probes", 1, "--out", out]) == EXIT_OK
    finally:
        os.umask(old)
    for name in ("result.json", "density.png", "ritz.png", "log.txt"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_threads_are_chosen_and_recorded(tmp_path, monkeypatch):
    """Issue 13 item 14: result.json records the thread count and the rule that chose it:
    --threads wins; else OMP_NUM_THREADS when set; else one per core (shared among the ranks on
    the machine) when OMP_WAIT_POLICY=PASSIVE, else one per free core (at least 1)."""
    from hessian_spectra.cli.threads import choose_threads, usable_cores

    before = torch.get_num_threads()
    try:
        assert main(["trace", *FAST, "--probes", 2, "--threads", 2, "--out", tmp_path / "a"]) == 0
        assert load_result(tmp_path / "a")["threads"]["num_threads"] == 2
        assert load_result(tmp_path / "a")["threads"]["rule"] == "--threads"
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # threads sleep: one per core
        monkeypatch.setattr("hessian_spectra.cli.threads.busy_cores", lambda: 1)
        t = choose_threads()
        assert t["num_threads"] == usable_cores() and "PASSIVE" in t["rule"]
        assert choose_threads(ranks_on_node=2)["num_threads"] == max(1, usable_cores() // 2)
        monkeypatch.delenv("OMP_WAIT_POLICY")  # threads spin: one per free core
        monkeypatch.setattr("hessian_spectra.cli.threads.busy_cores", lambda: 0)
        assert choose_threads()["num_threads"] == usable_cores()
        monkeypatch.setattr("hessian_spectra.cli.threads.busy_cores", lambda: 1)
        t = choose_threads()
        assert t["num_threads"] == max(1, usable_cores() - 1) and t["rule"] == "one per free core"
        assert torch.get_num_threads() == t["num_threads"]
        monkeypatch.setattr("hessian_spectra.cli.threads.busy_cores", lambda: 99)
        assert choose_threads()["num_threads"] == 1
        assert choose_threads(ranks_on_node=99)["num_threads"] == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert choose_threads() == {
            "num_threads": 1,
            "rule": "OMP_NUM_THREADS",
            "cores": usable_cores(),
            "busy_cores": None,
        }
    finally:
        torch.set_num_threads(before)


def test_run_configuration_is_frozen_and_validated():
    """The run configuration is frozen (nothing changes it once filled), checks its values in
    __post_init__, and main() leaves the parsed arguments untouched (no args._result)."""
    from hessian_spectra.cli import COMMANDS, build_parser
    from hessian_spectra.cli.config import RunConfig, from_namespace

    cfg = RunConfig(command="trace")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seq_len = 3
    with pytest.raises(ValueError, match="method must be one of"):
        RunConfig(command="trace", method="auto")
    with pytest.raises(ValueError, match="eps must be a positive"):
        RunConfig(command="trace", eps=-1.0)
    ns = build_parser().parse_args(["eps-sweep", "--method", "exact", "--eps", "1e-3"])
    before = dict(vars(ns))
    cfg = from_namespace(ns, COMMANDS["eps-sweep"], world_size=1)
    assert vars(ns) == before  # resolving did not write into the arguments
    assert cfg.method == "fd" and cfg.eps is None and cfg.options.reference == "exact"
    assert (
        from_namespace(build_parser().parse_args(["trace"]), COMMANDS["trace"], 1).method == "exact"
    )
    assert from_namespace(build_parser().parse_args(["trace"]), COMMANDS["trace"], 2).method == "fd"
    assert cfg.to_dict()["eps_values"][0] == 1e-5 and "options" not in cfg.to_dict()


def test_a_new_command_is_one_new_object(tmp_path, monkeypatch, capsys):
    """Architecture (issue 7): a command defined in one place (options, run, summary rows) and
    registered in COMMANDS gets a parser, a result.json with its estimate under its own key,
    and a printed summary, with no other change."""
    from hessian_spectra.cli import COMMANDS
    from hessian_spectra.cli.command import Command, Outcome
    from hessian_spectra.vectors import norm

    @dataclasses.dataclass(frozen=True)
    class Opts:
        scale: float = 1.0

    class GradNorm(Command):
        name, help, Options = "grad-norm", "the gradient norm, scaled", Opts

        def add_options(self, p):
            p.add_argument("--scale", type=float, default=1.0)

        def run(self, ctx):
            _loss, g = ctx.op.gradient()
            v = ctx.config.options.scale * norm(g)
            return Outcome({"value": v}, {"grad_norm": v})

        def summary_rows(self, result):
            return [("grad norm", f"{result.summary['grad_norm']:.6g}")]

    monkeypatch.setitem(COMMANDS, "grad-norm", GradNorm())
    out = tmp_path / "g"
    assert main(["grad-norm", *FAST, "--scale", "2", "--out", out]) == EXIT_OK
    r = load_result(out)
    assert r["grad_norm"]["value"] == pytest.approx(2 * r["operator"]["grad_norm"], rel=1e-12)
    assert r["config"]["scale"] == 2.0 and r["status"] == "complete"
    assert "grad norm" in capsys.readouterr().out
