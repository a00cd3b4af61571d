"""The summary table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from .command import fmt

__all__ = ["human_bytes", "print_summary"]


def human_bytes(n) -> str:
    """``1536`` -> ``1.5 KiB``; ``n/a`` for None."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def print_summary(command, result, out: Path, problem: str | None = None) -> None:
    """The command's table (if any), then the common rows around the command's own."""
    table = command.tables(result)
    if table:
        print(table, flush=True)
    s_model, d, t, m = result.model, result.data, result.timings, result.memory
    rows = []
    if result.status != "complete":
        rows.append(("status", f"{result.status.upper().replace('_', ' ')}: {problem or ''}"))
    tokens = f", {d['target_tokens']:,} target tokens" if d.get("target_tokens") else ""
    rows += [
        ("result", str(out / "result.json")),
        (
            "model",
            (
                f"{s_model['spec']} ({s_model['num_params']:,} parameters, "
                f"{s_model['dtype']}, {s_model['device']})"
            ),
        ),
        ("data", f"{d.get('source')}, {d.get('num_batches')} batch(es){tokens}"),
        ("loss at θ", fmt(result.operator.get("loss"))),
    ]
    rows += command.summary_rows(result)
    s = result.summary or {}
    if s.get("fd_max_rel_error_estimate") is not None:
        rows.append(
            (
                "fd error",
                (
                    f"≤ {fmt(s['fd_max_rel_error_estimate'], '.2g')} relative "
                    f"(estimated, largest over the fd HVPs; "
                    f"{s.get('fd_retries', 0)} redone at a better step)"
                ),
            )
        )
    cuda = f" (CUDA {human_bytes(m['cuda_peak_bytes'])})" if m.get("cuda_peak_bytes") else ""
    th = result.threads
    rows += [
        ("HVPs", f"{t['num_hvps']} x {fmt(t['seconds_per_hvp'], '.2f')} s"),
        ("gradient", f"{fmt(t['seconds_per_gradient'], '.2f')} s"),
        ("threads", f"{th.get('num_threads')} ({th.get('rule')})"),
        ("peak memory", human_bytes(m.get("peak_rss_bytes")) + cuda),
        ("wall time", f"{t['total_seconds']:.1f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows), flush=True)
