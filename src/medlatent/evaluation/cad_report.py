"""CAD tables and reports: Table-1-style rows (AUROC ×100, mean ± sd over seeds), Markdown with the protocol
notes and warnings, and the files :func:`write_cad_table` writes (``.md``, ``.csv``, ``.json``, ``report.md``)."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medlatent.evaluation.cad_config import LATENT_KINDS
from medlatent.evaluation.cad_results import CADResult, MethodResult, auroc_ci, cad_warnings

logger = logging.getLogger("medlatent.evaluation.cad")  # the public module's name: log lines read as before


def cad_table_rows(results: CADResult | Sequence[CADResult]) -> list[dict[str, str]]:
    """Table 1's rows: ``Method``, ``f``, ``C``, ``input ch`` (the classifier's input channels: ``1 (mean of
    C=4)`` for a channel-averaged latent), one column per task (AUROC ×100 as ``mean±sd``) and, for several
    tasks, ``Average`` (of the means)."""
    results = [results] if isinstance(results, CADResult) else list(results)
    keys: list[tuple[str, int, int, str]] = []
    cells: dict[tuple[str, int, int, str], dict[str, MethodResult]] = {}
    for res in results:
        for row in res.rows:
            k = (row.label, row.f, row.C, row.input_description)
            if k not in cells:
                keys.append(k)
                cells[k] = {}
            cells[k][res.task] = row
    tasks = [r.task for r in results]
    rows = []
    for k in keys:
        row = {"Method": k[0], "f": str(k[1]), "C": str(k[2]), "input ch": k[3]}
        for t in tasks:
            m = cells[k].get(t)
            row[t] = m.cell() if m else "–"
        if len(tasks) > 1:
            vals = [cells[k][t].mean for t in tasks if t in cells[k]]
            row["Average"] = f"{100 * float(np.mean(vals)):.1f}" if len(vals) == len(tasks) else "–"
        rows.append(row)
    return rows


def _protocol_note(res: CADResult) -> str:
    """Which epoch was tested and how the classifier started (App. B.1: the final epoch, a pretrained HRNet)."""
    cfg = res.config
    epochs = cfg.get("epochs")
    kept = sorted({r.epoch + 1 for row in res.rows for r in row.runs})
    if cfg.get("select") == "best" and all(r.val_auroc is None for row in res.rows for r in row.runs):
        rule = f"the last epoch ({epochs} of {epochs}: --select best, but the CSV has no val split with every class)"
    elif cfg.get("select") == "best":
        rule = (f"the epoch of the best validation AUROC (--select best; the paper tests the last): epochs "
                f"{', '.join(map(str, kept))} of {epochs}")
    else:
        rule = f"the last epoch ({epochs} of {epochs}, the paper's rule)"
    init = cfg.get("classifier_init", "")
    if res.classifier == "hrnet_w64" and init == "from scratch":
        init += " (the paper starts HRNet-w64 from ImageNet weights: --pretrained or --pretrained-weights PATH)"
    sampling = "class-balanced" if cfg.get("balanced") else "uniform"
    return f"- {res.task}: tested {rule}; classifier {res.classifier}, {init}; {sampling} sampling."


def _notes(results: Sequence[CADResult]) -> list[str]:
    seeds = ", ".join(str(s) for s in results[0].config["seeds"])
    notes = [f"AUROC ×100 (binary; macro one-vs-rest for multi-class), mean ± sd over seeds {seeds}; "
             f"classifier {results[0].classifier}."]
    notes += [_protocol_note(res) for res in results if "select" in res.config]
    for res in results:
        counts = "; ".join(f"{s}: " + ", ".join(f"{c}={n}" for c, n in cs.items()) for s, cs in res.counts.items())
        notes.append(f"- {res.task}: {res.metric}; classes {', '.join(res.class_names)}; rows per split {counts}.")
    seen = set()
    for res in results:
        for row in res.rows:
            if row.kind not in LATENT_KINDS or row.C < 2 or (row.label, row.latent_channels) in seen:
                continue
            seen.add((row.label, row.latent_channels))
            if row.latent_channels == "mean":
                notes.append(f"- {row.label}: the classifier saw 1 input channel, the mean of the {row.C} latent "
                             f"channels (the paper's App. B.1); `--latent-channels all` gives it all {row.C}.")
            else:
                notes.append(f"- {row.label}: the classifier saw all {row.C} latent channels as {row.input_channels} "
                             "input channels (`--latent-channels all`; the paper averages them).")
    return notes


def _warnings(results: Sequence[CADResult]) -> list[str]:
    return [w for res in results for w in cad_warnings(res)]


def cad_markdown(results: CADResult | Sequence[CADResult], title: str = "CAD tasks") -> str:
    """A Table-1-style Markdown table: Method | f | C | one column per task (AUROC ×100, mean±sd) | Average."""
    results = [results] if isinstance(results, CADResult) else list(results)
    rows = cad_table_rows(results)
    head = list(rows[0])
    notes = _notes(results)
    lines = [f"# {title}", "", notes[0], "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r[c] for c in head) + " |" for r in rows]
    warnings = _warnings(results)
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- **{w}**" for w in warnings]
    return "\n".join(lines + [""] + notes[1:]) + "\n"


def write_cad_table(results: CADResult | Sequence[CADResult], out_dir: str | Path, stem: str = "cad",
                    title: str = "CAD tasks") -> dict[str, Path]:
    """Write ``<stem>.md`` (Table-1 style), ``<stem>.csv`` (one line per task × method), ``<stem>.json`` and
    ``report.md`` (with an AUROC bar chart per task, ``<stem>_auroc_<i>.png``, when matplotlib is installed)."""
    from medlatent.io.atomic import atomic_write

    results = [results] if isinstance(results, CADResult) else list(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    with atomic_write(paths["markdown"]) as tmp:
        tmp.write_text(cad_markdown(results, title), encoding="utf-8")
    with atomic_write(paths["csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "method", "kind", "f", "C", "input_channels", "latent_channels", "input_shape",
                    "auroc_mean", "auroc_sd", "auroc_ci95_low", "auroc_ci95_high", "seeds", "auroc_per_seed"])
        for res in results:
            for row in res.rows:
                lo, hi = auroc_ci(row.mean, res.counts.get("test", {}))
                w.writerow([res.task, row.label, row.kind, row.f, row.C, row.input_channels, row.latent_channels,
                            "x".join(map(str, row.input_shape)), f"{row.mean:.6f}",
                            "" if row.sd is None else f"{row.sd:.6f}", f"{lo:.6f}", f"{hi:.6f}",
                            ";".join(str(r.seed) for r in row.runs), ";".join(f"{a:.6f}" for a in row.aurocs)])
    with atomic_write(paths["json"]) as tmp:
        tmp.write_text(json.dumps([r.to_dict() for r in results], indent=2), encoding="utf-8")
    paths["report"] = _report(results, out, stem, title)
    return paths


def _report(results: Sequence[CADResult], out: Path, stem: str, title: str) -> Path:
    """``report.md`` (the table, notes and one AUROC bar chart per task when matplotlib is installed)."""
    from medlatent.evaluation.report import bar_chart, write_report

    figures = []
    for i, res in enumerate(results):
        summary = {r.label: {"AUROC": (r.mean, r.sd)} for r in res.rows}
        try:
            png = bar_chart(summary, "AUROC", out / f"{stem}_auroc_{i}.png", title=res.task, ylabel=res.metric)
        except ImportError as e:  # matplotlib is optional: the tables are the result
            logger.info("no AUROC chart (%s)", e)
            break
        figures.append((f"{res.task}: test {res.metric}, mean ± sd over seeds", png))
    return write_report(out, title, [("Test AUROC ×100", cad_table_rows(results))], figures, _notes(results),
                        warnings=_warnings(results))
