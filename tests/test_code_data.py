"""The built-in code source: standard-library functions as prompt/completion pairs, their batches
(prompt labels -100), lazy parsing, determinism and the command line on a tiny model."""

from __future__ import annotations

import ast
import inspect
import json
import math
import platform
import shlex
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hessian_spectra import code_data
from hessian_spectra.cli import EXIT_OK, EXIT_USAGE, main
from hessian_spectra.code_data import (
    CODE_SOURCE,
    CodePair,
    code_pairs,
    function_pairs,
    stdlib_files,
    stdlib_root,
)
from hessian_spectra.data import (
    IGNORE,
    DataConfig,
    DataError,
    count_target_tokens,
    load_documents,
    make_batches,
)
from hessian_spectra.results import load_result

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

import factories


class CharTokenizer:
    """One token per character (ids = code points mod 97 + 1), EOS = 0."""

    eos_token_id = 0
    pad_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 + 1 for c in text]}


TOK = CharTokenizer()


NUM = 240  # the first pairs, through ast.py: about 25 files (a whole parse takes seconds)


@pytest.fixture(scope="module")
def pool() -> list[CodePair]:
    """The first NUM pairs of this interpreter's standard library (parsed once)."""
    return code_pairs(NUM)


@pytest.fixture
def fresh(monkeypatch):
    """No pairs cached: what a new process starts from."""
    monkeypatch.setattr(code_data, "_POOLS", {})


def _pair(pool, file, name):
    (p,) = [p for p in pool if p.file == file and p.name == name]
    return p


@pytest.mark.parametrize("fn", [ast.literal_eval, ast.parse], ids=lambda f: f.__name__)
def test_known_functions_are_their_live_source(pool, fn):
    """ast.literal_eval and ast.parse are pairs: prompt + completion is the function's source
    (inspect.getsource), the prompt is the def line and docstring (it parses, with a body, to a
    function of that name and docstring) and the completion is the code after the docstring."""
    p = _pair(pool, Path(inspect.getfile(fn)).name, fn.__name__)
    src = inspect.getsource(fn)
    assert p.text == src
    assert p.prompt.startswith(f"def {fn.__name__}(") and p.completion.strip()
    (f,) = ast.parse(p.prompt + "    pass\n").body
    assert f.name == fn.__name__ and ast.get_docstring(f, clean=False) == fn.__doc__
    body = ast.parse(src).body[0].body[1:]  # the statements after the docstring
    assert ast.dump(ast.parse(textwrap.dedent(p.completion))) == ast.dump(ast.Module(body, []))
    assert p.lineno == inspect.getsourcelines(fn)[1]


@pytest.mark.parametrize("fn", [textwrap.dedent, shlex.quote], ids=lambda f: f.__name__)
def test_later_modules_give_their_functions_too(fn):
    """textwrap.dedent and shlex.quote (files parsed late in the sorted order) are pairs of
    their modules' source: prompt + completion is inspect.getsource, split after the docstring."""
    path = Path(inspect.getfile(fn))
    (p,) = [q for q in function_pairs(path.read_text(), path.name) if q.name == fn.__name__]
    assert p.text == inspect.getsource(fn) and p.prompt.rstrip().endswith('"""')
    assert p.completion.strip() and '"""' not in p.completion.split("\n")[0]


def test_methods_are_dedented_and_the_selection_rules_hold(pool):
    """Methods lose their class indentation (textwrap.dedent of the live source); no pair comes
    from a skipped folder; every prompt is def + docstring, every completion 3-60 lines of code
    that follow it; the pairs are in sorted-file, source order."""
    import argparse

    m = argparse.ArgumentParser.error
    p = _pair(pool, "argparse.py", "ArgumentParser.error")
    assert p.text == textwrap.dedent(inspect.getsource(m)) and p.prompt.startswith("def error(")
    skipped = {"test", "tests", "idlelib", "lib2to3", "site-packages"}
    files = [q.file for q in pool]
    assert not any(skipped & set(f.split("/")[:-1]) for f in files)
    order = [tuple(f.split("/")) for f in files]
    assert order == sorted(order)
    assert all(
        a.lineno < b.lineno for a, b in zip(pool, pool[1:]) if a.file == b.file
    )  # source order within a file
    for q in pool:
        (f,) = ast.parse(q.prompt + "    pass\n").body if not q.prompt.startswith(" ") else [None]
        assert isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)), (q.file, q.name)
        assert ast.get_docstring(f, clean=False) is not None and len(f.body) == 2
        assert 3 <= q.completion.count("\n") <= 60
    assert len(pool) == NUM and len({q.file for q in pool}) > 10


def test_function_pairs_rules_on_a_made_up_module():
    """Decorators and signature join the prompt; a method is dedented (a string line outside
    the indentation kept verbatim); functions under `if` count, nested ones stay in their
    outer function; a docstring sharing its line with code, no docstring, or a body of fewer
    than 3 or more than 60 lines: no pair."""
    src = (
        "import functools\n"
        "class A:\n"
        "    @functools.cache\n"
        "    def m(self,\n"
        "          x):\n"
        '        """Doc of m."""\n'
        "        s = '''\n"
        "raw line\n"
        "'''\n"
        "        def inner():\n"
        '            """Nested."""\n'
        "            return 1\n"
        "        return s\n"
        "if True:\n"
        "    def g():\n"
        '        """Doc of g."""\n'
        "        a = 1\n"
        "        b = 2\n"
        "        return a + b\n"
        "def same_line():\n"
        '    """Doc."""; a = 1\n'
        "    b = 2\n"
        "    return a + b\n"
        "def no_doc():\n"
        "    a = 1\n    b = 2\n    return a + b\n"
        "def short():\n"
        '    """Doc."""\n'
        "    return 1\n"
        "def long():\n"
        '    """Doc."""\n' + "    a = 1\n" * 61 + "def ok_60():\n"
        '    """Doc."""\n' + "    a = 1\n" * 60
    )
    pairs = function_pairs(src, "mod.py")
    assert [(p.name, p.lineno) for p in pairs] == [("A.m", 3), ("g", 15), ("ok_60", 94)]
    m = pairs[0]
    assert m.prompt == '@functools.cache\ndef m(self,\n      x):\n    """Doc of m."""\n'
    assert m.completion.startswith("    s = '''\nraw line\n'''\n    def inner():\n")
    assert m.completion.endswith("    return s\n") and m.file == "mod.py"
    assert (
        pairs[1].text == 'def g():\n    """Doc of g."""\n    a = 1\n    b = 2\n    return a + b\n'
    )


def test_stdlib_files_skip_tests_and_unreadable_files(tmp_path, fresh):
    """On a made-up library folder: test suites, idlelib, lib2to3 and site-packages are not
    read, nor are files that do not decode or parse; the rest in sorted path order."""
    good = 'def f():\n    """Doc."""\n    a = 1\n    b = 2\n    return a\n'
    for rel in [
        "b.py",
        "a/z.py",
        "a_b.py",
        "test/t.py",
        "pkg/tests/t.py",
        "idlelib/i.py",
        "lib2to3/l.py",
        "site-packages/s.py",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(good)
    (tmp_path / "c_latin1.py").write_bytes(b"# \xe9\n" + good.encode())
    (tmp_path / "d_bad.py").write_text(good + "def (:\n")
    rel = [p.relative_to(tmp_path).as_posix() for p in stdlib_files(tmp_path)]
    assert rel == ["a/z.py", "a_b.py", "b.py", "c_latin1.py", "d_bad.py"]
    assert [p.file for p in code_pairs(root=tmp_path)] == ["a/z.py", "a_b.py", "b.py"]


def test_lazy_parsing_reads_only_the_files_needed(pool, fresh):
    """num_batches parses the library only as far as its batches need, and the pairs read
    lazily are the first ones of the whole pool (the same selection, the same order)."""
    first = code_pairs(30)
    parsed = code_data._pool(None).num_parsed
    assert first == pool[:30]
    assert parsed < len(stdlib_files()) / 10
    info = {}
    cfg = DataConfig(path=CODE_SOURCE, loss_on="completion", seq_len=256, batch_size=2)
    lazy = make_batches(TOK, DataConfig(**{**cfg.to_dict(), "num_batches": 3}), info=info)
    assert code_data._pool(None).num_parsed < len(stdlib_files()) / 10
    full = make_batches(TOK, cfg, docs=[(p.prompt, p.completion) for p in pool])
    assert len(full) > 3
    for a, b in zip(lazy, full[:3], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert info == {"python": platform.python_version(), "pairs": info["pairs"]}
    assert 6 <= info["pairs"] < 30


def test_completion_rows_mask_the_prompt(pool):
    """loss_on='completion': each pair is one row, its prompt tokens have label -100 and its
    completion tokens (and EOS) are the targets; a pair whose prompt fills seq_len is skipped;
    `pairs` counts the pairs read."""
    seq_len, n = 200, 12
    info = {}
    cfg = DataConfig(
        path=CODE_SOURCE, loss_on="completion", seq_len=seq_len, batch_size=3, num_batches=4
    )
    batches = make_batches(TOK, cfg, info=info)
    rows, used = [], 0
    for p in pool:
        if len(rows) == n:
            break
        used += 1
        ids_p, ids_c = TOK(p.prompt)["input_ids"], TOK(p.completion)["input_ids"] + [0]
        if len(ids_p) >= seq_len:
            continue
        ids = (ids_p + ids_c)[:seq_len]
        labels = ([IGNORE] * len(ids_p) + ids_c)[:seq_len]
        pad = seq_len - len(ids)
        rows.append((ids + [0] * pad, labels + [IGNORE] * pad, [1] * len(ids) + [0] * pad))
    assert info["pairs"] == used > n  # some prompts are longer than seq_len characters
    got = [
        (b["input_ids"][r].tolist(), b["labels"][r].tolist(), b["attention_mask"][r].tolist())
        for b in batches
        for r in range(3)
    ]
    assert got == rows


def test_loss_on_all_packs_whole_functions_and_two_loads_agree(pool, fresh):
    """loss_on='all': the whole function texts joined with EOS, cut into seq_len rows; two
    loads (and a load after the cache is dropped) give the same batches."""
    cfg = DataConfig(path=CODE_SOURCE, seq_len=64, batch_size=2, num_batches=5)
    info = {}
    b1 = make_batches(TOK, cfg, info=info)
    stream = []
    for p in pool[: info["pairs"]]:
        stream += TOK(p.text)["input_ids"] + [0]
    last = TOK(pool[info["pairs"] - 1].text)["input_ids"] + [0]
    assert len(stream) - len(last) < 10 * 64 <= len(stream)  # the last pair read was needed
    assert torch.cat([b["input_ids"] for b in b1]).flatten().tolist() == stream[: 10 * 64]
    b2 = make_batches(TOK, cfg)
    code_data._POOLS.clear()
    b3 = make_batches(TOK, cfg)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b1, b2, strict=True))
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(b1, b3, strict=True))


def _small_library(root: Path) -> Path:
    """A made-up standard library: copies of textwrap.py and shlex.py, and a test suite."""
    for mod, rel in ((textwrap, "textwrap.py"), (shlex, "shlex.py"), (shlex, "test/t.py")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(Path(mod.__file__).read_text())
    return root


def test_subsample_reads_the_whole_pool(tmp_path, monkeypatch, fresh):
    """subsample (on a small made-up library) spreads its batches over all pairs: the first and
    last rows are the first and last pairs, `pairs` counts them all; load_documents agrees."""
    monkeypatch.setattr(code_data, "stdlib_root", lambda: _small_library(tmp_path))
    everything = code_pairs()
    assert {p.file for p in everything} == {"shlex.py", "textwrap.py"}
    cfg = DataConfig(path=CODE_SOURCE, loss_on="completion", seq_len=4096, subsample=0.5)
    info = {}
    sub = make_batches(TOK, cfg, info=info)
    assert info["pairs"] == len(everything) and len(sub) == math.ceil(len(everything) / 2)
    for row, p in ((sub[0], everything[0]), (sub[-1], everything[-1])):
        ids = TOK(p.prompt + p.completion)["input_ids"] + [0]
        assert row["input_ids"][0, : len(ids)].tolist() == ids
    assert load_documents(cfg) == [(p.prompt, p.completion) for p in everything]
    assert load_documents(DataConfig(path=CODE_SOURCE)) == [p.text for p in everything]


def test_a_library_without_sources_is_a_clear_error(tmp_path, monkeypatch, fresh):
    """An interpreter whose standard library has no .py files: a DataError that says so."""
    monkeypatch.setattr(code_data, "stdlib_root", lambda: tmp_path)
    with pytest.raises(DataError, match="has no readable .py files.*another data source"):
        make_batches(TOK, DataConfig(path=CODE_SOURCE, num_batches=1))


def test_builtin_names_and_the_prose_completion_error():
    """builtin:prose is the embedded default by name; loss_on='completion' on the prose says
    to use builtin:python-code; an unknown builtin: name lists the two."""
    a = make_batches(TOK, DataConfig(seq_len=32, num_batches=2))
    b = make_batches(TOK, DataConfig(path="builtin:prose", seq_len=32, num_batches=2))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    for path in (None, "builtin:prose"):
        with pytest.raises(DataError, match="use the data source builtin:python-code"):
            make_batches(TOK, DataConfig(path=path, loss_on="completion"))
    with pytest.raises(DataError, match="unknown built-in.*builtin:prose or builtin:python-code"):
        DataConfig(path="builtin:code")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny Llama checkpoint folder with its tokenizer (max 256 positions)."""
    return factories.tiny_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-llama")


def test_cli_code_data_completion_loss(tiny_hf, tmp_path):
    """`--data builtin:python-code --loss-on completion` on a tiny model: result.json's data
    names the source, the Python version and the pairs read, and counts exactly the completion
    tokens of the batches the library builds with the model's tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path / "code"
    args = [
        "eigs", "--quiet", "--model", tiny_hf, "--data", CODE_SOURCE, "--loss-on", "completion",
        "--seq-len", 256, "--batch-size", 2, "--num-batches", 2, "-k", 1, "--steps", 3,
        "--out", out,
    ]  # fmt: skip
    assert main([str(a) for a in args]) == EXIT_OK
    r = load_result(out)
    assert r["status"] == "complete"
    d = r["data"]
    assert d["source"] == CODE_SOURCE and d["python"] == platform.python_version()
    cfg = DataConfig(
        path=CODE_SOURCE, loss_on="completion", seq_len=256, batch_size=2, num_batches=2
    )
    info = {}
    batches = make_batches(AutoTokenizer.from_pretrained(tiny_hf), cfg, info=info)
    assert d["pairs"] == info["pairs"] >= 4 and d["num_batches"] == 2
    assert d["target_tokens"] == count_target_tokens(batches)
    assert all((b["labels"][:, 0] == IGNORE).all() for b in batches)  # a prompt starts each row
    saved = json.loads((out / "result.json").read_text())
    assert saved["data"]["pairs"] == d["pairs"]


def test_cli_completion_on_prose_is_one_line_naming_the_fix(tiny_hf, tmp_path, capsys):
    """`--loss-on completion` without --data: exit 2, one line that names
    `--data builtin:python-code`'s source and the flag; no traceback."""
    args = ["eigs", "--quiet", "--model", tiny_hf, "--loss-on", "completion", "--out", tmp_path]
    assert main([str(a) for a in args]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "builtin:python-code" in err and "--loss-on completion" in err


def test_stdlib_root_is_this_interpreters():
    """The source reads the running interpreter's own library (where textwrap lives)."""
    assert Path(textwrap.__file__).parent == stdlib_root()
