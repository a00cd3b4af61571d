"""``hessian-spectra sweep``: the grid of runs, sweep.json, sweep.png, resuming cell by cell."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hessian_spectra.density as density_mod
from hessian_spectra.cli import COMMANDS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from hessian_spectra.cli.sweep import SweepUsageError, parse_sweep, w1_over_range
from hessian_spectra.density import SpectralDensity

BASE = ["--quiet", "--model", "factories:mlp", "--method", "exact", "--probes", "2"]
GRID = ["--vary", "steps=6,10", "--vary", "basis-dtype=float64,float32"]


def _sweep(out, *extra):
    return main(["sweep", "density", *GRID, *BASE, *extra, "--out", str(out)])


def _cells(out):
    return sorted(p for p in out.iterdir() if p.is_dir())


def test_two_by_two_grid_writes_four_cells_sweep_json_and_figure(tmp_path):
    """A 2 x 2 grid (steps x basis-dtype) runs 4 complete density runs, each in its folder with
    its own options; sweep.json has one row per cell whose numbers are the cell's, the
    reference row is at distance 0 and the others' W1/range and relative differences are those
    recomputed from the cells' saved densities; sweep.png is a PNG."""
    out = tmp_path / "sw"
    assert _sweep(out) == EXIT_OK
    cells = _cells(out)
    assert len(cells) == 4
    saved = [json.loads((c / "result.json").read_text()) for c in cells]
    assert all(r["status"] == "complete" for r in saved)
    combos = {(r["config"]["steps"], r["config"]["basis_dtype"]) for r in saved}
    assert combos == {(6, "float64"), (6, "float32"), (10, "float64"), (10, "float32")}
    sw = json.loads((out / "sweep.json").read_text())
    assert sw["status"] == "complete" and sw["num_cells"] == 4
    assert sw["vary"] == {"steps": ["6", "10"], "basis-dtype": ["float64", "float32"]}
    rows = sw["cells"]
    assert [r["options"] for r in rows] == [
        {"steps": "6", "basis-dtype": "float64"},
        {"steps": "6", "basis-dtype": "float32"},
        {"steps": "10", "basis-dtype": "float64"},
        {"steps": "10", "basis-dtype": "float32"},
    ]
    ref = SpectralDensity.from_dict(
        json.loads((out / rows[0]["cell"] / "result.json").read_text())["density"]
    )
    for r in rows:
        res = json.loads((out / r["cell"] / "result.json").read_text())
        assert res["config"]["steps"] == int(r["options"]["steps"])
        for k in ("lambda_max", "lambda_min", "trace", "negative_mass"):
            assert r[k] == res["summary"][k]
        assert r["seconds"] > 0 and r["num_ghosts"] == 0 and r["exit_code"] == EXIT_OK
        d = SpectralDensity.from_dict(res["density"])
        lo, hi = min(d.lambda_min, ref.lambda_min), max(d.lambda_max, ref.lambda_max)
        from scipy.stats import wasserstein_distance

        w1 = wasserstein_distance(
            d.nodes.ravel(), ref.nodes.ravel(), d.weights.ravel(), ref.weights.ravel()
        ) / (hi - lo)
        assert r["w1_over_range"] == pytest.approx(w1, rel=1e-9, abs=1e-15)
        assert r["rel_diff_lambda_max"] == pytest.approx(
            (r["lambda_max"] - rows[0]["lambda_max"]) / abs(rows[0]["lambda_max"])
        )
    assert rows[0]["w1_over_range"] == 0.0 and rows[0]["rel_diff_lambda_max"] == 0.0
    assert rows[2]["w1_over_range"] > 0  # 10 steps vs 6: another quadrature
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_sweep_resumes_without_recomputing_finished_cells(tmp_path, monkeypatch):
    """Interrupt (Ctrl-C) the sweep in the second probe of the third cell: the sweep stops with
    exit 130, cells 1-2 complete, cell 3 saved with its first probe. Running it again keeps
    cells 1-2 byte for byte, computes only cell 3's missing probe (--resume) and cell 4's two:
    3 Lanczos runs, not 8; the result equals an uninterrupted sweep's."""
    real = density_mod.lanczos
    calls = {"n": 0, "stop_at": 6}  # cells 1, 2: calls 1-4; cell 3: calls 5, 6 (interrupted)

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(density_mod, "lanczos", counting)
    out = tmp_path / "sw"
    assert _sweep(out) == EXIT_INTERRUPTED
    cells = _cells(out)
    assert len(cells) == 3
    st = [json.loads((c / "result.json").read_text()) for c in cells]
    assert [s["status"] for s in st] == ["complete", "complete", "interrupted"]
    assert len(st[2]["density"]["runs"]) == 1
    assert json.loads((out / "sweep.json").read_text())["status"] == "incomplete"
    before = {c.name: (c / "result.json").read_bytes() for c in cells[:2]}

    calls.update(n=0, stop_at=-1)
    assert _sweep(out) == EXIT_OK
    assert calls["n"] == 3
    cells = _cells(out)
    assert len(cells) == 4
    assert {c.name: (c / "result.json").read_bytes() for c in cells[:2]} == before
    resumed = json.loads((cells[2] / "result.json").read_text())
    assert resumed["status"] == "complete" and len(resumed["density"]["runs"]) == 2
    assert json.loads((out / "sweep.json").read_text())["status"] == "complete"

    monkeypatch.setattr(density_mod, "lanczos", real)
    ref = tmp_path / "ref"
    assert _sweep(ref) == EXIT_OK
    for a, b in zip(_cells(out), _cells(ref)):
        ra, rb = (json.loads((c / "result.json").read_text())["density"]["runs"] for c in (a, b))
        assert [r["alpha"] for r in ra] == [r["alpha"] for r in rb]


def test_changed_options_rerun_a_complete_cell(tmp_path, monkeypatch):
    """A complete cell is kept only for the same arguments: the same sweep with another --seed
    reruns every cell (4 x 2 Lanczos runs)."""
    out = tmp_path / "sw"
    assert _sweep(out) == EXIT_OK
    real = density_mod.lanczos
    n = {"calls": 0}

    def counting(*a, **k):
        n["calls"] += 1
        return real(*a, **k)

    monkeypatch.setattr(density_mod, "lanczos", counting)
    assert _sweep(out) == EXIT_OK and n["calls"] == 0
    assert _sweep(out, "--seed", "3") == EXIT_OK and n["calls"] == 8


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["density", "--steps", "4"], "at least one --vary"),
        (["--vary", "eps=1"], "command to run first"),
        (["nope", "--vary", "eps=1"], "unknown command"),
        (["density", "--vary", "eps"], "OPTION=V1,V2"),
        (["density", "--vary", "colour=red"], "no option --colour"),
        (["density", "--vary", "steps=4,4"], "listed twice"),
        (["density", "--vary", "steps=4", "--vary", "steps=5"], "given twice"),
        (["density", "--vary", "steps=4,5", "--steps", "3"], "both varied and given"),
        (["density", "--vary", "per-block=maybe"], "on/off"),
    ],
)
def test_bad_sweep_lines(argv, match):
    """Malformed sweep lines are refused with a message naming the problem."""
    with pytest.raises(SweepUsageError, match=match):
        parse_sweep(argv, COMMANDS)


def test_bad_line_exit_status_and_help(capsys):
    """A bad line exits 2 with one error line; --help exits 0 and shows an example."""
    assert main(["sweep", "density", "--vary", "colour=red"]) == EXIT_USAGE
    assert "no option --colour" in capsys.readouterr().err
    assert main(["sweep", "--help"]) == EXIT_OK
    assert "example:" in capsys.readouterr().out


def test_bad_cell_value_is_refused_before_any_cell_runs(tmp_path, capsys):
    """A value argparse refuses in one cell (basis-dtype=float13) stops the sweep with exit 2
    before the first (good) cell runs: no cell folder is written."""
    out = tmp_path / "sw"
    argv = ["sweep", "density", "--vary", "basis-dtype=float64,float13", *BASE, "--out", str(out)]
    assert main(argv) == EXIT_USAGE
    assert "float13" in capsys.readouterr().err
    assert not out.exists() or not _cells(out)


def test_a_failing_cell_does_not_stop_the_sweep(tmp_path):
    """A cell whose run fails (a model factory that does not exist: exit 2 from that run) is
    recorded as failed and the next cell still runs; the sweep's exit status is the failure's."""
    out = tmp_path / "sw"
    argv = [
        "sweep",
        "trace",
        "--vary",
        "model=factories:no_such_factory,factories:mlp",
        "--quiet",
        "--method",
        "exact",
        "--probes",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == EXIT_USAGE
    rows = json.loads((out / "sweep.json").read_text())["cells"]
    assert [r["exit_code"] for r in rows] == [EXIT_USAGE, EXIT_OK]
    assert rows[1]["status"] == "complete" and rows[1]["trace"] is not None


def test_flag_values_and_w1():
    """A flag varies as on/off (on: the flag given, off: absent); W1/range of point masses at
    the two ends of the range is 1 and of equal measures 0."""
    s = parse_sweep(["density", "--vary", "per-block=on,off"], COMMANDS)
    assert s["flags"] == {"per-block"}
    from pathlib import Path

    from hessian_spectra.cli.sweep import _cell_argv

    assert "--per-block" in _cell_argv(s, {"per-block": "on"}, Path("x"))
    assert "--per-block" not in _cell_argv(s, {"per-block": "off"}, Path("x"))
    assert w1_over_range(([0.0], [1.0]), ([2.0], [1.0])) == 1.0
    x = np.array([0.0, 1.0, 3.0])
    assert w1_over_range((x, [0.2, 0.3, 0.5]), (x, [0.2, 0.3, 0.5])) == 0.0
