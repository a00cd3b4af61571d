"""Figures drawn from saved results only (``result.json`` dicts), with matplotlib's Agg backend.

- ``plot_density``: the SLQ spectral density in two panels, linear and logarithmic density
  against λ (as in the FSHP / HessFormer figures), one curve per run when overlaying.
- ``plot_ritz``: quadrature weights against Ritz values (nodes), a stem plot per probe on a
  log weight axis (as FSHP Fig. 8).
- ``plot_eigs``: the extreme Ritz values of an ``eigs`` run with their residual bounds.
- ``plot_blockdiag``: per layer, abs_error, rel_error and cosine of a ``blockdiag`` run (mean ±
  std over probes; extra blocks apart), titled with FSHP Table 6's summary.
- ``plot_eps_sweep``: FD relative error against the step eps, log-log, of an ``eps-sweep`` run.
- ``plot_sweep``: the cells of a ``sweep`` as a grid of density overlays (FSHP Figs 3–6).
- ``plot_influence``: the distribution of an ``influence`` run's scores and its most helpful
  and most harmful examples.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ._io import atomic_write_bytes

__all__ = [
    "FIGURE_FILES",
    "label_for",
    "plot_blockdiag",
    "plot_density",
    "plot_eigs",
    "plot_eps_sweep",
    "plot_influence",
    "plot_result",
    "plot_ritz",
    "plot_sweep",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _density(result: dict):
    from .density import SpectralDensity

    if not result.get("density"):
        raise ValueError("this result has no spectral density (only `density` runs do)")
    return SpectralDensity.from_dict(result["density"])


def label_for(result: dict) -> str:
    """A short legend label: model, method, eps, basis dtype, probes x steps."""
    c = result.get("config", {})
    model = str(result.get("model", {}).get("spec", "?"))
    model = model.rsplit("/", 1)[-1] or model
    parts = [model, c.get("method", "?")]
    if c.get("eps") is not None:
        parts.append(f"eps={c['eps']:g}")
    if c.get("basis_dtype"):
        parts.append(f"basis {c['basis_dtype']}")
    d = result.get("density") or {}
    runs = d.get("runs") or []
    if runs:
        parts.append(f"{len(runs)}x{len(runs[0]['alpha'])}")
    return ", ".join(parts)


def plot_density(results, path, *, labels=None, sigma=None, num: int = 2001, title=None):
    """Two-panel density figure (linear, log) for one result or an overlay of several.

    All curves share one grid covering every run's nodes; ``sigma`` (the Gaussian width) is
    each run's default (1% of its spectral range) unless given.
    """
    plt = _plt()
    results = [results] if isinstance(results, dict) else list(results)
    dens = [_density(r) for r in results]
    labels = labels or [label_for(r) for r in results]
    sig = [d.default_sigma() if sigma is None else sigma for d in dens]
    lo = min(d.lambda_min - 5 * s for d, s in zip(dens, sig))
    hi = max(d.lambda_max + 5 * s for d, s in zip(dens, sig))
    grid = np.linspace(lo, hi, num)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for d, s, lab in zip(dens, sig, labels):
        y = d.density(grid, sigma=s)
        a1.plot(grid, y, lw=1.4, label=lab)
        a2.semilogy(grid, np.maximum(y, 1e-300), lw=1.4, label=lab)
    peaks = [float(d.density(grid, sigma=s).max()) for d, s in zip(dens, sig)]
    a2.set_ylim(
        max(peaks) * 1e-16, max(peaks) * 3
    )  # 16 decades: weights below 1e-16 are rounding-level
    for a, name in ((a1, "density"), (a2, "density (log scale)")):
        a.set_xlabel("eigenvalue λ")
        a.set_ylabel(name)
        a.axvline(0.0, color="0.6", lw=0.8, ls=":")
        a.grid(alpha=0.3)
    a1.legend(fontsize=8, loc="upper right")
    if title is None and len(results) == 1:
        d0, nm = dens[0], dens[0].summary()
        title = (
            f"Hessian spectral density (SLQ): λ_max={d0.lambda_max:.4g}, "
            f"λ_min={d0.lambda_min:.4g}, trace={d0.trace():.4g}, "
            f"mass below −{nm['negative_mass_threshold']:.2g}: {nm['negative_mass']:.2g}"
        )
    ttl = title or "Hessian spectral densities (SLQ)"
    fig.suptitle(ttl, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_ritz(results, path, *, labels=None, title=None):
    """Stem plot of quadrature weights against Ritz values, every probe of every run."""
    plt = _plt()
    results = [results] if isinstance(results, dict) else list(results)
    labels = labels or [label_for(r) for r in results]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    allw = np.concatenate([_density(r).weights.reshape(-1) for r in results])
    pos = allw[allw > 0]
    bottom = max(float(pos.min()) / 3 if pos.size else 1e-12, 1e-16)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (r, lab) in enumerate(zip(results, labels)):
        d = _density(r)
        c = colors[i % len(colors)]
        for s in range(d.num_probes):
            x, w = d.nodes[s], np.maximum(d.weights[s], bottom)
            ml, sl, _ = ax.stem(x, w, bottom=bottom, basefmt=" ")
            plt.setp(sl, color=c, alpha=0.5, lw=0.8)
            plt.setp(ml, color=c, markersize=3.5, label=lab if s == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("Ritz value θ (node)")
    ax.set_ylabel(
        f"quadrature weight w (< {bottom:.0e} drawn at {bottom:.0e})"
        if bottom <= 1e-16
        else "quadrature weight w"
    )
    ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    n = sum(_density(r).num_probes for r in results)
    ax.set_title(title or f"SLQ nodes and weights ({n} probe(s))", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_eigs(result: dict, path, *, title=None):
    """Extreme Ritz values of an ``eigs`` run with their residual bounds as error bars."""
    plt = _plt()
    e = result.get("eigs")
    if not e:
        raise ValueError("this result has no eigenvalues (only `eigs` runs do)")
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, res, lab, c in (
        ("largest", "residuals", "largest", "C0"),
        ("smallest", "residuals_smallest", "smallest", "C3"),
    ):
        v = np.asarray(e[key], dtype=float)
        r = np.asarray(e[res], dtype=float)
        ax.errorbar(
            np.arange(1, v.size + 1),
            v,
            yerr=r,
            fmt="o",
            color=c,
            capsize=3,
            label=f"{lab} (± residual bound)",
        )
    ax.axhline(0.0, color="0.6", lw=0.8, ls=":")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index k")
    ax.set_ylabel("eigenvalue estimate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"Extreme Hessian eigenvalues ({label_for(result)})", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_blockdiag(result: dict, path, *, title=None):
    """Per layer, the block test's abs_error, rel_error and cosine (three panels, one above the
    other; mean ± std over probes as error bars) of a ``blockdiag`` run, in layer order; the
    extra blocks (embeddings, final norm, head) as hollow markers in a labelled group on the
    right. The title is FSHP Table 6's summary: mean ± std over layers and probes, and the
    number of layer blocks.
    """
    plt = _plt()
    b = result.get("blockdiag")
    if not b:
        raise ValueError("this result has no block-diagonal test (only `blockdiag` runs do)")

    def rows_per_block(rows: list[dict]) -> list[dict]:
        # mean ± std over probes per block, for a result saved before `per_block` (all layers)
        out = []
        for i, name in enumerate(dict.fromkeys(r["block"] for r in rows)):
            mine = [r for r in rows if r["block"] == name]
            d = {"block": name, "kind": "layer", "layer": i}
            for k in ("abs_error", "rel_error", "cosine"):
                x = np.array([np.nan if r[k] is None else r[k] for r in mine], dtype=float)
                x = x[np.isfinite(x)]
                m, sd = (float(x.mean()), float(x.std())) if x.size else (None, None)
                d[k] = {"mean": m, "std": sd}
            out.append(d)
        return out

    rows = b.get("per_block") or rows_per_block(b["blocks"])  # older runs: rows only
    layers = [r for r in rows if r.get("kind", "layer") == "layer"]
    extras = [r for r in rows if r.get("kind", "layer") == "extra"]
    xl = np.arange(len(layers), dtype=float)
    xe = len(layers) + 1 + np.arange(len(extras), dtype=float)

    def mean_std(rs, key):
        m = np.array([np.nan if r[key]["mean"] is None else r[key]["mean"] for r in rs], float)
        s = np.array([np.nan if r[key]["std"] is None else r[key]["std"] for r in rs], float)
        return m, np.nan_to_num(s)

    panels = [
        ("abs_error", "abs_error ||(H_block v − Hv)_b||", "C2"),
        ("rel_error", "rel_error: that / ||(Hv)_b||", "C3"),
        ("cosine", "cosine((Hv)_b, (H v_b)_b)", "C0"),
    ]
    fig, axes = plt.subplots(3, 1, figsize=(max(7, 0.25 * (len(rows) + 1) + 2), 8), sharex=True)
    for a, (key, label, color) in zip(axes, panels):
        m, s = mean_std(layers, key)
        a.errorbar(xl, m, yerr=s, fmt="o-", color=color, ms=4, capsize=2, label="layers")
        if extras:
            m, s = mean_std(extras, key)
            a.errorbar(
                xe, m, yerr=s, fmt="o", mfc="none", color=color, ms=5, capsize=2, label="extra"
            )
            a.axvline(len(layers), color="0.7", lw=0.8, ls=":")
        a.set_ylabel(label, fontsize=8)
        a.grid(alpha=0.3)
        ticks = list(xl) + list(xe)
        names = [str(r.get("layer", i)) for i, r in enumerate(layers)]
        a.set_xticks(ticks)
        a.set_xticklabels(names + [r["block"] for r in extras], rotation=90, fontsize=7)
        for t in a.get_xticklabels()[: len(layers)]:
            t.set_rotation(0)
    axes[2].set_xlabel("layer" + (" | extra blocks (not in the statistics)" if extras else ""))
    axes[2].axhline(1.0, color="0.5", lw=0.8, ls="--")
    axes[2].legend(fontsize=7)
    s = b.get("summary") or {}

    def pm(key):
        x = s.get(key) or {}
        if x.get("mean") is None:
            return "n/a"
        return f"{x['mean']:.3g} ± {x['std']:.2g}" if x.get("std") is not None else "n/a"

    n = s.get("num_probes") or b.get("config", {}).get("num_probes", 1)
    fig.suptitle(
        title
        or (
            f"Block-diagonal test, {len(layers)} layer blocks × {n} probe(s): "
            f"||H_block v − Hv|| {pm('abs_error')}, rel. error {pm('rel_error')}, "
            f"cosine {pm('cosine')}\n{label_for(result)}"
        ),
        fontsize=9,
    )
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_eps_sweep(result: dict, path, *, title=None):
    """Relative FD error against eps (log-log) of an ``eps-sweep`` run; the default step dashed,
    the fit of FSHP Thm 3.1 (``a eps² + b/eps``) and its best eps dotted.
    """
    plt = _plt()
    e = result.get("eps_sweep")
    if not e:
        raise ValueError("this result has no eps sweep (only `eps-sweep` runs do)")
    eps = np.array([r["eps"] for r in e["rows"]], dtype=float)
    err = np.array(
        [np.nan if r["rel_error"] is None else r["rel_error"] for r in e["rows"]], dtype=float
    )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.loglog(
        eps,
        np.where(err > 0, err, np.nan),
        "o-",
        color="C0",
        label=f"reference: {e.get('reference')}",
    )
    if e.get("default_eps"):
        ax.axvline(
            e["default_eps"], color="C3", ls="--", lw=1, label=f"default eps {e['default_eps']:.2g}"
        )
    fit = e.get("fit")
    if fit and fit.get("a", 0) > 0 and fit.get("b", 0) > 0:  # FSHP Thm 3.1: a eps² + b/eps
        x = np.logspace(np.log10(eps.min()), np.log10(eps.max()), 200)
        ax.loglog(
            x,
            fit["a"] * x**2 + fit["b"] / x,
            ":",
            color="C2",
            label=f"Thm 3.1 fit {fit['a']:.2g} eps² + {fit['b']:.2g}/eps",
        )
        ax.axvline(
            fit["eps_best_predicted"],
            color="C2",
            ls=":",
            lw=1,
            label=f"fit's best eps {fit['eps_best_predicted']:.2g}",
        )
    ax.set_xlabel("fd step eps")
    ax.set_ylabel("relative error ||H_eps v − ref|| / ||ref||")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or f"Finite-difference HVP error vs eps ({label_for(result)})", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def _density_figures(result: dict, out: Path) -> list[Path]:
    return [plot_density(result, out / "density.png"), plot_ritz(result, out / "ritz.png")]


# The standard figures of a run, by the result.json key that holds its estimate: a command whose
# estimate has no entry here draws none. FIGURE_FILES: every file name these can write.
_FIGURES = {
    "density": _density_figures,
    "eigs": lambda r, out: [plot_eigs(r, out / "eigs.png")],
    "blockdiag": lambda r, out: [plot_blockdiag(r, out / "blockdiag.png")],
    "eps_sweep": lambda r, out: [plot_eps_sweep(r, out / "eps_sweep.png")],
    "influence": lambda r, out: [plot_influence(r, out / "influence.png")],
}
FIGURE_FILES = (
    "density.png",
    "ritz.png",
    "eigs.png",
    "blockdiag.png",
    "eps_sweep.png",
    "influence.png",
)


def plot_result(result: dict, out_dir) -> list[Path]:
    """The standard figures of one run (``result.json`` dict), written into ``out_dir``; an
    empty list for a run that has none (``trace``).

    >>> import tempfile
    >>> plot_result({"command": "trace", "trace": {"estimate": 1.0}}, tempfile.mkdtemp())
    []
    """
    out = Path(out_dir)
    for key, draw in _FIGURES.items():
        if result.get(key):
            return draw(result, out)
    return []


def _save(fig, path) -> None:
    """``fig`` as PNG to ``path``, atomically and with the user's umask (``_io``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    atomic_write_bytes(path, buf.getvalue())


def plot_sweep(sweep: dict, results: dict, path, *, num: int = 1001):
    """The cells of a sweep (``sweep.json`` dict, and each cell's ``result.json`` dict by cell
    name, None where missing) as a grid of panels: one panel per combination of all but the
    last varied option, the last one's values overlaid in each panel (log density; one shared
    λ axis). A cell without a density (``eigs``, ...) is drawn as dashed lines at its λ_min and
    λ_max.

    >>> import tempfile, pathlib
    >>> sw = {"command": "trace", "vary": {"probes": ["2"]}, "cells": [
    ...     {"cell": "000_probes=2", "options": {"probes": "2"}, "lambda_max": None,
    ...      "lambda_min": None}]}
    >>> p = plot_sweep(sw, {"000_probes=2": None}, pathlib.Path(tempfile.mkdtemp()) / "s.png")
    >>> p.name
    's.png'
    """
    import itertools
    import math

    plt = _plt()
    names = list(sweep.get("vary") or {})
    vals = [list(sweep["vary"][n]) for n in names]
    over, panel_names = (names[-1], names[:-1]) if names else (None, [])
    panels = list(itertools.product(*vals[:-1])) if names else [()]
    rows = {tuple(c["options"].get(n) for n in names): c for c in sweep.get("cells", [])}
    dens = {}
    for c in sweep.get("cells", []):
        r = results.get(c["cell"])
        if r and (r.get("density") or {}).get("runs"):
            dens[c["cell"]] = _density(r)
    lo = min(
        [d.lambda_min - 5 * d.default_sigma() for d in dens.values()]
        + [c["lambda_min"] for c in rows.values() if c.get("lambda_min") is not None]
        + [0.0]
    )
    hi = max(
        [d.lambda_max + 5 * d.default_sigma() for d in dens.values()]
        + [c["lambda_max"] for c in rows.values() if c.get("lambda_max") is not None]
        + [lo + 1.0]
    )
    grid = np.linspace(lo, hi, num)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, combo in zip(axes.flat, panels):
        for k, v in enumerate(vals[-1] if names else [None]):
            c = rows.get((*combo, v)) if names else None
            if c is None:
                continue
            lab = f"{over}={v}"
            col = colors[k % len(colors)]
            if c["cell"] in dens:
                y = dens[c["cell"]].density(grid)
                ax.semilogy(grid, np.maximum(y, 1e-300), lw=1.3, color=col, label=lab)
            elif c.get("lambda_max") is not None:
                for x in (c["lambda_min"], c["lambda_max"]):
                    ax.axvline(
                        x, color=col, ls="--", lw=1.2, label=lab if x == c["lambda_min"] else None
                    )
        peak = [float(d.density(grid).max()) for d in dens.values()]
        if peak:
            ax.set_ylim(max(peak) * 1e-12, max(peak) * 3)
        ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
        ax.set_title(
            ", ".join(f"{n}={x}" for n, x in zip(panel_names, combo))
            or f"{sweep.get('command', '')}: {over}",
            fontsize=9,
        )
        ax.set_xlabel("eigenvalue λ")
        if dens:
            ax.set_ylabel("density (log scale)")
        else:
            ax.set_yticks([])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"sweep of {sweep.get('command', '?')}: "
        + " x ".join(f"{n} ({len(v)})" for n, v in zip(names, vals)),
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_influence(result: dict, path, *, k: int | None = None, title=None):
    """An ``influence`` run's scores: their distribution (histogram, 0 marked) on top, and bar
    charts of the ``k`` most helpful (most negative) and most harmful (most positive) examples
    below, each labelled with its batch, row and text snippet where the result has them.
    ``k`` defaults to the run's ``top_k`` (else 10).

    >>> import tempfile, pathlib
    >>> r = {"influence": {"scores": [-0.3, 0.1, -0.05], "batch_index": [0, 0, 1],
    ...                    "row_index": [0, 1, 0], "status": "complete"}}
    >>> plot_influence(r, pathlib.Path(tempfile.mkdtemp()) / "i.png").name
    'i.png'
    """
    plt = _plt()
    e = result.get("influence")
    if not e or not e.get("scores"):
        raise ValueError("this result has no influence scores (only `influence` runs do)")
    scores = np.asarray(e["scores"], dtype=float)
    k = int(k or result.get("config", {}).get("top_k") or 10)
    batch = e.get("batch_index") or list(range(scores.size))
    rows = e.get("row_index")
    snippets = e.get("snippets")

    def label(i):
        where = f"batch {batch[i]}" + (f", row {rows[i]}" if rows is not None else "")
        text = snippets[i] if snippets and snippets[i] else None
        return f"{where}: " + text[:40].replace("$", r"\$") if text else where  # no mathtext

    order = np.argsort(scores, kind="stable")
    helpful = [int(i) for i in order if scores[i] < 0][:k]
    harmful = [int(i) for i in order[::-1] if scores[i] > 0][:k]
    fig = plt.figure(figsize=(12, 4 + 0.28 * max(len(helpful), len(harmful), 4)))
    gs = fig.add_gridspec(2, 2, height_ratios=[1, 1.3])
    ah = fig.add_subplot(gs[0, :])
    ah.hist(scores, bins=min(50, max(10, scores.size // 3)), color="0.45")
    ah.axvline(0.0, color="0.2", lw=0.8, ls=":")
    ah.set_xlabel("influence score (negative = helpful, positive = harmful)")
    ah.set_ylabel("examples" if rows is not None else "batches")
    from matplotlib.ticker import MaxNLocator

    ah.yaxis.set_major_locator(MaxNLocator(integer=True))
    ah.grid(alpha=0.3)
    for ax, idx, color, name, sign in (
        (fig.add_subplot(gs[1, 0]), helpful, "C2", "most helpful", -1),
        (fig.add_subplot(gs[1, 1]), harmful, "C3", "most harmful", 1),
    ):
        word = "negative" if sign < 0 else "positive"
        y = np.arange(len(idx))
        ax.barh(y, scores[idx], color=color)
        ax.set_yticks(y)
        ax.set_yticklabels([label(i) for i in idx], fontsize=7)
        ax.set_ylim(max(len(helpful), len(harmful), 1) - 0.5, -0.5)  # same bar height, top down
        ax.set_xlabel("score")
        n = int((np.sign(scores) == sign).sum())
        ax.set_title(f"{name}: {len(idx)} of {n} {word} score(s)", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        if not idx:
            ax.text(0.5, 0.5, f"no {word} score", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            ax.set_xticks([])
    unit = "examples" if rows is not None else "batches"
    status = "" if e.get("status", "complete") == "complete" else " — CG NOT CONVERGED: approximate"
    damping = f", damping {e['damping']:.3g}" if e.get("damping") is not None else ""
    fig.suptitle(
        title or f"Influence on the query loss: {scores.size} {unit}{damping}{status}",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)
