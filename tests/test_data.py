"""Text data: packing, padding, slicing, the completion-only loss and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from hessian_spectra.data import (
    DataConfig,
    DataError,
    causal_lm_loss,
    default_texts,
    load_documents,
    make_batches,
)

torch.set_num_threads(1)


class CharTokenizer:
    """One token per character (ids = code points mod 97 + 1), EOS = 0; enough for packing tests."""

    eos_token_id = 0
    pad_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 + 1 for c in text]}


TOK = CharTokenizer()


def test_default_texts_are_english_prose():
    """The embedded default is the stdlib's pydoc topics: many documents, hundreds of kB of English."""
    docs = default_texts()
    assert len(docs) > 50
    assert sum(map(len, docs)) > 300_000
    assert "statement" in " ".join(docs[:5])


def test_packing_shapes_and_padding():
    """Documents are joined with EOS and cut into seq_len rows; only the last row is padded (-100)."""
    docs = ["abcdefghij", "klmno"]  # 10 + 1 + 5 + 1 = 17 tokens
    batches = make_batches(TOK, DataConfig(seq_len=8, batch_size=2), docs=docs)
    assert len(batches) == 1  # rows of 8, 8 and a 1-token tail (no target: dropped) -> one batch of 2 rows
    b0 = batches[0]
    assert set(b0) == {"input_ids", "attention_mask", "labels"}
    assert b0["input_ids"].shape == (2, 8)
    assert torch.equal(b0["labels"], b0["input_ids"])  # full rows: every token is a target
    assert b0["input_ids"][0, :3].tolist() == [TOK("abc")["input_ids"][i] for i in range(3)]
    assert b0["input_ids"][1, 2].item() == 0  # the EOS after the first document


def test_partial_last_block_is_padded_with_ignore_labels():
    """A partial final row has attention 0 and labels -100 on its padding."""
    batches = make_batches(TOK, DataConfig(seq_len=8, batch_size=1), docs=["abcdefghijklm"])  # 14 tokens
    last = batches[-1]
    assert last["attention_mask"][0].tolist() == [1] * 6 + [0] * 2
    assert last["labels"][0, 6:].tolist() == [-100, -100]


def test_num_batches_and_subsample():
    """num_batches keeps the first batches; subsample keeps an evenly spaced fraction."""
    docs = ["x" * 1000]
    all_b = make_batches(TOK, DataConfig(seq_len=10, batch_size=2), docs=docs)
    first = make_batches(TOK, DataConfig(seq_len=10, batch_size=2, num_batches=3), docs=docs)
    assert len(first) == 3 and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, all_b))
    half = make_batches(TOK, DataConfig(seq_len=10, batch_size=2, subsample=0.5), docs=docs)
    assert len(half) == pytest.approx(len(all_b) / 2, abs=1)
    with pytest.raises(DataError, match="more than"):
        make_batches(TOK, DataConfig(seq_len=10, batch_size=2, num_batches=10_000), docs=docs)


def test_rank_slices_partition_the_batches():
    """Each rank gets its own slice; together they are the one-process batches (cut to a multiple)."""
    docs = ["y" * 500]
    cfg = DataConfig(seq_len=10, batch_size=1, num_batches=7)
    one = make_batches(TOK, cfg, docs=docs)
    r0 = make_batches(TOK, cfg, docs=docs, rank=0, world_size=2)
    r1 = make_batches(TOK, cfg, docs=docs, rank=1, world_size=2)
    assert len(r0) == len(r1) == 3
    merged = [b for pair in zip(r0, r1) for b in pair]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(merged, one[:6]))


def test_completion_loss_masks_the_prompt(tmp_path):
    """With loss_on='completion' only completion tokens (and EOS) are targets."""
    f = tmp_path / "pc.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in [("abc", "de"), ("fghij", "k")]))
    batches = make_batches(TOK, DataConfig(path=str(f), seq_len=12, batch_size=2, loss_on="completion"))
    lab = batches[0]["labels"]
    assert (lab[0] != -100).sum().item() == 3  # "d", "e", EOS
    assert lab[0, :3].tolist() == [-100] * 3
    assert (lab[1] != -100).sum().item() == 2  # "k", EOS


def test_jsonl_text_field_and_errors(tmp_path):
    """JSONL uses --text-field; a missing field, bad JSON and empty files are one-line DataErrors."""
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "hello world " * 5}) + "\n")
    assert load_documents(DataConfig(path=str(f), text_field="body")) == ["hello world " * 5]
    with pytest.raises(DataError, match="no field 'text'.*--text-field"):
        load_documents(DataConfig(path=str(f)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        load_documents(DataConfig(path=str(bad)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        make_batches(TOK, DataConfig(path=str(empty)))


def test_folder_of_text_files(tmp_path):
    """A folder is read as its .txt/.md files in sorted order; other files are ignored."""
    (tmp_path / "b.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01")
    assert load_documents(DataConfig(path=str(tmp_path))) == ["first", "second"]


def test_seq_len_larger_than_data_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one block of --seq-len 1000"):
        make_batches(TOK, DataConfig(seq_len=1000), docs=["short text"])


def test_missing_file_and_missing_datasets_package(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(DataConfig(path=str(tmp_path / "nope.txt")))
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            load_documents(DataConfig(path="some_org/some_dataset"))


def test_config_validation():
    with pytest.raises(DataError, match="seq-len"):
        DataConfig(seq_len=1)
    with pytest.raises(DataError, match="not both"):
        DataConfig(num_batches=2, subsample=0.5)
    with pytest.raises(DataError, match="fraction"):
        DataConfig(subsample=1.5)


class TinyLM(torch.nn.Module):
    """Logits from an embedding table: (B, T) ids -> (B, T, V)."""

    def __init__(self, V=100):
        super().__init__()
        self.emb = torch.nn.Embedding(V, V, dtype=torch.float64)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.emb(input_ids)})()


def test_loss_is_mean_over_targets_with_token_count_weight():
    """causal_lm_loss = mean next-token CE over labels != -100, weight = their number."""
    torch.manual_seed(0)
    model = TinyLM()
    batch = make_batches(TOK, DataConfig(seq_len=8, batch_size=1), docs=["abcdefghijklm"])[-1]  # padded row
    loss, count = causal_lm_loss(model, batch)
    logits = model(batch["input_ids"]).logits[0]
    tgt = batch["labels"][0, 1:]
    keep = tgt != -100
    ref = torch.nn.functional.cross_entropy(logits[:-1][keep], tgt[keep])
    assert int(count) == int(keep.sum()) == 5
    assert torch.allclose(loss.double(), ref)
