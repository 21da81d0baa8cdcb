"""What a reconstruction evaluation writes: the summary (per method: mean ± sd across seeds and over images,
values stored; models; protocol; warnings) and the files ``results.csv``, ``roi_results.csv``, ``samples.json``,
``summary.json`` and ``report.md`` with its charts."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medlatent.evaluation.digests import weights_sha256
from medlatent.evaluation.recon_image import CONVENTION, METRICS
from medlatent.evaluation.recon_methods import ReconOptions, format_f, model_labels, model_name
from medlatent.evaluation.recon_stats import Sampling, over_images, summarise
from medlatent.evaluation.report import _is_missing, bar_chart, format_stat, write_report


def json_clean(v: Any) -> Any:
    """JSON without NaN/Infinity (null for NaN, strings for ±inf), which strict parsers reject."""
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(v, Mapping):
        return {str(k): json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_clean(x) for x in v]
    if isinstance(v, (np.integer, np.floating)):
        return json_clean(v.item())
    return v


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                            "x".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in r.items()})



# thresholds below which a reconstruction summary is flagged (README: "Results that cannot mean anything")
MIN_IMAGES = 20


def recon_warnings(summary: Mapping[str, Any]) -> list[str]:
    """Why the numbers of ``summary`` may not mean much: too few images, one seed, failed inputs."""
    out = []
    p = summary["protocol"]
    n = p.get("evaluated", p["pool"])
    if n < MIN_IMAGES:
        out.append(f"only {n} image(s) evaluated (fewer than {MIN_IMAGES}): the means describe these images, not "
                   "your data; evaluate at least 20, more to tell close methods apart")
    if len(p["seeds"]) == 1:
        out.append("one seed: there is no spread across seeds, so every sd reads n/a (1 seed); use --seeds 3 or more")
    if summary["failures"]:
        out.append(f"{len(summary['failures'])} input(s) failed and are left out of every mean")
    return out


def _stored_summary(pairs: Sequence[tuple[int, int]]) -> dict[str, Any] | None:
    if not pairs:
        return None
    values, pixels = sum(v for v, _ in pairs), sum(px for _, px in pairs)
    return {"per_image_mean": values / len(pairs), "per_pixel": values / pixels if pixels else float("nan")}


def build_summary(models, methods, values, stored, sampling: Sampling, items, opts: ReconOptions, failures,
                  unmatched_rois) -> dict[str, Any]:
    """``summary.json``: per method its metrics across seeds and over images, the models, the protocol, failures,
    ROI files that matched no evaluated image, and :func:`recon_warnings`."""
    per_method: dict[str, Any] = {}
    for name, spec in methods.items():
        entry: dict[str, Any] = {"f": spec.f, "C": spec.C, "note": spec.note, "weights_sha256": spec.weights_sha256,
                                 "values_stored": _stored_summary(stored[name])}
        for k in METRICS:
            vals = values[name][k]
            if k == "roi_psnr" and not any(not math.isnan(v) for v in vals.values()):
                continue
            entry[k] = summarise(vals, sampling)
            entry[k]["over_images"] = over_images(list(vals.values()))
        per_method[name] = entry
    described = [{"name": label, "model": model_name(m), "weights_sha256": weights_sha256(m),
                  "file": m.weights_info.get("file", ""), "f": m.f, "C": m.C, "spatial_dims": m.spatial_dims,
                  "downsample_per_axis": m.downsample_per_axis, "latent_dtype": opts.latent_dtype or "float32",
                  "precision": opts.precision}
                 for label, m in zip(model_labels(models), models)]
    evaluated = len({i for v in values.values() for i in v["psnr"]})
    summary = {
        "title": opts.title or f"Reconstruction quality of {', '.join(m['name'] for m in described)}",
        "model": described[0],
        "models": described,
        "convention": CONVENTION,
        "protocol": {"pool": len(items), "evaluated": evaluated, "samples_per_seed": sampling.samples,
                     "seeds": sampling.seeds, "replace": sampling.replace,
                     "statistic": "per seed: mean over its drawn images; reported: mean ± sd (ddof=1) across seeds"},
        "methods": per_method,
        "failures": [{"item": i, "reason": r} for i, r in failures],
        "unmatched_rois": [str(p) for p in unmatched_rois],
    }
    summary["warnings"] = recon_warnings(summary)
    return summary


def format_seed_stat(stat: Mapping[str, Any], seeds: int, digits: int) -> str:
    """``mean ± sd`` across seeds; ``mean ± n/a (1 seed)`` when there is no spread to report."""
    if seeds == 1 and not _is_missing(stat.get("mean")):
        return f"{format_stat(stat['mean'], None, digits)} ± n/a (1 seed)"
    return format_stat(stat.get("mean"), stat.get("sd"), digits)


def format_values_stored(entry: Mapping[str, Any] | None) -> str:
    """``1/16``: values a method keeps per pixel (voxel) of the image; ``–`` when unknown."""
    if not entry or _is_missing(entry.get("per_pixel")) or not entry["per_pixel"]:
        return "–"
    return f"1/{1 / entry['per_pixel']:.3g}"


def write_outputs(out: Path, rows, roi_rows, summary, sampling: Sampling, items, figures,
                  opts: ReconOptions) -> dict[str, Path]:
    """Write the tables, ``samples.json``, ``summary.json``, the charts and ``report.md`` to ``out``."""
    files: dict[str, Path] = {}
    files["results"] = out / "results.csv"
    _write_csv(files["results"], rows) if rows else files["results"].write_text("image,method,psnr,ms_ssim\n")
    if roi_rows:
        files["roi_results"] = out / "roi_results.csv"
        _write_csv(files["roi_results"], roi_rows)
    files["samples"] = out / "samples.json"
    files["samples"].write_text(json.dumps({"replace": sampling.replace, "seeds": {
        str(k): [items[int(i)].name for i in d] for k, d in zip(sampling.seeds, sampling.draws)}}, indent=1) + "\n")
    files["summary"] = out / "summary.json"
    files["summary"].write_text(json.dumps(json_clean(summary), indent=2) + "\n")

    charts = []
    has_values = any(math.isfinite(m.get("psnr", {}).get("mean", float("nan"))) for m in summary["methods"].values())
    if has_values:
        for metric, label in (("psnr", "PSNR (dB)"), ("ms_ssim", "MS-SSIM"), ("roi_psnr", "ROI PSNR (dB)")):
            if any(metric in m for m in summary["methods"].values()):
                p = bar_chart(summary["methods"], metric, out / "figures" / f"{metric}.png",
                              title=f"{label}, mean ± sd across seeds", ylabel=label)
                charts.append((f"{label} per method (error bars: sd across seeds)", p))

    k = len(summary["protocol"]["seeds"])
    table = []
    for name, m in summary["methods"].items():
        row = {"method": name, "weights SHA-256": m["weights_sha256"][:12] or "–", "f": format_f(m["f"]),
               "C": m["C"] if m["C"] is not None else "–", "values stored": format_values_stored(m["values_stored"]),
               "PSNR (dB)": format_seed_stat(m["psnr"], k, 2), "MS-SSIM": format_seed_stat(m["ms_ssim"], k, 3)}
        if "roi_psnr" in m:
            row["ROI PSNR (dB)"] = format_seed_stat(m["roi_psnr"], k, 2)
        table.append(row)
    models = [{"model": m["name"], "weights SHA-256 (12 hex)": m["weights_sha256"][:12],
               "weights file": m["file"] or "–", "dims": f"{m['spatial_dims']}D", "f": m["f"],
               "÷ per axis": m["downsample_per_axis"], "C": m["C"]} for m in summary["models"]]
    over = [{"method": name, "images": m["psnr"]["over_images"]["n"],
             "PSNR (dB)": format_stat(m["psnr"]["over_images"]["mean"], m["psnr"]["over_images"]["sd"], 2),
             "MS-SSIM": format_stat(m["ms_ssim"]["over_images"]["mean"], m["ms_ssim"]["over_images"]["sd"], 3)}
            for name, m in summary["methods"].items()]
    per_image = [{"image": r["image"], "method": r["method"], "PSNR": r["psnr"], "MS-SSIM": r["ms_ssim"],
                  **({"ROI PSNR": r["roi_psnr"]} if "roi_psnr" in summary["methods"].get(r["method"], {}) else {})}
                 for r in rows[:200]]
    p = summary["protocol"]
    notes = [
        "Models: " + "; ".join(
            f"`{m['name']}` (SHA-256 {m['weights_sha256'][:12]}): {m['spatial_dims']}D, f = {m['f']} "
            f"(÷{m['downsample_per_axis']} per axis), C = {m['C']}" for m in summary["models"])
        + f"; z decoded after rounding to {summary['model']['latent_dtype']}.",
        "Values stored: numbers a method keeps per image, as a fraction of the image's pixels (voxels); a model "
        "keeps C/f, an interpolation 1/f. Rows with equal values stored compare codecs at equal storage "
        "(for a model with C > 1, its f / C interpolation row).",
        f"Metrics: {CONVENTION}",
        f"Protocol: {len(p['seeds'])} seed(s), {p['samples_per_seed']} image(s) per seed drawn "
        f"{'with replacement (bootstrap)' if p['replace'] else 'without replacement'} from {p['pool']} input(s); "
        "each seed's mean over its images, then mean ± sd (ddof=1) across seeds (paper Tables 5–6).",
    ]
    if summary["failures"]:
        notes.append(f"**{len(summary['failures'])} input(s) failed** and are left out: " + "; ".join(
            f"`{f['item']}`: {f['reason']}" for f in summary["failures"][:20]))
    tables = [("Summary (mean ± sd across seeds)", table), ("Models", models),
              ("All evaluated images (mean ± sd across images)", over),
              ("Per image" + (" (first 200 rows; all in results.csv)" if len(rows) > 200 else ""), per_image)]
    files["report"] = write_report(out, summary["title"], tables, figures + charts, notes,
                                   warnings=summary["warnings"])
    files.update({f"figure_{i + 1}": path for i, (_, path) in enumerate(figures + charts)})
    return files
