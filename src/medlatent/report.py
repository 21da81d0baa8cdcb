"""Per-file roundtrip evaluation: metrics on a common [0, 1] scale and a labelled comparison PNG."""

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


OVERVIEW_MAX = 512  # long side of an overview panel in compare.png, pixels
LABEL_RGB = (255, 210, 0)  # label colour: never a grey level, so labels are told apart from image pixels


def difference_gain(diff: np.ndarray) -> int:
    """The power of two ``k`` (1…1024) by which ``|difference|`` on the [0, 1] scale is shown, chosen so that
    its 99th percentile is still below white: small errors of a good model stay visible, large ones do not
    saturate the whole panel."""
    p99 = float(np.percentile(diff, 99)) if diff.size else 0.0
    if p99 <= 0:
        return 1024
    return int(min(1024, max(1, 2 ** np.floor(np.log2(1.0 / p99)))))


def _shrink(view: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-average an H×W view on [0, 1] to ``shape`` (rows, columns)."""
    from PIL import Image

    if view.shape == shape:
        return view
    return np.asarray(Image.fromarray(view.astype(np.float32), mode="F").resize(shape[::-1], Image.BOX))


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def comparison_png(original: np.ndarray, recon: np.ndarray, rec: Preprocessing, path: Path) -> Path:
    """Write an 8-bit RGB comparison: labelled columns original | reconstruction | ``|difference| ×k``.

    ``original`` and ``recon`` are C×H×W (2D) or C×X×Y×Z (3D, middle slice shown) in the file's units, mapped to
    [0, 1] by ``rec``'s intensity map. The first row fits each panel into ``OVERVIEW_MAX`` pixels; when that
    shrinks the image, a second row shows a centre crop of the same size at 1:1 pixels, where tiling seams and
    lost fine detail are visible. The difference's gain ``k`` (:func:`difference_gain`) is written in its label.
    Labels are ASCII: the font Pillow falls back to has no ``×`` or ``÷``.
    """
    from PIL import Image, ImageDraw

    from medlatent.io.atomic import atomic_write

    a = _view(to_unit(original, rec), rec.spatial_dims)
    b = _view(to_unit(recon, rec), rec.spatial_dims)
    d = np.abs(a - b)
    k = difference_gain(d)
    h, w = a.shape
    r = max(1.0, max(h, w) / OVERVIEW_MAX)
    ph, pw = max(1, round(h / r)), max(1, round(w / r))
    scale = f" (scaled 1:{r:.3g})" if r > 1 else ""
    rows = [([_shrink(v, (ph, pw)) for v in (a, b, d * k)],
             ["original" + scale, "reconstruction", f"|difference| x{k} (white = {100 / k:.3g}% of range)"])]
    if r > 1:
        y0, x0 = (h - ph) // 2, (w - pw) // 2
        crop = (slice(y0, y0 + ph), slice(x0, x0 + pw))
        rows.append(([a[crop], b[crop], d[crop] * k],
                     [f"original 1:1, rows {y0}-{y0 + ph - 1}, cols {x0}-{x0 + pw - 1}", "reconstruction 1:1",
                      f"|difference| x{k} 1:1"]))
    font, gap = _font(), 8
    text_w = [[int(np.ceil(font.getlength(t))) for t in labels] for _, labels in rows]
    col_w = [max(pw, *(tw[j] for tw in text_w)) for j in range(3)]
    band = int(np.ceil(font.getbbox("Ag|")[3])) + gap
    canvas = Image.new("RGB", (sum(col_w) + 2 * gap, len(rows) * (band + ph)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (panels, labels) in enumerate(rows):
        top, x = i * (band + ph), 0
        for j, (panel, label) in enumerate(zip(panels, labels)):
            draw.text((x, top + gap // 2), label, fill=LABEL_RGB, font=font)
            grey = Image.fromarray((np.clip(panel, 0, 1) * 255).round().astype(np.uint8), mode="L")
            canvas.paste(grey.convert("RGB"), (x, top + band))
            x += col_w[j] + gap
    with atomic_write(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
