"""The built-in code source ``builtin:python-code``: its size, parse times and token lengths.

Prints (and with ``--json`` writes) the Python version, the number of standard-library files
read and of prompt/completion pairs, the CPU and wall seconds to parse the first ``--first``
pairs lazily and then the whole library (one fresh process: nothing cached), and, with the
embedded SmolLM2 tokenizer (``--no-tokenizer`` to skip), the median prompt and completion
lengths and how many pairs keep a completion target at several ``seq_len``.

    python benchmarks/code_data.py --json benchmarks/results/code_data.json

The CPU seconds are the figure to compare; wall seconds depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from hessian_spectra import code_data


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def main(argv=None) -> dict:
    """Measure and print; return the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=64, help="pairs read lazily first")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--no-tokenizer", action="store_true", help="skip the token statistics")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    pool = code_data._pool(None)
    first, cpu_first, wall_first = _timed(lambda: code_data.code_pairs(args.first))
    files_first = pool.num_parsed
    pairs, cpu_rest, wall_rest = _timed(code_data.code_pairs)
    res = {
        "python": platform.python_version(),
        "stdlib": str(code_data.stdlib_root()),
        "files": len(pool.files),
        "pairs": len(pairs),
        "first": {
            "pairs": len(first),
            "files": files_first,
            "cpu_s": cpu_first,
            "wall_s": wall_first,
        },
        "whole": {"cpu_s": cpu_first + cpu_rest, "wall_s": wall_first + wall_rest},
    }
    print(f"Python {res['python']}: {res['pairs']} pairs from {res['files']} files")
    print(
        f"first {len(first)} pairs: {files_first} files parsed, {cpu_first:.2f} s CPU "
        f"({wall_first:.2f} s wall)"
    )
    print(f"whole library: {res['whole']['cpu_s']:.2f} s CPU ({res['whole']['wall_s']:.2f} s wall)")
    if not args.no_tokenizer:
        from transformers import AutoTokenizer

        from hessian_spectra import models

        folder = models._ensure_gguf_cache(models.embedded_gguf_path())  # tokenizer files only
        tok = AutoTokenizer.from_pretrained(str(folder))

        def n(text):
            return len(tok(text, add_special_tokens=False)["input_ids"])

        lp = [n(p.prompt) for p in pairs]
        lc = [n(p.completion) for p in pairs]
        fits = {L: sum(x < L for x in lp) for L in args.seq_lens}
        res["tokens"] = {
            "tokenizer": "SmolLM2-135M-Instruct (embedded)",
            "prompt_median": statistics.median(lp),
            "completion_median": statistics.median(lc),
            "total": sum(lp) + sum(lc),
            "pairs_with_a_target_at_seq_len": fits,
        }
        print(
            f"SmolLM2 tokens: prompt median {res['tokens']['prompt_median']}, completion "
            f"median {res['tokens']['completion_median']}, {res['tokens']['total']:,} in all"
        )
        for L, k in fits.items():
            print(f"seq_len {L:5d}: {k} of {len(pairs)} pairs have a completion target")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return res


if __name__ == "__main__":
    main()
