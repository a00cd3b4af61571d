"""Real code offline: prompt/completion pairs from the Python standard library on disk.

The built-in data source ``builtin:python-code`` (``DataConfig(path="builtin:python-code")``,
``--data builtin:python-code``) is the setting of FSHP §6.2 (a code fine-tuning objective with
the loss on the solution tokens only) without a download: every function and method of the
running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``) that has a
docstring becomes one pair,

- prompt: its decorators, ``def`` line(s) and docstring;
- completion: the rest of its body (the code after the docstring),

both with the ``def`` line's indentation removed from every line (methods read like top-level
functions; a line that does not start with that indentation, inside a string literal, is kept
as it is). ``prompt + completion`` is the function's source text.

The selection is fixed and deterministic: the ``.py`` files in sorted path order, skipping test
suites (any folder named ``test`` or ``tests``), ``idlelib``, ``lib2to3``, ``site-packages`` and
files that fail to decode as UTF-8 or to parse; in each file the functions in source order
(module level, in classes and under ``if``/``try`` blocks; functions nested in functions stay
part of their outer function); a function qualifies when its docstring stands on lines of its
own and the code after it spans ``MIN_BODY_LINES`` to ``MAX_BODY_LINES`` lines.

The standard library differs between Python versions, so the pairs do too: a result records
the Python version and the number of pairs its batches were cut from (``source_info``), which
together name the data. Files are parsed lazily, in order, as pairs are asked for
(``code_pairs(n)``), and the pairs are kept in memory for the rest of the process. Measured
with ``benchmarks/code_data.py`` on Python 3.11.7: 3,549 pairs from 601 files; the first 64
pairs need 13 files, 0.2 s of CPU time; the whole library (``code_pairs()``, what ``subsample``
needs) about 3 s of CPU time, nearly all of it in ``ast.parse``.
"""

from __future__ import annotations

import ast
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CODE_SOURCE",
    "MAX_BODY_LINES",
    "MIN_BODY_LINES",
    "CodePair",
    "code_pairs",
    "function_pairs",
    "iter_code_pairs",
    "source_info",
    "stdlib_files",
    "stdlib_root",
]

CODE_SOURCE = "builtin:python-code"
MIN_BODY_LINES = 3
MAX_BODY_LINES = 60
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages"})


@dataclass(frozen=True)
class CodePair:
    """One function of the standard library as a prompt and its completion.

    Fields:
        prompt: decorators, ``def`` line(s) and docstring, each line ending in a newline.
        completion: the code after the docstring, each line ending in a newline.
        file: the module's path relative to the standard library folder (POSIX form).
        name: the function's qualified name in its module (``Class.method``).
        lineno: the line of its ``def`` in ``file``.
    """

    prompt: str
    completion: str
    file: str
    name: str
    lineno: int

    @property
    def text(self) -> str:
        """The whole function: ``prompt + completion``."""
        return self.prompt + self.completion


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | str | None = None) -> list[Path]:
    """The ``.py`` files of the selection under ``root`` (default: ``stdlib_root()``), sorted
    by their path relative to ``root``.
    """
    root = stdlib_root() if root is None else Path(root)
    rel = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and d != "__pycache__"]  # not entered
        base = Path(folder).relative_to(root)
        rel.extend(base / f for f in files if f.endswith(".py"))
    return [root / r for r in sorted(rel, key=lambda r: r.parts)]


def _functions(node, prefix: str = ""):
    """The function definitions under ``node`` in source order with their qualified names; a
    function's own body is not searched.
    """
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.stmt) or isinstance(child, ast.excepthandler):
            yield from _functions(child, prefix)
        elif isinstance(child, ast.match_case):
            yield from _functions(child, prefix)


def _block(lines: list[str], a: int, b: int, indent: str) -> str:
    """Lines ``a..b`` (1-based) less the leading ``indent``, each ending in a newline."""
    return "".join(
        (ln[len(indent) :] if ln.startswith(indent) else ln) + "\n" for ln in lines[a - 1 : b]
    )


def function_pairs(source: str, file: str = "<string>") -> list[CodePair]:
    r"""The qualifying functions of one module's source text, in source order (module docstring).

    Raises ``SyntaxError`` / ``ValueError`` when ``source`` does not parse.

    >>> src = "def f(x):\n    '''Twice x.'''\n    y = x\n    y += x\n    return y\n"
    >>> [(p.prompt, p.completion) for p in function_pairs(src)]
    [("def f(x):\n    '''Twice x.'''\n", '    y = x\n    y += x\n    return y\n')]
    """
    source = source.replace("\r\n", "\n").replace("\r", "\n")  # ast's line numbering
    tree = ast.parse(source)
    lines = source.split("\n")
    out = []
    for name, fn in _functions(tree):
        body = fn.body
        if len(body) < 2 or ast.get_docstring(fn, clean=False) is None:
            continue
        doc_end, code_start = body[0].end_lineno, body[1].lineno
        n_body = fn.end_lineno - doc_end
        if code_start <= doc_end or not (MIN_BODY_LINES <= n_body <= MAX_BODY_LINES):
            continue
        start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
        first = lines[start - 1]
        indent = first[: len(first) - len(first.lstrip())]
        prompt = _block(lines, start, doc_end, indent)
        completion = _block(lines, doc_end + 1, fn.end_lineno, indent)
        out.append(CodePair(prompt, completion, file, name, start))
    return out


def _file_pairs(path: Path, root: Path) -> list[CodePair]:
    try:
        return function_pairs(path.read_bytes().decode("utf-8"), path.relative_to(root).as_posix())
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return []


class _Pool:
    """The pairs of one standard library folder, parsed file by file as they are asked for."""

    def __init__(self, root: Path):
        self.root = root
        self.files = stdlib_files(root)
        self.pairs: list[CodePair] = []
        self.num_parsed = 0

    def fill(self, n: int | None) -> None:
        while (n is None or len(self.pairs) < n) and self.num_parsed < len(self.files):
            self.pairs.extend(_file_pairs(self.files[self.num_parsed], self.root))
            self.num_parsed += 1


_POOLS: dict[Path, _Pool] = {}


def _pool(root) -> _Pool:
    root = stdlib_root() if root is None else Path(root)
    if root not in _POOLS:
        _POOLS[root] = _Pool(root)
    return _POOLS[root]


def code_pairs(n: int | None = None, *, root: Path | str | None = None) -> list[CodePair]:
    """The first ``n`` pairs of the selection (None: all of them; fewer when there are fewer),
    parsing only as many files as that needs; parsed pairs stay cached for the process.
    """
    pool = _pool(root)
    pool.fill(n)
    return list(pool.pairs if n is None else pool.pairs[:n])


def iter_code_pairs(*, root: Path | str | None = None):
    """The pairs of the selection one by one, parsing the next file only when the cached ones
    run out: a consumer that stops early leaves the rest of the library unread.
    """
    pool = _pool(root)
    i = 0
    while True:
        pool.fill(i + 1)
        if i >= len(pool.pairs):
            return
        yield pool.pairs[i]
        i += 1


def source_info(num_pairs: int) -> dict:
    """The identity of data cut from the first ``num_pairs`` pairs: source name, Python version
    and that number (the standard library, hence the pairs, differs between versions).
    """
    return {"python": platform.python_version(), "pairs": int(num_pairs)}
