"""distributed.process in one plain process (no torchrun needed, so not marked distributed)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from hessian_spectra import distributed as D
from hessian_spectra.distributed import process


@pytest.fixture
def no_torchrun(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def test_setup_teardown_are_noops_in_one_process(no_torchrun, capsys, tmp_path):
    """Without torchrun's environment nothing is initialised, the barrier passes, rank-0
    printing and writing happen (we are rank 0) and teardown returns instead of exiting."""
    assert not D.under_torchrun()
    assert D.setup() is False and not D.is_initialized()
    D.barrier()
    D.print0("hello")
    assert capsys.readouterr().out == "hello\n"
    D.write_json0(tmp_path / "sub" / "r.json", {"x": 1})
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"x": 1}
    D.teardown()  # no group: nothing to do, must not exit
    assert D.world_size() == 1 and D.rank() == 0 and D.is_rank0() and D.local_rank() == 0


def test_rank0_files_get_the_users_umask(no_torchrun, tmp_path):
    """write_text0 goes through the package's one atomic write: the file gets 0666 minus the
    umask (as open() would), not mkstemp's 0600, and no temporary file is left behind."""
    old = os.umask(0o022)
    try:
        path = D.write_text0(tmp_path / "a.txt", "hi")
    finally:
        os.umask(old)
    assert path.read_text() == "hi"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_launch_returns_exit_codes(no_torchrun, capsys):
    """launch() runs main between setup and teardown and turns outcomes into exit codes."""
    assert D.launch(lambda: None) == 0
    assert D.launch(lambda: 3) == 3

    def boom():
        raise RuntimeError("boom")

    assert D.launch(boom) == 1
    assert "RuntimeError: boom" in capsys.readouterr().err

    def leave(code):
        raise SystemExit(code)

    assert D.launch(leave, 2) == 2
    assert D.launch(leave, "bad input") == 1
    assert "bad input" in capsys.readouterr().err


def test_timeout_env(monkeypatch):
    """HESSIAN_SPECTRA_DIST_TIMEOUT overrides the collective timeout; nonsense is rejected."""
    monkeypatch.setenv(D.TIMEOUT_ENV, "12.5")
    assert process._timeout_s() == 12.5
    monkeypatch.setenv(D.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="seconds"):
        process._timeout_s()
    monkeypatch.setenv(D.TIMEOUT_ENV, "-1")
    with pytest.raises(ValueError, match="positive"):
        process._timeout_s()
    monkeypatch.delenv(D.TIMEOUT_ENV)
    assert process._timeout_s() == D.DEFAULT_TIMEOUT_S


def test_public_names_kept():
    """Every name the single module exported is still there (callers use distributed.X)."""
    names = {
        "setup",
        "teardown",
        "launch",
        "under_torchrun",
        "is_initialized",
        "world_size",
        "rank",
        "local_rank",
        "is_rank0",
        "barrier",
        "print0",
        "write_text0",
        "write_json0",
        "shard_model",
        "find_blocks",
        "reshard",
        "gradient_scale",
        "is_sharded",
        "local",
        "local_piece",
        "local_flat_range",
        "all_reduce_sum",
        "all_reduce_max",
        "check_agree",
        "all_gather_object",
        "broadcast_object",
        "DEFAULT_TIMEOUT_S",
        "TIMEOUT_ENV",
        # the parallel setups (fsdp / hsdp / dp) and the layout vectors reduce by
        "PARALLEL",
        "parallelize",
        "make_mesh",
        "replicate_size",
        "Layout",
        "layout_of",
        "use_layout",
        "current_layout",
        "sum_over_shards",
        "check_replicas",
    }
    assert set(D.__all__) == names
    assert all(hasattr(D, n) for n in names)
