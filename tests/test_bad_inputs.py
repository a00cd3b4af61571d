"""Every bad input raises a clear error that says what was wrong and what to do instead.

Each row of ``CASES`` is (id, a thunk that must raise, the exception type, a regex the message
must match). The regexes check for the *remedy* part of the message, not just the complaint.

``CLI_CASES`` is the same table for the command line: (id, arguments, exit status, a regex the
last line on stderr must match); every user error is one line on stderr, exit 2, naming the
fix, and no traceback without ``--debug``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessian_spectra as hs
from conftest import known_spectrum_matrix, make_problem
from hessian_spectra.cli import main


def _mlp():
    return make_problem("mlp")


def _op(**kw):
    m, l, b = _mlp()
    return hs.HessianOperator(m, l, b, **kw)


def _nan_batch_loss(bad: int):
    m, l, b = _mlp()

    def f(model, batch):
        loss, w = l(model, batch)
        return (loss * float("nan"), w) if batch is b[bad] else (loss, w)

    return m, f, b


def _nan_on(method, bad=1):
    m, f, b = _nan_batch_loss(bad)
    return lambda: hs.HessianOperator(m, f, b, method=method).matvec(
        hs.random_probe(list(m.parameters()), 0, dtype=torch.float64)
    )


def _frozen_model():
    m, l, b = _mlp()
    for p in m.parameters():
        p.requires_grad_(False)
    return m, l, b


def _one_frozen():
    m, l, b = _mlp()
    m.fc1.bias.requires_grad_(False)
    return hs.HessianOperator(m, l, b, params=["fc1.weight", "fc1.bias"])


def _dropout_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    b = [(torch.randn(16, 4), torch.randn(16, 1))]
    op = hs.HessianOperator(model, lambda m, x: ((m(x[0]) - x[1]) ** 2).mean(), b, train_mode=True)
    return op.matvec(hs.random_probe(op))


def _shuffled_loader():
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(40, 4), torch.randn(40, 3))
    m, l, _ = _mlp()
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    op = hs.HessianOperator(m.float(), l, loader)
    return op.matvec(hs.random_probe(op))


def _batchnorm_train_on(model):
    b = [(torch.randn(8, 4), torch.randn(8, 1))]
    op = hs.HessianOperator(model, lambda m, x: ((m(x[0]) - x[1]) ** 2).mean(), b, train_mode=True)
    return op.matvec(hs.random_probe(op))


def _bf16_fd():
    m, l, b = _mlp()
    return hs.HessianOperator(
        m.to(torch.bfloat16), l, [(x.bfloat16(), y.bfloat16()) for x, y in b], method="fd"
    )


def _vec(op, v):
    return lambda: op.matvec(v)


_OP = _op()
_P = [torch.zeros_like(p) for p in _OP.params]
_H = known_spectrum_matrix(torch.linspace(0, 1, 10))

CASES = [
    # --- data
    (
        "empty-batches",
        lambda: hs.HessianOperator(*_mlp()[:2], []),
        ValueError,
        r"batches is empty.*Check",
    ),
    (
        "none-batches",
        lambda: hs.HessianOperator(*_mlp()[:2], None),
        ValueError,
        r"pass a list of batches",
    ),
    (
        "generator",
        lambda: hs.HessianOperator(*_mlp()[:2], (b for b in _mlp()[2])),
        TypeError,
        r"one-shot iterator.*list\(\.\.\.\)",
    ),
    (
        "not-iterable",
        lambda: hs.HessianOperator(*_mlp()[:2], 3),
        TypeError,
        r"re-iterable \(a list or a DataLoader\)",
    ),
    ("shuffling-dataloader", _shuffled_loader, ValueError, r"shuffle=False"),
    # --- loss
    ("nan-loss-fd", _nan_on("fd"), FloatingPointError, r"batch 1.*Check that batch"),
    ("nan-loss-exact", _nan_on("exact"), FloatingPointError, r"batch 1.*Check that batch"),
    ("nan-loss-jvp", _nan_on("jvp"), FloatingPointError, r"batch 1.*Check that batch"),
    (
        "nan-loss-gradient",
        lambda: hs.HessianOperator(*_nan_batch_loss(2)).gradient(),
        FloatingPointError,
        r"batch 2",
    ),
    ("nan-loss-first-batch", _nan_on("exact", bad=0), FloatingPointError, r"batch 0"),
    (
        "non-scalar-loss",
        lambda: hs.HessianOperator(
            _mlp()[0], lambda m, b: (m(b[0]) - b[1]) ** 2, _mlp()[2]
        ).gradient(),
        ValueError,
        r"must be a scalar \(reduce it with \.mean\(\)",
    ),
    (
        "loss-3-tuple",
        lambda: hs.HessianOperator(
            _mlp()[0], lambda m, b: (m(b[0]).sum(), 1, 2), _mlp()[2]
        ).gradient(),
        TypeError,
        r"expected a scalar loss or \(loss, weight\)",
    ),
    (
        "loss-float",
        lambda: hs.HessianOperator(_mlp()[0], lambda m, b: 1.0, _mlp()[2]).gradient(),
        TypeError,
        r"expected a scalar tensor",
    ),
    (
        "zero-weights",
        lambda: hs.HessianOperator(
            _mlp()[0], lambda m, b: (m(b[0]).sum(), 0.0), _mlp()[2], check_determinism=False
        ).gradient(),
        ValueError,
        r"must be positive",
    ),
    (
        "loss-fn-not-callable",
        lambda: hs.HessianOperator(_mlp()[0], 3, _mlp()[2]),
        TypeError,
        r"loss_fn\(model, batch\)",
    ),
    (
        "model-not-module",
        lambda: hs.HessianOperator(lambda x: x, _mlp()[1], _mlp()[2]),
        TypeError,
        r"torch\.nn\.Module",
    ),
    # --- parameters
    (
        "no-params-with-grad",
        lambda: hs.HessianOperator(*_frozen_model()),
        ValueError,
        r"requires_grad_\(True\)",
    ),
    (
        "named-param-without-grad",
        _one_frozen,
        ValueError,
        r"'fc1\.bias' has requires_grad=False.*requires_grad_\(True\)",
    ),
    (
        "unknown-param-name",
        lambda: _op(params=["fc1.wieght"]),
        ValueError,
        r"no parameter named 'fc1\.wieght'.*fc1\.weight",
    ),
    ("empty-params", lambda: _op(params=[]), ValueError, r"name at least one parameter"),
    ("param-twice", lambda: _op(params=["fc1.weight", "fc1.weight"]), ValueError, r"twice"),
    (
        "foreign-tensor-param",
        lambda: _op(params=[torch.zeros(3, requires_grad=True)]),
        ValueError,
        r"not a parameter of the model.*named_parameters",
    ),
    ("param-entry-int", lambda: _op(params=[3]), TypeError, r"names or tensors"),
    # --- vectors
    (
        "vector-is-tensor",
        _vec(_OP, torch.zeros(_OP.num_params)),
        TypeError,
        r"list of tensors.*random_probe",
    ),
    (
        "vector-wrong-count",
        _vec(_OP, _P[:-1]),
        ValueError,
        r"has 3 tensors but the operator has 4 parameters.*op\.params",
    ),
    (
        "vector-wrong-shape",
        _vec(_OP, [_P[0].T] + _P[1:]),
        ValueError,
        r"v\[0\] has shape \(4, 6\) but parameter 0.*\(6, 4\)",
    ),
    (
        "lanczos-v0-zero",
        lambda: hs.lanczos(_H, 3, v0=[torch.zeros(10, dtype=torch.float64)]),
        ValueError,
        r"nonzero and finite",
    ),
    # --- methods and settings
    ("bad-method", lambda: _op(method="hvp"), ValueError, r"one of \('fd', 'exact', 'jvp'\)"),
    (
        "bad-method-per-call",
        lambda: _OP.matvec(_P, method="autograd"),
        ValueError,
        r"one of \('fd', 'exact', 'jvp'\)",
    ),
    ("eps-zero", lambda: _op(eps=0.0), ValueError, r"positive finite number or None"),
    ("eps-negative", lambda: _op(eps=-1e-3), ValueError, r"positive finite number or None"),
    ("eps-nan", lambda: _op(eps=float("nan")), ValueError, r"positive finite number or None"),
    ("eps-string", lambda: _op(eps="1e-3"), ValueError, r"positive finite number or None"),
    ("fd-bf16", _bf16_fd, ValueError, r"allow_low_precision_fd=True|method='exact'"),
    ("dropout-train-mode", _dropout_train, ValueError, r"not deterministic.*train_mode=False"),
    (
        "fd-error-bad-reference",
        lambda: _OP.fd_error(hs.random_probe(_OP), reference="exact2"),
        ValueError,
        r"'exact' or 'richardson'",
    ),
    # --- Lanczos / SLQ / estimators
    ("reorth-negative", lambda: hs.lanczos(_H, 3, reorth=-2), ValueError, r"window must be ≥ 0"),
    (
        "reorth-unknown",
        lambda: hs.lanczos(_H, 3, reorth="partial"),
        ValueError,
        r"'full', 'none' or a window size",
    ),
    (
        "steps-exceed-params",
        lambda: hs.lanczos(_H, 11),
        ValueError,
        r"exceeds the operator's dimension 10.*fewer steps",
    ),
    ("steps-zero", lambda: hs.lanczos(_H, 0), ValueError, r"positive integer"),
    (
        "basis-dtype-unknown",
        lambda: hs.lanczos(_H, 3, basis_dtype="fp8"),
        ValueError,
        r"basis_dtype must be one of",
    ),
    (
        "return-basis-without-full",
        lambda: hs.lanczos(_H, 3, reorth=2, return_basis=True),
        ValueError,
        r"needs reorth='full'",
    ),
    (
        "slq-probes-zero",
        lambda: hs.slq(_H, 3, 0),
        ValueError,
        r"num_probes must be a positive integer",
    ),
    (
        "trace-probes-zero",
        lambda: hs.trace(_H, 0),
        ValueError,
        r"num_matvecs must be a positive integer",
    ),
    ("top-k-zero", lambda: hs.top_eigenvalues(_H, 0), ValueError, r"k must be a positive integer"),
    (
        "top-k-too-big",
        lambda: hs.top_eigenvalues(_H, 11),
        ValueError,
        r"exceeds the operator's dimension",
    ),
    ("not-an-operator", lambda: hs.lanczos("H", 3), TypeError, r"HessianOperator.*square matrix"),
    ("non-square-matrix", lambda: hs.lanczos(torch.zeros(3, 4), 2), ValueError, r"square matrix"),
]


@pytest.mark.parametrize("thunk,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(thunk, exc, match):
    """The bad input raises ``exc`` whose message matches ``match`` (what to do about it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=match):
            thunk()


def test_allow_low_precision_fd_warns_instead():
    """allow_low_precision_fd=True accepts bf16 parameters with method='fd' but warns."""
    m, l, b = _mlp()
    with pytest.warns(UserWarning, match="prefer float32"):
        hs.HessianOperator(
            m.to(torch.bfloat16),
            l,
            [(x.bfloat16(), y.bfloat16()) for x, y in b],
            method="fd",
            allow_low_precision_fd=True,
        )


def test_batchnorm_in_train_mode_is_no_longer_refused():
    """Issue 13 item 8 (ops branch): a train-mode BatchNorm is accepted (its buffers kept and
    restored around each pass; test_objective checks the Hessian), so it left this table."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
    before = {n: t.clone() for n, t in model.named_buffers()}
    assert len(_batchnorm_train_on(model)) == 6
    assert all(torch.equal(before[n], t) for n, t in model.named_buffers())


def test_batchnorm_in_eval_mode_is_fine():
    """The same BatchNorm model in the default eval mode is accepted (running stats fixed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1)).train()
    b = [(torch.randn(8, 4), torch.randn(8, 1))]
    op = hs.HessianOperator(model, lambda m, x: ((m(x[0]) - x[1]) ** 2).mean(), b)
    assert len(op.matvec(hs.random_probe(op))) == 6


# ----------------------------------------------------------------------------- the command line
def _jsonl(d, rows):
    import json

    f = d / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A tiny Llama (256 positions), a tiny GPT-2 (64 positions), a text file, a plain file, and
    a JSONL file whose second record's text is a number."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import factories

    d = tmp_path_factory.mktemp("cli")
    text = d / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    a_file = d / "a_file"
    a_file.write_text("not a folder")
    assert main(["trace", *MLP[:5], "--probes", "1", "--out", str(d / "run")]) == 0
    return {
        "llama": str(factories.tiny_hf_checkpoint(d / "llama")),
        "gpt2": str(factories.tiny_gpt2_checkpoint(d / "gpt2", n_positions=64)),
        "text": str(text),
        "file": str(a_file),
        "run": str(d / "run"),
        "jsonl": str(_jsonl(d, [{"text": "a fine sentence of text"}, {"text": 12345}])),
    }


MLP = ["--quiet", "--model", "factories:mlp", "--method", "fd", "--steps", "2", "--probes", "1"]
HF = ["--quiet", "--steps", "2", "--probes", "1", "--batch-size", "1"]

CLI_CASES = [
    # item 11: --out that cannot be a run folder
    (
        "out-is-a-file",
        lambda f, t: ["density", *MLP, "--out", f["file"]],
        2,
        r"--out .* is a file, not a folder: choose a folder",
    ),
    (
        "out-under-a-file",
        lambda f, t: ["density", *MLP, "--out", f["file"] + "/sub/run"],
        2,
        r"--out .* cannot be created: part of its path is a file",
    ),
    (
        "out-unwritable",
        lambda f, t: ["density", *MLP, "--out", "/sys/hs-spectra-out"],
        2,
        r"--out .* cannot be created \(Operation not permitted\): choose a folder you can write",
    ),
    (
        "plot-out-is-a-file",
        lambda f, t: ["plot", f["run"], "--out", f["file"]],
        2,
        r"--out .* is a file, not a folder",
    ),
    # item 12: user mistakes that were internal errors
    (
        "factory-raises",
        lambda f, t: [
            "density",
            *MLP,
            "--model",
            "factories:raising_factory",
            "--out",
            str(t / "o"),
        ],
        2,
        r"factory 'factories:raising_factory' raised RuntimeError: "
        r"the dataset file .*factory's code",
    ),
    (
        "device-cuda-without-cuda",
        lambda f, t: ["density", *MLP, "--device", "cuda", "--out", str(t / "o")],
        2,
        r"--device cuda but CUDA is not available.*use --device cpu",
    ),
    (
        "device-unknown",
        lambda f, t: ["density", *MLP, "--device", "tpu9", "--out", str(t / "o")],
        2,
        r"unknown device 'tpu9': use \"cpu\", \"cuda\" or \"cuda:N\"",
    ),
    (
        "eps-negative",
        lambda f, t: ["density", *MLP, "--eps", "-1e-3"],
        2,
        r"argument --eps: expected a positive number, got '-1e-3'",
    ),
    (
        "eps-negative-equals",
        lambda f, t: ["density", *MLP, "--eps=-1e-3"],
        2,
        r"argument --eps: expected a positive number, got '-1e-3'",
    ),
    (
        "eps-values-negative",
        lambda f, t: ["eps-sweep", *MLP[:3], "--eps-values", "1e-3", "-2"],
        2,
        r"argument --eps-values: expected a positive number, got '-2'",
    ),
    (
        "eps-inf",
        lambda f, t: ["density", *MLP, "--eps", "inf"],
        2,
        r"expected a positive finite number, got 'inf'",
    ),
    (
        "damping-negative",
        lambda f, t: ["influence", *MLP[:3], "--damping", "-1e-2"],
        2,
        r"argument --damping: expected a finite number ≥ 0, got '-1e-2'",
    ),
    (
        "loss-value-error",
        lambda f, t: [
            "density",
            *MLP,
            "--model",
            "factories:value_error_loss_mlp",
            "--out",
            str(t / "o"),
        ],
        2,
        r"error: the loss does not depend on the parameters",
    ),
    (
        "loss-under-no-grad",
        lambda f, t: [
            "density",
            *MLP,
            "--model",
            "factories:no_grad_loss_mlp",
            "--out",
            str(t / "o"),
        ],
        2,
        r"loss of batch 0 does not depend on the parameters.*torch\.no_grad\(\).*Compute it from",
    ),
    # item 5: data and position limits
    (
        "seq-len-beyond-gpt2-n-positions",
        lambda f, t: [
            "density",
            *HF,
            "--model",
            f["gpt2"],
            "--data",
            f["text"],
            "--seq-len",
            "65",
            "--out",
            str(t / "o"),
        ],
        2,
        r"--seq-len 65 exceeds the model's limit of 64 positions \(n_positions.*--seq-len <= 64",
    ),
    (
        "seq-len-beyond-llama-max-positions",
        lambda f, t: [
            "density",
            *HF,
            "--model",
            f["llama"],
            "--data",
            f["text"],
            "--seq-len",
            "300",
            "--out",
            str(t / "o"),
        ],
        2,
        r"--seq-len 300 exceeds the model's limit of 256 positions \(max_position_embeddings",
    ),
    (
        "jsonl-number-text",
        lambda f, t: [
            "density",
            *HF,
            "--model",
            f["llama"],
            "--data",
            f["jsonl"],
            "--seq-len",
            "8",
            "--out",
            str(t / "o"),
        ],
        2,
        r"record 2 field 'text' is a JSON number .*choose another field with --text-field",
    ),
    (
        "num-batches-beyond-data",
        lambda f, t: [
            "density",
            *HF,
            "--model",
            f["llama"],
            "--data",
            f["text"],
            "--seq-len",
            "64",
            "--num-batches",
            "999",
            "--out",
            str(t / "o"),
        ],
        2,
        r"--num-batches 999 asks for more than the .* batches .*ask for fewer",
    ),
]


@pytest.mark.parametrize(
    "make_args,code,match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_bad_cli_input_is_one_line_exit_2(cli_files, tmp_path, capsys, make_args, code, match):
    """The bad command line exits with ``code``; its error is the last line on stderr, matches
    ``match`` (the fix, in terms of flags) and no traceback is printed."""
    import re

    if "CUDA is not available" in match and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")

    assert main(make_args(cli_files, tmp_path)) == code
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err, err
    assert last.startswith("hessian-spectra") and "error:" in last, err
    assert re.search(match, last), last
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1, err


def test_factory_error_traceback_under_debug(tmp_path, capsys):
    """Issue 13 item 12: with --debug the error from a factory shows the factory's own
    traceback (the line that raised), still exit 2."""
    args = [
        "density",
        *MLP,
        "--debug",
        "--model",
        "factories:raising_factory",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "in raising_factory" in err and "my_data.pt is missing" in err
