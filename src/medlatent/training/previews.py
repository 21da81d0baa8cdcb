"""PNG previews of validation reconstructions: input | reconstruction | |difference|, one row per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


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
