"""The command line's --curvature ggn|ef, --trace-method, density --per-block and --params globs,
on tiny float64 factories, against dense references and the library's own results."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hessian_spectra as hs
from hessian_spectra.cli import EXIT_OK, EXIT_USAGE, main
from hessian_spectra.results import load_result

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

import factories  # noqa: E402
import ggn_factories  # noqa: E402

Q = ["--quiet", "--method", "exact"]


def run(args):
    return main([str(a) for a in args])


def test_eigs_curvature_ggn_equals_dense_ggn(tmp_path):
    """`eigs --curvature ggn` on a SplitLoss factory gives the 2 largest eigenvalues of the dense
    GGN (1e-8 relative), records the curvature, and the GGN's smallest Ritz value is ≥ −1e-8·λmax
    (PSD); the fd GGN (--method fd) gives them to 1e-5."""
    lam = torch.linalg.eigvalsh(ggn_factories.dense_ggn_of_mlp()).numpy()
    for method, rtol in (("exact", 1e-8), ("fd", 1e-5)):
        out = tmp_path / method
        args = [
            "eigs",
            "--quiet",
            "--method",
            method,
            "--model",
            "ggn_factories:mlp_split",
            "--curvature",
            "ggn",
            "-k",
            2,
            "--steps",
            30,
            "--out",
            out,
        ]
        assert run(args) == EXIT_OK
        r = load_result(out)
        assert r["config"]["curvature"] == "ggn" and r["operator"]["curvature"] == "ggn"
        np.testing.assert_allclose(r["summary"]["largest"], lam[::-1][:2], rtol=rtol)
        assert r["summary"]["lambda_min"] >= -1e-8 * lam.max()


def test_trace_curvature_ef_and_trace_methods(tmp_path):
    """`trace --curvature ef` with XTrace and 2(P+1) HVPs gives the dense empirical Fisher's trace
    to 1e-8; `--trace-method hutch++` writes exactly the API's hs.trace(op, S, method="hutch++")
    (estimate, std_error, method, num_matvecs)."""
    from hessian_spectra.testing import dense_empirical_fisher

    model, loss, batches = factories.mlp()
    F = dense_empirical_fisher(model, loss, batches)
    P = F.shape[0]
    out = tmp_path / "ef"
    assert (
        run(
            [
                "trace",
                *Q,
                "--model",
                "factories:mlp",
                "--curvature",
                "ef",
                "--probes",
                2 * (P + 1),
                "--out",
                out,
            ]
        )
        == EXIT_OK
    )
    r = load_result(out)
    assert r["trace"]["method"] == "xtrace" and r["operator"]["method"] == "ef"
    assert r["summary"]["trace"] == pytest.approx(float(F.trace()), rel=1e-8)
    out = tmp_path / "hpp"
    assert (
        run(
            [
                "trace",
                *Q,
                "--model",
                "factories:mlp",
                "--trace-method",
                "hutch++",
                "--probes",
                12,
                "--seed",
                4,
                "--out",
                out,
            ]
        )
        == EXIT_OK
    )
    r = load_result(out)
    api = hs.trace(
        hs.HessianOperator(model, loss, batches, method="exact"), 12, method="hutch++", seed=4
    )
    assert r["trace"]["estimate"] == pytest.approx(api.estimate, rel=1e-12)
    assert r["trace"]["std_error"] == pytest.approx(api.std_error, rel=1e-12)
    assert r["trace"]["num_matvecs"] == api.num_matvecs and r["trace"]["method"] == "hutch++"


def test_density_per_block(tmp_path):
    """`density --per-block` writes one SLQ density per block (the MLP's two Linear layers,
    named by module), draws density.png, and each block's nodes (steps ≥ block size) are
    eigenvalues of the dense diagonal block H_bb with the same extremes (1e-8·max|λ|); the
    summary's extremes are those over the blocks."""
    from conftest import dense_hessian

    model, loss, batches = factories.mlp()
    H = dense_hessian(model, loss, batches)
    out = tmp_path / "pb"
    assert (
        run(
            [
                "density",
                *Q,
                "--model",
                "factories:mlp",
                "--per-block",
                "--steps",
                40,
                "--probes",
                1,
                "--out",
                out,
            ]
        )
        == EXIT_OK
    )
    r = load_result(out)
    blocks = r["density"]["per_block"]
    assert list(blocks) == ["0", "2"] and (out / "density.png").exists()
    idx = {"0": range(0, 30), "2": range(30, 44)}  # 4x6+6, then 6x2+2
    ext = []
    for name, d in blocks.items():
        dens = hs.SpectralDensity.from_dict(d)
        lam = np.linalg.eigvalsh(H[list(idx[name])][:, list(idx[name])].numpy())
        nodes, tol = np.sort(dens.nodes[0]), 1e-8 * np.abs(lam).max()
        assert np.abs(nodes[:, None] - lam[None, :]).min(axis=1).max() <= tol
        np.testing.assert_allclose(nodes[[0, -1]], lam[[0, -1]], atol=tol)
        ext += [lam[0], lam[-1]]
    assert r["summary"]["lambda_max"] == pytest.approx(max(ext), rel=1e-8)
    assert r["summary"]["lambda_min"] == pytest.approx(min(ext), rel=1e-8)


def test_params_globs(tmp_path):
    """--params accepts glob patterns: '2.*' selects the second Linear layer (14 parameters), and
    eigs then equals the dense Hessian block's top eigenvalue."""
    from conftest import dense_hessian

    model, loss, batches = factories.mlp()
    H = dense_hessian(model, loss, batches, names=["2.weight", "2.bias"])
    out = tmp_path / "g"
    assert (
        run(
            [
                "eigs",
                *Q,
                "--model",
                "factories:mlp",
                "--params",
                "2.*",
                "-k",
                1,
                "--steps",
                14,
                "--out",
                out,
            ]
        )
        == EXIT_OK
    )
    r = load_result(out)
    assert r["model"]["num_params"] == 14
    assert r["summary"]["largest"][0] == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["eigs", "--model", "factories:mlp", "--curvature", "ggn"], "SplitLoss"),
        (["eps-sweep", "--model", "factories:mlp", "--curvature", "ef"], "Hessian only"),
        (["eigs", "--model", "factories:mlp", "--params", "9.*"], "matches no parameter"),
        (["density", "--model", "factories:mlp", "--per-block", "--resume"], "cannot be resumed"),
    ],
)
def test_curvature_usage_errors(args, message, tmp_path, capsys):
    """Misuse of the new options exits with the usage code and one `error:` line saying why."""
    assert run([*args, "--quiet", "--out", tmp_path / "x"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hessian-spectra: error:") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_curvature_ggn_on_a_tiny_hf_folder(tmp_path):
    """On a causal LM (a tiny Llama folder) --curvature ggn builds the GGN from the logits and
    their next-token loss itself: `eigs` runs, and its top eigenvalue equals the library's
    GGNOperator with the causal-LM helpers on the same batches (1e-6 relative)."""
    from hessian_spectra.ggn import causal_lm_forward, causal_lm_loss_of_logits
    from hessian_spectra.problem import load_problem

    folder = factories.tiny_hf_checkpoint(tmp_path / "tiny-llama")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 40))
    out = tmp_path / "e"
    common = [
        "--model",
        folder,
        "--data",
        text,
        "--seq-len",
        16,
        "--batch-size",
        2,
        "--num-batches",
        1,
    ]
    assert (
        run(
            ["eigs", "--quiet", *common, "--curvature", "ggn", "-k", 1, "--steps", 12, "--out", out]
        )
        == EXIT_OK
    )
    r = load_result(out)
    from hessian_spectra.data import DataConfig

    prob = load_problem(
        str(folder), DataConfig(path=str(text), seq_len=16, batch_size=2, num_batches=1)
    )
    op = hs.GGNOperator(prob.model, causal_lm_forward, causal_lm_loss_of_logits, prob.batches)
    top = hs.top_eigenvalues(op, 1, num_steps=12).eigenvalues[0]
    assert r["summary"]["largest"][0] == pytest.approx(float(top), rel=1e-6)


def test_density_curvature_ggn_figures(tmp_path):
    """`density --curvature ggn` writes density.png and ritz.png, and its SLQ nodes (steps = P)
    have the dense GGN's extreme eigenvalues (1e-8·λmax)."""
    lam = torch.linalg.eigvalsh(ggn_factories.dense_ggn_of_mlp()).numpy()
    out = tmp_path / "d"
    assert (
        run(
            [
                "density",
                *Q,
                "--model",
                "ggn_factories:mlp_split",
                "--curvature",
                "ggn",
                "--steps",
                20,
                "--probes",
                1,
                "--out",
                out,
            ]
        )
        == EXIT_OK
    )
    assert (out / "density.png").exists() and (out / "ritz.png").exists()
    r = load_result(out)
    assert r["summary"]["lambda_max"] == pytest.approx(float(lam[-1]), rel=1e-8)
