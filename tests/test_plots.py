"""Figures from result.json dicts only: which files each run kind draws, written atomically with
the user's umask, and the overlay of several runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from hessian_spectra.cli import main
from hessian_spectra.plots import FIGURE_FILES, plot_density, plot_result
from hessian_spectra.results import load_result

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
FAST = ["--quiet", "--model", "factories:mlp", "--method", "exact"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One saved run of each command on the tiny MLP."""
    d = tmp_path_factory.mktemp("runs")
    cmds = {
        "density": ["--steps", "4", "--probes", "2"],
        "eigs": ["-k", "1", "--steps", "4"],
        "trace": ["--probes", "2"],
        "blockdiag": [],
        "eps-sweep": ["--eps-values", "1e-3", "1e-2"],
        "influence": ["--damping", "100"],
    }
    for c, extra in cmds.items():
        assert main([c, *FAST, *extra, "--out", str(d / c)]) == 0, c
    return {c: load_result(d / c) for c in cmds}


@pytest.mark.parametrize(
    "command, files",
    [
        ("density", ["density.png", "ritz.png"]),
        ("eigs", ["eigs.png"]),
        ("blockdiag", ["blockdiag.png"]),
        ("eps-sweep", ["eps_sweep.png"]),
        ("trace", []),
        ("influence", ["influence.png"]),
    ],
)
def test_plot_result_draws_the_standard_figures(runs, tmp_path, command, files):
    """plot_result draws exactly the standard figures of each run kind, all PNG files, all named
    in FIGURE_FILES (what a run removes when they are stale)."""
    written = plot_result(runs[command], tmp_path)
    assert [p.name for p in written] == files
    assert set(files) <= set(FIGURE_FILES)
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no temporary left


def test_figures_follow_the_umask(runs, tmp_path):
    """Issue 13 item 13: figures were written 0600 (mkstemp); now 0666 & ~umask."""
    old = os.umask(0o027)
    try:
        written = plot_result(runs["density"], tmp_path)
    finally:
        os.umask(old)
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in written)


def test_overlay_and_errors(runs, tmp_path):
    """Several density runs overlay in one figure; a run without a density is refused."""
    p = plot_density([runs["density"], runs["density"]], tmp_path / "o.png", labels=["a", "b"])
    assert p.stat().st_size > 0
    with pytest.raises(ValueError, match="no spectral density"):
        plot_density(runs["trace"], tmp_path / "x.png")


def test_blockdiag_figure_from_a_result_saved_before_layer_rows(runs, tmp_path):
    """A blockdiag result.json saved before rows had kind/layer and before per_block (all its
    blocks then counted alike) still draws, as layers; a run without the test is refused."""
    from hessian_spectra.plots import plot_blockdiag

    old = json.loads(json.dumps(runs["blockdiag"]))
    bd = old["blockdiag"]
    del bd["per_block"]
    for row in bd["blocks"]:
        del row["kind"], row["layer"]
    for k in ("num_probes", "num_extra_blocks", "num_undefined", "extra"):
        del bd["summary"][k]
    p = plot_blockdiag(old, tmp_path / "old.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no block-diagonal test"):
        plot_blockdiag(runs["trace"], tmp_path / "x.png")
