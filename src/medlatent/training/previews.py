"""PNG previews of validation reconstructions (input | reconstruction | |difference|, one row per image) and the
run's training and validation curves."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: files of a run folder: the training log, the validation log and the plot of both
LOG_FILE, VAL_FILE, CURVES_FILE = "log.csv", "val.jsonl", "curves.png"


def _panel(t: torch.Tensor) -> np.ndarray:
    """A 2D view in [0, 1]: the channel mean of an image, or the three centre slices of a volume side by side."""
    t = t.float()
    if t.ndim == 4:  # 1×X×Y×Z volume
        v = t[0]
        views = [v[v.shape[0] // 2], v[:, v.shape[1] // 2], v[:, :, v.shape[2] // 2]]
        h = max(x.shape[0] for x in views)
        views = [torch.nn.functional.pad(x, (0, 0, 0, h - x.shape[0])) for x in views]
        return torch.cat(views, dim=1).numpy()
    return t.mean(0).numpy()


def save_previews(pairs: list[tuple[torch.Tensor, torch.Tensor]], path: Path) -> Path | None:
    """Write one PNG for (original, reconstruction) pairs in [0, 1]; returns None when there is nothing to show."""
    if not pairs:
        return None
    from PIL import Image

    rows = []
    for a, b in pairs:
        pa, pb = _panel(a), _panel(b)
        rows.append(np.concatenate([pa, pb, np.clip(np.abs(pa - pb) * 4, 0, 1)], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]))) for r in rows]
    grid = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return path


def _columns(log_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value)]}`` of a run's ``log.csv`` (empty cells left out)."""
    import csv

    out: dict[str, list[tuple[int, float]]] = {}
    if not log_csv.exists():
        return out
    with log_csv.open(newline="") as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                if k != "step" and v not in (None, ""):
                    out.setdefault(k, []).append((int(row["step"]), float(v)))
    return out


def _val_rows(val_jsonl: Path) -> list[dict]:
    import json

    if not val_jsonl.exists():
        return []
    return [json.loads(line) for line in val_jsonl.read_text().splitlines() if line.strip()]


def save_curves(run_dir: Path) -> Path | None:
    """``curves.png``: the training loss terms of ``log.csv`` and the validation PSNR / MS-SSIM of ``val.jsonl``
    against the step. Skipped, with a logged warning, when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("curves.png skipped: matplotlib is not installed (pip install matplotlib); the values are "
                       "in log.csv and val.jsonl")
        return None
    run_dir = Path(run_dir)
    train = _columns(run_dir / LOG_FILE)
    val = _val_rows(run_dir / VAL_FILE)
    if not train and not val:
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_psnr = fig.subplots(1, 2)
    # per-pixel terms share a scale; `total` (a per-image sum) is drawn only when none of them is logged
    keys = [k for k in ("rec", "perceptual", "clip", "disc") if k in train] or [k for k in ("total",) if k in train]
    for key in keys:
        steps, values = zip(*train[key])
        ax_loss.plot(steps, values, label=key)
    ax_loss.set(xlabel="step", ylabel="training loss (log.csv, mean per logging interval)", title="training")
    if ax_loss.lines:
        ax_loss.legend()
    points = [(r["step"], r["val_psnr"]) for r in val if isinstance(r.get("val_psnr"), (int, float))]
    if points:
        steps, values = zip(*points)
        ax_psnr.plot(steps, values, "o-", color="tab:green")
    ax_psnr.set(xlabel="step", ylabel="validation PSNR (dB)", title="validation" if points else "no validation")
    for ax in (ax_loss, ax_psnr):
        ax.ticklabel_format(useOffset=False, axis="y")
    path = run_dir / CURVES_FILE
    fig.savefig(path, dpi=100)
    return path
