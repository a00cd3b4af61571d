"""Text data: packing, padding, slicing, the completion-only loss and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from hessian_spectra.data import (
    DataConfig,
    DataError,
    causal_lm_loss,
    count_target_tokens,
    default_texts,
    load_documents,
    make_batches,
)
from hessian_spectra.partition import ZeroWeight

torch.set_num_threads(1)


class CharTokenizer:
    """One token per character (ids = code points mod 97 + 1), EOS = 0; enough for packing tests."""

    eos_token_id = 0
    pad_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 + 1 for c in text]}


TOK = CharTokenizer()


def test_default_texts_are_english_prose():
    """The embedded default is the stdlib's pydoc topics: many documents, hundreds of kB."""
    docs = default_texts()
    assert len(docs) > 50
    assert sum(map(len, docs)) > 300_000
    assert "statement" in " ".join(docs[:5])


def test_packing_shapes_and_padding():
    """Documents are joined with EOS and cut into seq_len rows; only the last is padded (-100)."""
    docs = ["abcdefghij", "klmno"]  # 10 + 1 + 5 + 1 = 17 tokens
    batches = make_batches(TOK, DataConfig(seq_len=8, batch_size=2), docs=docs)
    assert (
        len(batches) == 1
    )  # rows of 8, 8 and a 1-token tail (no target: dropped) -> one batch of 2 rows
    b0 = batches[0]
    assert set(b0) == {"input_ids", "attention_mask", "labels"}
    assert b0["input_ids"].shape == (2, 8)
    assert torch.equal(b0["labels"], b0["input_ids"])  # full rows: every token is a target
    assert b0["input_ids"][0, :3].tolist() == [TOK("abc")["input_ids"][i] for i in range(3)]
    assert b0["input_ids"][1, 2].item() == 0  # the EOS after the first document


def test_partial_last_block_is_padded_with_ignore_labels():
    """A partial final row has attention 0 and labels -100 on its padding."""
    batches = make_batches(
        TOK, DataConfig(seq_len=8, batch_size=1), docs=["abcdefghijklm"]
    )  # 14 tokens
    last = batches[-1]
    assert last["attention_mask"][0].tolist() == [1] * 6 + [0] * 2
    assert last["labels"][0, 6:].tolist() == [-100, -100]


def test_num_batches_and_subsample():
    """num_batches keeps the first batches; subsample keeps an evenly spaced fraction."""
    docs = ["x" * 1000]
    all_b = make_batches(TOK, DataConfig(seq_len=10, batch_size=2), docs=docs)
    first = make_batches(TOK, DataConfig(seq_len=10, batch_size=2, num_batches=3), docs=docs)
    assert len(first) == 3 and all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, all_b)
    )
    half = make_batches(TOK, DataConfig(seq_len=10, batch_size=2, subsample=0.5), docs=docs)
    assert len(half) == pytest.approx(len(all_b) / 2, abs=1)
    with pytest.raises(DataError, match="more than"):
        make_batches(TOK, DataConfig(seq_len=10, batch_size=2, num_batches=10_000), docs=docs)


@pytest.mark.parametrize("loss_on", ["all", "completion"])
def test_num_batches_reads_only_the_documents_it_needs(loss_on):
    """With num_batches, an iterator of documents is read only until those batches are full,
    and the batches equal the first ones built from the whole list."""
    docs = [f"doc {i:03d}." for i in range(200)]  # 8 characters, 9 tokens with EOS
    if loss_on == "completion":
        docs = [(d, f"answer {i}") for i, d in enumerate(docs)]
    read = []

    def lazily():
        for d in docs:
            read.append(d)
            yield d

    cfg = DataConfig(seq_len=16, batch_size=2, num_batches=3, loss_on=loss_on)
    part = make_batches(TOK, cfg, docs=lazily())
    whole = make_batches(TOK, DataConfig(**{**cfg.to_dict(), "num_batches": None}), docs=docs)
    assert len(whole) > 10 and len(part) == 3
    for a, b in zip(part, whole[:3]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # 3 x 2 rows: 6 pairs, or 96 tokens: 11 documents of 9 tokens (10 make 90)
    assert len(read) == (6 if loss_on == "completion" else 11)


def test_rank_slices_partition_the_batches_and_drop_nothing():
    """Issue 13 item 1: 7 batches over 2 ranks. Batch i goes to rank i % 2; together the ranks
    hold all 7 one-process batches (none dropped, as the cut to a multiple of the world size
    did), and rank 1 is padded with one ZeroWeight batch so both run 4 passes."""
    docs = ["".join(chr(65 + i % 26) for i in range(500))]
    cfg = DataConfig(seq_len=10, batch_size=1, num_batches=7)
    one = make_batches(TOK, cfg, docs=docs)
    r0 = make_batches(TOK, cfg, docs=docs, rank=0, world_size=2)
    r1 = make_batches(TOK, cfg, docs=docs, rank=1, world_size=2)
    assert len(one) == 7 and len(r0) == len(r1) == 4
    assert not any(isinstance(b, ZeroWeight) for b in r0)
    assert isinstance(r1[-1], ZeroWeight)
    real = r0 + [b for b in r1 if not isinstance(b, ZeroWeight)]
    assert sorted(b["input_ids"].tolist() for b in real) == sorted(
        b["input_ids"].tolist() for b in one
    )
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(r0, one[0::2]))
    assert count_target_tokens(r0) + count_target_tokens(r1) == count_target_tokens(one) == 7 * 9


def test_one_batch_over_two_ranks_runs():
    """Issue 13 item 1: the README's torchrun line on the embedded default (1 batch, 2 ranks)
    failed with "1 batch(es) cannot be split over 2 ranks"; now rank 0 holds the batch and
    rank 1 a ZeroWeight copy of it (evaluated, weight 0)."""
    cfg = DataConfig(seq_len=8, batch_size=1, num_batches=1)
    docs = ["abcdefghijklmnop"]
    r0 = make_batches(TOK, cfg, docs=docs, rank=0, world_size=2)
    r1 = make_batches(TOK, cfg, docs=docs, rank=1, world_size=2)
    assert len(r0) == len(r1) == 1 and isinstance(r1[0], ZeroWeight)
    assert torch.equal(r1[0].batch["input_ids"], r0[0]["input_ids"])
    assert count_target_tokens(r1) == 0 and count_target_tokens(r0) == 7


def test_completion_loss_masks_the_prompt(tmp_path):
    """With loss_on='completion' only completion tokens (and EOS) are targets."""
    f = tmp_path / "pc.jsonl"
    f.write_text(
        "\n".join(
            json.dumps({"prompt": p, "completion": c}) for p, c in [("abc", "de"), ("fghij", "k")]
        )
    )
    batches = make_batches(
        TOK, DataConfig(path=str(f), seq_len=12, batch_size=2, loss_on="completion")
    )
    lab = batches[0]["labels"]
    assert (lab[0] != -100).sum().item() == 3  # "d", "e", EOS
    assert lab[0, :3].tolist() == [-100] * 3
    assert (lab[1] != -100).sum().item() == 2  # "k", EOS


def test_jsonl_text_field_and_errors(tmp_path):
    """JSONL uses the text field; a missing field, bad JSON, empty files: one-line DataErrors."""
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "hello world " * 5}) + "\n")
    assert load_documents(DataConfig(path=str(f), text_field="body")) == ["hello world " * 5]
    with pytest.raises(DataError, match="record 1 has no field 'text'.*text_field"):
        load_documents(DataConfig(path=str(f)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        load_documents(DataConfig(path=str(bad)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        make_batches(TOK, DataConfig(path=str(empty)))


@pytest.mark.parametrize(
    "value, kind",
    [
        (5, "number"),
        (None, "null"),
        (["a", "b"], "array"),
        ({"x": "y"}, "object"),
        (True, "boolean"),
    ],
)
def test_jsonl_non_string_text_is_refused(tmp_path, value, kind):
    """Issue 13 item 5: a non-string JSONL text value was turned into a string (``str(5)``,
    ``"None"``) and trained on; it is refused naming the record number and the field."""
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "fine text"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(
        DataError, match=rf"record 2 field 'text' is a JSON {kind}.*expected a string"
    ):
        load_documents(DataConfig(path=str(f)))


def test_jsonl_non_string_completion_is_refused(tmp_path):
    """Issue 13 item 5: the same for prompt/completion records (loss_on='completion')."""
    f = tmp_path / "pc.jsonl"
    f.write_text(json.dumps({"prompt": "2+2=", "completion": 4}) + "\n")
    with pytest.raises(DataError, match=r"record 1 field 'completion' is a JSON number"):
        load_documents(DataConfig(path=str(f), loss_on="completion"))


def test_folder_of_text_files(tmp_path):
    """A folder is read as its .txt/.md files in sorted order; other files are ignored."""
    (tmp_path / "b.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01")
    assert load_documents(DataConfig(path=str(tmp_path))) == ["first", "second"]


def test_seq_len_larger_than_data_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one block of seq_len 1000"):
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
    """DataConfig refuses bad values in its own words (seq_len, not the CLI's --seq-len), as a
    ValueError."""
    with pytest.raises(DataError, match="seq_len must be at least 2"):
        DataConfig(seq_len=1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        DataConfig(batch_size=0)
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
    batch = make_batches(TOK, DataConfig(seq_len=8, batch_size=1), docs=["abcdefghijklm"])[
        -1
    ]  # padded row
    loss, count = causal_lm_loss(model, batch)
    logits = model(batch["input_ids"]).logits[0]
    tgt = batch["labels"][0, 1:]
    keep = tgt != -100
    ref = torch.nn.functional.cross_entropy(logits[:-1][keep], tgt[keep])
    assert int(count) == int(keep.sum()) == 5
    assert torch.allclose(loss.double(), ref)
