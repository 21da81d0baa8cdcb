"""Markdown reports and figures for the evaluation commands (reconstruction, storage, CAD, efficiency).

A report is a folder holding ``report.md`` plus the figures it links to. Every function here takes plain data
(lists of dicts, ``{name: {metric: value}}`` maps, numpy arrays), so any evaluation can use it:

``write_report(out_dir, title, tables, figures=(), notes=(), warnings=())`` → ``out_dir/report.md``
    ``tables``: ``[(caption, rows)]`` where ``rows`` is a list of dicts (one table row each; columns are the
    keys of the first row, then any new keys in order of appearance; floats printed with 4 significant digits
    unless already strings). ``figures``: ``[(caption, path)]``, linked relative to ``out_dir``. ``notes``:
    a string or a list of strings (paragraphs / bullet lines), printed under the title.

``bar_chart(summary, metric, path, title=None, ylabel=None)`` → PNG
    ``summary``: ``{method: {metric: value}}`` where value is a number, a ``(mean, sd)`` pair, or a dict with
    ``"mean"`` and optional ``"sd"`` (what ``summary.json`` files hold); the sd draws error bars.

``residual_figure(original, recons, path, title=None)`` → PNG (paper Figure 4)
    ``original``: ``H×W`` in [0, 1]; ``recons``: ``{method: H×W}``. One row per method: original |
    reconstruction | absolute residual (brighter = larger difference, one colour scale for all rows).

``format_stat(mean, sd=None, digits=2)`` → ``"31.69 ± 0.07"``; ``markdown_table(rows)`` → Markdown text.

matplotlib is imported lazily and figures are drawn off-screen (no pyplot, no display, no global backend).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _figure(**kw):
    """A matplotlib ``Figure`` drawn off-screen (no pyplot, so no global backend or display is touched)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency of the evaluation extra
        raise ImportError("evaluation figures need matplotlib: pip install matplotlib") from e
    return Figure(**kw)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def format_stat(mean: float | None, sd: float | None = None, digits: int = 2) -> str:
    """``mean ± sd`` with ``digits`` decimals; ``–`` for a missing mean, no ``±`` part without an sd."""
    if _is_missing(mean):
        return "–"
    if math.isinf(mean):
        return "inf" if mean > 0 else "-inf"
    text = f"{mean:.{digits}f}"
    if not _is_missing(sd):
        text += f" ± {sd:.{digits}f}"
    return text


def _cell(v: Any) -> str:
    if _is_missing(v):
        return "–"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "×".join(str(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table; ``columns`` default to the keys of the rows in order of appearance."""
    if not rows:
        return "_(no rows)_\n"
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, title: str, tables: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
                 figures: Sequence[tuple[str, str | Path]] = (), notes: str | Sequence[str] = (),
                 warnings: Sequence[str] = ()) -> Path:
    """Write ``out_dir/report.md``: title, notes, a "Warnings" section, captioned tables, then figure links.

    Args:
        out_dir: report folder (created); figure links are made relative to it.
        title: the ``#`` heading.
        tables: ``[(caption, rows)]``; each rows list becomes one Markdown table under a ``##`` caption.
        figures: ``[(caption, path)]`` of image files (written beforehand, e.g. by :func:`bar_chart`).
        notes: text under the title (a string, or paragraphs as a list).
        warnings: why some numbers cannot mean much (tiny test split, one seed, a reference at chance); one
            bullet each under "## Warnings", before the tables, so a reader meets them first.

    Returns:
        The path of ``report.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n"]
    for note in [notes] if isinstance(notes, str) else list(notes):
        if note:
            parts.append(note.rstrip() + "\n")
    if warnings:
        parts.append("## Warnings\n")
        parts.append("\n".join(f"- **{w}**" for w in warnings) + "\n")
    for caption, rows in tables:
        parts.append(f"## {caption}\n")
        parts.append(markdown_table(list(rows)))
    if figures:
        parts.append("## Figures\n")
        for caption, path in figures:
            rel = os.path.relpath(Path(path).resolve(), out.resolve())
            parts.append(f"**{caption}**\n\n![{caption}]({Path(rel).as_posix()})\n")
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def _mean_sd(value: Any) -> tuple[float, float | None]:
    if isinstance(value, Mapping):
        return (float("nan") if value.get("mean") is None else float(value["mean"]),
                None if value.get("sd") is None else float(value["sd"]))
    if isinstance(value, (tuple, list)):
        return float(value[0]), (None if len(value) < 2 or value[1] is None else float(value[1]))
    return float(value), None


def bar_chart(summary: Mapping[str, Mapping[str, Any]], metric: str, path: str | Path, *,
              title: str | None = None, ylabel: str | None = None) -> Path:
    """Bar per method of ``summary[method][metric]`` with ``± sd`` error bars; methods lacking it are left out."""
    names, means, sds = [], [], []
    for name, metrics in summary.items():
        if metric not in metrics:
            continue
        m, s = _mean_sd(metrics[metric])
        if not math.isfinite(m):
            continue
        names.append(name)
        means.append(m)
        sds.append(0.0 if s is None or not math.isfinite(s) else s)
    fig = _figure(figsize=(max(3.0, 0.9 * len(names) + 1.5), 3.2), dpi=120, layout="constrained")
    ax = fig.subplots()
    xs = np.arange(len(names))
    ax.bar(xs, means, yerr=sds, capsize=4, color="#4C72B0")
    ax.set_xticks(xs, names, rotation=30, ha="right")
    if means:  # start the axis near the data so small differences show (PSNR ~ 30 dB, MS-SSIM ~ 0.99)
        lo = min(m - s for m, s in zip(means, sds))
        hi = max(m + s for m, s in zip(means, sds))
        pad = 0.15 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
        ax.set_ylim(lo - pad if lo - pad > 0 or lo < 0 else 0, hi + pad)
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title or metric)
    ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def residual_figure(original: np.ndarray, recons: Mapping[str, np.ndarray], path: str | Path, *,
                    title: str | None = None) -> Path:
    """Paper Figure 4: per method, original | reconstruction | absolute residual (shared colour scale).

    Args:
        original: ``H×W`` in [0, 1].
        recons: ``{method: H×W}`` in [0, 1].
        path: PNG to write.
    """
    rows = max(1, len(recons))
    residuals = {k: np.abs(np.asarray(v, dtype=np.float32) - original) for k, v in recons.items()}
    vmax = max([float(np.percentile(r, 99.5)) for r in residuals.values()] + [1e-6])
    aspect = original.shape[1] / max(1, original.shape[0])
    fig = _figure(figsize=(3 * 2.4 * max(0.6, aspect) + 0.8, 2.4 * rows + 0.4), dpi=120, layout="constrained")
    axes = fig.subplots(rows, 3, squeeze=False)
    im = None
    for i, (name, y) in enumerate(recons.items()):
        panels = [(original, "original", "gray", 0, 1), (y, name, "gray", 0, 1),
                  (residuals[name], f"|{name} − original|", "inferno", 0, vmax)]
        for j, (arr, label, cmap, lo, hi) in enumerate(panels):
            ax = axes[i][j]
            shown = ax.imshow(arr, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.axis("off")
            if j == 2:
                im = shown
    if im is not None:
        fig.colorbar(im, ax=[axes[i][2] for i in range(rows)], fraction=0.05, pad=0.02, label="|residual|")
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
