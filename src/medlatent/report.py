"""Per-file roundtrip evaluation: metrics on a common [0, 1] scale and a comparison PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlatent.metrics import ms_ssim, psnr
from medlatent.preprocessing import Preprocessing


def to_unit(arr: np.ndarray, rec: Preprocessing) -> np.ndarray:
    """Original-unit array → [0, 1] through the file's own intensity map (clipped)."""
    imap = rec.intensity_map
    return np.clip((arr.astype(np.float32) - imap.lo) / (imap.hi - imap.lo), 0.0, 1.0)


def roundtrip_metrics(original: np.ndarray, recon: np.ndarray, rec: Preprocessing) -> dict[str, float]:
    a, b = to_unit(original, rec), to_unit(recon, rec)
    return {"psnr": psnr(a, b), "ms_ssim": ms_ssim(a, b)}


def _view(arr: np.ndarray, spatial_dims: int) -> np.ndarray:
    """A 2D view: the image itself (channel mean) or the middle slice along the last (slice) axis."""
    if spatial_dims == 2:
        return arr.mean(axis=0)
    return np.rot90(arr[:, :, arr.shape[2] // 2])


def comparison_png(original: np.ndarray, recon: np.ndarray, rec: Preprocessing, path: Path) -> Path:
    """Original | reconstruction | 4× absolute difference, side by side, 8-bit."""
    from medlatent.io.image import ImageData, spacing_affine
    from medlatent.io.writers import write_image

    a = _view(to_unit(original, rec), rec.spatial_dims)
    b = _view(to_unit(recon, rec), rec.spatial_dims)
    d = np.clip(np.abs(a - b) * 4.0, 0, 1)
    gap = np.ones((a.shape[0], 4), dtype=np.float32)
    strip = np.concatenate([a, gap, b, gap, d], axis=1)
    img = ImageData((strip * 255).round().astype(np.uint8)[None], spacing_affine((1.0, 1.0)))
    return write_image(img, path, "png")
