"""Text data: from a source to a list of token batches and a causal-LM ``loss_fn``.

Sources (``DataConfig.path``):

- ``None`` or ``"builtin:prose"``: the embedded default, English prose from Python's own
  documentation (``pydoc_data.topics``, the help texts of the language reference: 79 topics,
  ≈ 465k characters, ≈ 110k SmolLM2 tokens), in sorted topic order;
- ``"builtin:python-code"``: real code, the functions of the running interpreter's standard
  library as prompt/completion pairs (``def`` line(s) and docstring / the rest of the body; see
  ``code_data``): one row per pair with ``loss_on="completion"``, the whole functions packed as
  documents with ``loss_on="all"``. The pairs depend on the Python version, which the problem's
  ``info`` records with the number of pairs used (``python``, ``pairs``);
- a ``.txt``/``.md`` file, or a folder of them (read in sorted path order);
- a ``.jsonl`` file: one JSON object per line with a text field (``text_field``), or with
  prompt/completion fields for ``loss_on="completion"``;
- otherwise a Hugging Face ``datasets`` name or path (needs the ``datasets`` package).

Documents are tokenised, joined with the EOS token and packed into blocks of ``seq_len``
tokens (the last partial block is padded: ``attention_mask`` 0 and ``labels`` −100). With
``loss_on="completion"`` each prompt/completion pair is one row, the prompt's labels −100
(loss on the completion only, as in FSHP's code fine-tuning experiment). Blocks are grouped
into batches of ``batch_size`` rows; ``num_batches`` keeps the first ones, ``subsample`` a
fraction of them, evenly spaced over the data. With ``num_batches`` only the documents those
batches need are tokenised (and, for ``builtin:python-code``, only the files they need are
parsed); ``subsample`` or neither reads the whole source.

A batch is a dict of (batch_size, seq_len) tensors ``input_ids``, ``attention_mask``,
``labels``; ``causal_lm_loss(model, batch)`` returns ``(mean loss over target tokens, number
of target tokens)`` so the operator weights batches by their token counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import code_data
from ._checks import check_positive_int
from .code_data import CODE_SOURCE
from .partition import ZeroWeight, shard_batches

__all__ = [
    "CODE_SOURCE",
    "IGNORE",
    "PROSE_SOURCE",
    "DataConfig",
    "DataError",
    "causal_lm_loss",
    "count_target_tokens",
    "default_texts",
    "load_documents",
    "make_batches",
]

TEXT_SUFFIXES = (".txt", ".md")
IGNORE = -100  # the label of a position without a next-token target (padding, prompts)
PROSE_SOURCE = "builtin:prose"  # the embedded default (path None) by name


class DataError(ValueError):
    """Data that cannot be used; the message says what to do (one line, in the words of
    ``DataConfig``: ``seq_len``, ``text_field``, ...).
    """


@dataclass(frozen=True)
class DataConfig:
    """How to turn a text source into batches.

    Fields:
        path: a text file, folder of .txt/.md, .jsonl file or HF dataset, or a built-in source:
            ``"builtin:prose"`` (same as None: the embedded prose) or
            ``"builtin:python-code"`` (standard-library functions as prompt/completion pairs).
        text_field: the JSONL / dataset field holding the text.
        seq_len: tokens per row (block).
        batch_size: rows per batch.
        num_batches: keep the first this many batches (None: all, or see subsample).
        subsample: keep this fraction (0, 1] of the batches, evenly spaced (None: all).
        loss_on: ``"all"`` tokens, or ``"completion"`` tokens only (JSONL prompt/completion
            records or ``builtin:python-code``).
        prompt_field / completion_field: the JSONL fields for ``loss_on="completion"``.
        split: the split of a Hugging Face dataset.
    """

    path: str | None = None
    text_field: str = "text"
    seq_len: int = 128
    batch_size: int = 1
    num_batches: int | None = None
    subsample: float | None = None
    loss_on: str = "all"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    split: str = "train"

    def __post_init__(self):
        names = ("seq_len", "batch_size") + (
            ("num_batches",) if self.num_batches is not None else ()
        )
        for name in names:
            try:
                check_positive_int(name, getattr(self, name))
            except ValueError as e:
                raise DataError(str(e)) from None
        if self.seq_len < 2:
            raise DataError(
                f"seq_len must be at least 2 (a next-token loss needs two tokens), "
                f"got {self.seq_len}"
            )
        if self.subsample is not None and not (0 < self.subsample <= 1):
            raise DataError(f"subsample must be a fraction in (0, 1], got {self.subsample!r}")
        if self.num_batches is not None and self.subsample is not None:
            raise DataError("give either num_batches or subsample, not both")
        if self.loss_on not in ("all", "completion"):
            raise DataError(f"loss_on must be 'all' or 'completion', got {self.loss_on!r}")
        # checked here, before a model is loaded for it
        if isinstance(self.path, str) and self.path.startswith("builtin:"):
            if self.path not in (PROSE_SOURCE, CODE_SOURCE):
                raise DataError(
                    f"unknown built-in data source {self.path!r}: use {PROSE_SOURCE} or "
                    f"{CODE_SOURCE}"
                )

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict."""
        return asdict(self)


def default_texts() -> list[str]:
    """The embedded English prose: the values of ``pydoc_data.topics.topics`` in key order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{i} is not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{i} is a JSON {type(obj).__name__}, expected an object")
            rows.append(obj)
    return rows


def _field(rows, field: str, where: str, arg: str) -> list[str]:
    """The string values of ``field``, one per record (records numbered from 1); a missing or
    non-string value is refused, never turned into a string.
    """
    out = []
    for i, r in enumerate(rows, 1):
        if field not in r:
            keys = sorted(r)[:8]
            raise DataError(
                f"{where}: record {i} has no field {field!r} (fields: {keys}); "
                f"choose one with {arg}"
            )
        v = r[field]
        if not isinstance(v, str):
            raise DataError(
                f"{where}: record {i} field {field!r} is a JSON "
                f"{_json_type(v)} ({str(v)[:40]!r}), expected a string of text: "
                f"fix the record or choose another field with {arg}"
            )
        out.append(v)
    return out


def _json_type(v) -> str:
    names = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return "null" if v is None else names.get(type(v), type(v).__name__)


def load_documents(cfg: DataConfig):
    """The documents of ``cfg.path``: a list of strings, or of (prompt, completion) pairs when
    ``cfg.loss_on == "completion"``.
    """
    if cfg.path is None or cfg.path == PROSE_SOURCE:
        if cfg.loss_on == "completion":
            raise DataError(
                "loss_on='completion' needs prompt/completion pairs and the embedded prose has "
                f"none: use the data source {CODE_SOURCE} (standard-library functions: "
                "docstring as prompt, body as completion) or a JSONL file of prompt/completion "
                "records"
            )
        return default_texts()
    if cfg.path == CODE_SOURCE:
        return list(_code_documents(code_data.code_pairs(), cfg.loss_on))
    p = Path(cfg.path).expanduser()
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + (".jsonl",)
        )
        if not files:
            raise DataError(f"folder {str(p)!r} has no .txt, .md or .jsonl files")
        docs = []
        for f in files:
            docs.extend(load_documents(DataConfig(**{**cfg.to_dict(), "path": str(f)})))
        return docs
    if p.is_file():
        if p.suffix.lower() in (".jsonl", ".ndjson"):
            rows = _read_jsonl(p)
            if cfg.loss_on == "completion":
                return list(
                    zip(
                        _field(rows, cfg.prompt_field, str(p), "prompt_field"),
                        _field(rows, cfg.completion_field, str(p), "completion_field"),
                    )
                )
            return _field(rows, cfg.text_field, str(p), "text_field")
        if cfg.loss_on == "completion":
            raise DataError(
                f"loss_on='completion' needs a JSONL file of prompt/completion "
                f"records, got {str(p)!r}"
            )
        try:
            return [p.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise DataError(f"{str(p)!r} is not UTF-8 text") from None
    # not a local path: a Hugging Face dataset
    if cfg.path.startswith(("/", ".", "~")) or cfg.path.endswith(
        TEXT_SUFFIXES + (".jsonl", ".json")
    ):
        raise DataError(f"data file {cfg.path!r} does not exist: check the path")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data path {cfg.path!r} is not a local file or folder; to read a Hugging Face "
            "dataset by name "
            "install the datasets package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(cfg.path, split=cfg.split)
    except Exception as e:
        raise DataError(
            f"cannot load dataset {cfg.path!r} (split {cfg.split!r}): {str(e).splitlines()[0]}"
        ) from e
    if cfg.loss_on == "completion":
        return list(
            zip(
                _field(ds, cfg.prompt_field, cfg.path, "prompt_field"),
                _field(ds, cfg.completion_field, cfg.path, "completion_field"),
            )
        )
    if cfg.text_field not in ds.column_names:
        raise DataError(
            f"dataset {cfg.path!r} has no column {cfg.text_field!r} "
            f"(columns: {ds.column_names}); choose one with text_field"
        )
    return _field(
        [{cfg.text_field: t} for t in ds[cfg.text_field]], cfg.text_field, cfg.path, "text_field"
    )


def _code_documents(pairs, loss_on: str):
    """``code_data`` pairs as documents: (prompt, completion) tuples or whole function texts
    (an iterator stays an iterator).
    """
    if loss_on == "completion":
        return ((p.prompt, p.completion) for p in pairs)
    return (p.text for p in pairs)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad_id(tokenizer) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if v is not None:
            return int(v)
    return 0


def _until(docs, done):
    """The items of ``docs`` until ``done()`` is true, checked before each: an iterator is not
    read one item too far (for ``builtin:python-code``: one file too far).
    """
    it = iter(docs)
    while not done():
        try:
            yield next(it)
        except StopIteration:
            return


def _pack(tokenizer, docs, seq_len: int, need: int | None = None):
    """Rows of ``seq_len`` token ids (the last maybe shorter, padded later) and their target
    masks, and the number of documents read: all, or once ``need`` full rows exist, no more.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    used = 0
    # once the first `need` rows are full, more text would not change them: read no further
    for d in _until(docs, lambda: need is not None and len(stream) >= need * seq_len):
        stream.extend(_encode(tokenizer, d))
        if eos is not None:
            stream.append(int(eos))
        used += 1
    if len(stream) < seq_len:
        raise DataError(
            f"the data has {len(stream)} tokens, fewer than one block of seq_len {seq_len}: "
            "use a smaller seq_len or more text"
        )
    rows = []
    for i in range(0, len(stream), seq_len):
        chunk = stream[i : i + seq_len]
        if len(chunk) < 2:
            break
        rows.append((chunk, [True] * len(chunk)))
    return rows, used


def _completion_rows(tokenizer, pairs, seq_len: int, need: int | None = None):
    """One row per pair with a completion target within ``seq_len`` (prompt masked), and the
    number of pairs read: all, or up to the one that gives the ``need``-th row.
    """
    rows = []
    used = 0
    eos = tokenizer.eos_token_id
    for prompt, completion in _until(pairs, lambda: need is not None and len(rows) >= need):
        used += 1
        p, c = _encode(tokenizer, prompt), _encode(tokenizer, completion)
        if eos is not None:
            c = c + [int(eos)]
        ids = (p + c)[:seq_len]
        mask = ([False] * len(p) + [True] * len(c))[:seq_len]
        if sum(mask[1:]) > 0:  # at least one completion token is a next-token target
            rows.append((ids, mask))
    if not rows:
        raise DataError(
            f"no prompt/completion record has a completion token within seq_len {seq_len}: "
            "use a larger seq_len or check completion_field"
        )
    return rows, used


def _to_batch(rows, seq_len: int, pad_id: int) -> dict:
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((B, seq_len), dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids)
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[r, :n] = t
        attention[r, :n] = 1
        labels[r, :n] = torch.where(torch.tensor(mask), t, torch.full_like(t, IGNORE))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def make_batches(
    tokenizer,
    cfg: DataConfig,
    *,
    docs=None,
    rank: int = 0,
    world_size: int = 1,
    info: dict | None = None,
) -> list[dict]:
    """Tokenise, pack and batch ``cfg``'s data; return this rank's batches.

    Batch ``i`` of the selected ones goes to rank ``i % world_size``
    (``partition.shard_batches``): nothing is dropped; a rank left with fewer batches gets
    ``ZeroWeight`` padding (evaluated, weight 0) so every rank runs the same number of passes
    (FSDP2 collectives must line up). ``docs`` (a list, or an iterable read only as far as
    ``num_batches`` needs) overrides ``load_documents(cfg)``. ``info``, a dict, receives what
    names the data read from a built-in code source: ``python`` (the version whose standard
    library it is) and ``pairs`` (the number of pairs, from the first, the batches were cut
    from; ``code_data.source_info``).
    """
    if tokenizer is None:
        raise DataError("this model has no tokenizer: a factory spec must return its own batches")
    if not (0 <= rank < world_size):
        raise DataError(f"rank {rank} is outside world size {world_size}")
    need = cfg.num_batches * cfg.batch_size if cfg.num_batches is not None else None
    code = docs is None and cfg.path == CODE_SOURCE
    if code:
        if not code_data.code_pairs(1):
            raise DataError(
                f"{CODE_SOURCE}: the standard library at {str(code_data.stdlib_root())!r} has no "
                "readable .py files with documented functions: use another data source"
            )
        # num_batches: parse the library only as far as those batches need
        pairs = code_data.iter_code_pairs() if need is not None else code_data.code_pairs()
        docs = _code_documents(pairs, cfg.loss_on)
    else:
        docs = load_documents(cfg) if docs is None else docs
        if isinstance(docs, (list, tuple)) and (  # an iterator is read lazily, never twice
            not docs or all(not (d if isinstance(d, str) else "".join(d)).strip() for d in docs)
        ):
            raise DataError(
                f"the data {cfg.path or '(embedded)'!r} is empty: no text to compute a loss on"
            )
    rows, used = (
        _completion_rows(tokenizer, docs, cfg.seq_len, need)
        if cfg.loss_on == "completion"
        else _pack(tokenizer, docs, cfg.seq_len, need)
    )
    if code and info is not None:
        info.update(code_data.source_info(used))
    groups = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    if cfg.num_batches is not None:
        if cfg.num_batches > len(groups):
            raise DataError(
                f"num_batches {cfg.num_batches} asks for more than the {len(groups)} batches of "
                f"{cfg.batch_size} x {cfg.seq_len} tokens the data holds: ask for fewer"
            )
        groups = groups[: cfg.num_batches]
    elif cfg.subsample is not None:
        k = max(1, math.ceil(cfg.subsample * len(groups)))
        idx = (
            sorted({round(i * (len(groups) - 1) / max(k - 1, 1)) for i in range(k)})
            if k > 1
            else [0]
        )
        groups = [groups[i] for i in idx]
    pad = _pad_id(tokenizer)
    batches = [_to_batch(g, cfg.seq_len, pad) for g in groups]
    return shard_batches(batches, rank, world_size) if world_size > 1 else batches


def count_target_tokens(batches) -> int:
    """The number of next-token targets in ``batches`` (``labels[:, 1:] != IGNORE``), the
    weights ``causal_lm_loss`` gives; ``ZeroWeight`` padding counts 0.

    >>> b = {"labels": torch.tensor([[5, 6, IGNORE, 7]])}
    >>> count_target_tokens([b, ZeroWeight(b)])
    2
    """
    return sum(
        int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches if not isinstance(b, ZeroWeight)
    )


def causal_lm_loss(model, batch):
    """``(mean next-token cross-entropy over target tokens, number of target tokens)``.

    Targets are ``labels[:, 1:]`` (positions with −100 are ignored); the loss is computed in
    float32 whatever the model's dtype. Shapes: logits (B, T, V), targets (B, T−1).
    """
    dev = next(model.parameters()).device
    ids = batch["input_ids"].to(dev)
    mask = batch["attention_mask"].to(dev)
    labels = batch["labels"].to(dev)
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    targets = labels[:, 1:]  # (B, T-1)
    count = (targets != IGNORE).sum()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss / count.clamp(min=1), count
