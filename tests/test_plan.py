"""The cost model: components by hand, layouts, the recommendation, bad input."""

import pytest

from hessian_spectra.basis import CHUNK_BYTES
from hessian_spectra.plan import (
    FD_PRODUCT_ALLREDUCES,
    FD_RETRY_ALLREDUCES,
    plan_run,
    recommend_parallel,
    scalar_allreduces,
    vector_copies,
)

P = 1_000_000


def test_components_by_hand_single_process():
    p = plan_run(P, num_steps=10, reorth="full", method="fd")
    assert p.memory["params"] == p.memory["grads"] == p.memory["snapshot"] == 4 * P
    assert p.memory["hvp_out"] == 8 * P
    assert p.memory["basis"] == 10 * 4 * P
    assert p.memory["fsdp"] == 0
    assert p.total_bytes == sum(p.memory.values()) == (3 + 2 + 10) * 4 * P


def test_exact_keeps_no_snapshot_and_bf16_basis_adds_two_working_copies():
    p = plan_run(P, num_steps=10, method="exact", basis_dtype="bfloat16")
    assert p.memory["snapshot"] == 0
    assert p.memory["basis"] == 10 * 2 * P + 2 * 4 * P


@pytest.mark.parametrize(
    ("reorth", "basis", "rows"),
    [("none", "memory", 2), (3, "memory", 3), (1, "memory", 2), ("full", "files", 2)],
)
def test_basis_rows(reorth, basis, rows):
    staged = 2 * CHUNK_BYTES if basis == "files" else 0
    got = plan_run(P, num_steps=40, reorth=reorth, basis=basis).memory["basis"]
    assert got == rows * 4 * P + staged


def test_full_basis_grows_with_steps_unless_in_files():
    mem = [plan_run(P, num_steps=n).memory["basis"] for n in (10, 20, 40)]
    files = [plan_run(P, num_steps=n, basis="files").memory["basis"] for n in (10, 20, 40)]
    assert mem[0] < mem[1] < mem[2] and len(set(files)) == 1


@pytest.mark.parametrize(
    ("parallel", "replicate", "shard"), [("fsdp", 1, 8), ("hsdp", 2, 4), ("dp", 1, 1)]
)
def test_local_entries_follow_the_layout(parallel, replicate, shard):
    p = plan_run(P, world_size=8, parallel=parallel, replicate=replicate, num_blocks=10)
    assert p.memory["params"] == 4 * -(-P // shard)
    assert p.inputs["shard_size"] == shard
    # FSDP buffers: two gathered blocks and one unsharded block gradient, only when sharded
    assert p.memory["fsdp"] == (3 * 4 * (P // 10) if shard > 1 else 0)


def test_reshard_after_forward_false_keeps_the_gathered_model():
    p = plan_run(P, world_size=4, num_blocks=10, reshard_after_forward=False)
    assert p.memory["fsdp"] == 4 * P + 4 * (P // 10)


def test_step_seconds_from_gradient_time_and_copy_bandwidth():
    p = plan_run(P, num_steps=4, reorth="none", gradient_seconds=1.0, copy_bandwidth=8e6)
    s = p.step_seconds
    assert s["hvp"] == 2.0  # two gradients: the fd primitive
    assert s["copies_per_step"] == vector_copies("none", 0) == 4.5
    assert s["vectors"] == pytest.approx(4.5 * 2 * 4 * P / 8e6)
    assert plan_run(P).step_seconds is None


def test_fd_retries_add_two_gradients_per_redone_product():
    kw = dict(num_steps=4, reorth="none", gradient_seconds=0.5, copy_bandwidth=8e6)
    s0 = plan_run(P, **kw).step_seconds
    s = plan_run(P, fd_retry_rate=0.75, **kw).step_seconds
    assert s["gradients_per_step"] == 2 + 2 * 0.75
    assert s["hvp"] == pytest.approx(3.5 * 0.5) and s0["hvp"] == pytest.approx(1.0)
    assert s["vectors"] == s0["vectors"]  # the recurrence does not change
    exact = plan_run(P, method="exact", fd_retry_rate=0.75, **kw).step_seconds
    assert exact["gradients_per_step"] == 2.5  # no fd step to redo


def test_scalar_allreduces_per_step_by_parts():
    # recurrence: alpha's dot + two Gram–Schmidt sweeps with a basis, alpha + ||w|| without
    assert scalar_allreduces("full", "exact") == 3 and scalar_allreduces("none", "exact") == 2
    assert scalar_allreduces(4, "fd") == 3 + FD_PRODUCT_ALLREDUCES
    assert scalar_allreduces("none", "fd", 0.5) == 2 + FD_PRODUCT_ALLREDUCES + 0.5 * (
        FD_RETRY_ALLREDUCES
    )


def test_collectives_term_only_on_more_than_one_rank():
    kw = dict(num_steps=8, gradient_seconds=1.0, copy_bandwidth=1e9, allreduce_seconds=1e-3)
    one = plan_run(P, world_size=1, **kw).step_seconds
    assert one["collectives"] == 0 and one["scalar_allreduces_per_step"] == 0
    four = plan_run(P, world_size=4, fd_retry_rate=0.5, **kw).step_seconds
    calls = scalar_allreduces("full", "fd", 0.5)
    assert four["scalar_allreduces_per_step"] == calls
    assert four["collectives"] == pytest.approx(calls * 1e-3)
    assert four["total"] == pytest.approx(four["hvp"] + four["vectors"] + four["collectives"])
    # the vector work is over this rank's quarter of the entries
    assert four["vectors"] == pytest.approx(one["vectors"] / 4)
    missing = plan_run(P, world_size=4, num_steps=8, gradient_seconds=1.0, copy_bandwidth=1e9)
    assert missing.step_seconds["collectives"] == 0
    assert any("all-reduces left out" in n for n in missing.notes)


def test_mean_copies_for_full_reorth_grow_linearly():
    assert [vector_copies("full", j) for j in range(3)] == [6.5, 8.5, 10.5]
    assert vector_copies(2, 10) == vector_copies(2, 1) == 8.5


def test_recommend_prefers_dp_then_hsdp_then_fsdp():
    kw = dict(world_size=8, num_steps=10, num_blocks=10)
    one = plan_run(P, parallel="dp", **kw).total_bytes
    assert recommend_parallel(P, device_bytes=int(one / 0.8) + 1, **kw) == "dp"
    hsdp = plan_run(P, parallel="hsdp", replicate=4, **kw).total_bytes  # shard group of 2
    assert recommend_parallel(P, device_bytes=int(hsdp / 0.8) + 1, **kw) == "hsdp"
    fsdp = plan_run(P, parallel="fsdp", **kw).total_bytes
    assert recommend_parallel(P, device_bytes=int(fsdp / 0.8) + 1, **kw) == "fsdp"
    with pytest.raises(ValueError, match="no layout fits"):
        recommend_parallel(P, device_bytes=int(fsdp / 0.8) - 1, **kw)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"parallel": "ddp"}, "parallel must be"),
        ({"parallel": "hsdp", "world_size": 6, "replicate": 4}, "divisible"),
        ({"reorth": "some"}, "reorth must be"),
        ({"basis_dtype": "int8"}, "basis_dtype must be"),
        ({"basis": "disk"}, "basis must be"),
        ({"num_steps": 0}, "num_steps"),
        ({"fd_retry_rate": 1.5}, "fd_retry_rate"),
        ({"allreduce_seconds": -1.0}, "allreduce_seconds"),
    ],
)
def test_bad_input_names_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        plan_run(P, **kw)


def test_table_and_dict():
    p = plan_run(P, gradient_seconds=1.0, copy_bandwidth=1e9)
    d = p.to_dict()
    assert d["total_bytes"] == p.total_bytes and set(d["memory"]) == set(p.memory)
    t = p.table()
    assert "total" in t and "% of the HVP" in t and "activations left out" in t


def test_cli_plan_prints_the_components_and_a_recommendation(capsys):
    import json

    from hessian_spectra.cli import main

    assert main(["plan", "--params", "1M", "--steps", "10", "--layers", "10", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total_bytes"] == plan_run(P, num_steps=10, num_blocks=10).total_bytes
    args = ["plan", "--params", "1e6", "--world-size", "8", "--device-memory", "200MiB"]
    assert main(args) == 0
    assert "recommended layout for 0.2 GiB per device: dp" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--params", "lots"], "parameter count"),
        (["--params", "1M", "--world-size", "6", "--parallel", "hsdp", "--replicate", "4"], "div"),
        (["--params", "1M", "--device-memory", "80 apples"], "size"),
        (["--params", "1M", "--fd-retry-rate", "2"], "fd_retry_rate must be in [0, 1]"),
    ],
)
def test_cli_plan_bad_input_is_one_line_exit_2(args, match, capsys):
    from hessian_spectra.cli import main

    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) <= 2 and "Traceback" not in err
