"""compare.png: labelled columns (original / reconstruction / |difference| ×k) and a 1:1 centre crop for images
larger than an overview panel."""

import numpy as np
from PIL import Image

from medlatent.preprocessing import Preprocessing
from medlatent.report import OVERVIEW_MAX, comparison_png, difference_gain


def _rec(shape: tuple[int, ...], dims: int = 2) -> Preprocessing:
    return Preprocessing(dims, list(shape), np.eye(4).tolist(), "uint16", "xray",
                         {"kind": "minmax", "lo": 0.0, "hi": 1000.0, "clip": False})


def _pair(h: int, w: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = (500 + 400 * np.sin(xx / 7.0) * np.cos(yy / 11.0))[None].astype(np.float32)
    return img, img + rng.normal(0, noise, img.shape).astype(np.float32)


def _label_mask(png: np.ndarray) -> np.ndarray:
    """Pixels in the label colour's hue: yellow, which no grey image pixel can be."""
    r, g, b = (png[..., i].astype(int) for i in range(3))
    return (r > 100) & (r - b > 60) & (abs(r - g) < 80)


def _grey_blocks(png: np.ndarray, width: int) -> list[tuple[int, int]]:
    """(first, last) rows of each run of rows whose first ``width`` pixels are all grey and not black: the
    rows of the first panel (the test images never reach 0; label bands are black with coloured text)."""
    left = png[:, :width].astype(int)
    grey = ((left[..., 0] == left[..., 1]) & (left[..., 1] == left[..., 2]) & (left[..., 0] > 0)).all(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], grey.astype(int), [0]])))
    return [(int(s), int(e) - 1) for s, e in zip(edges[::2], edges[1::2])]


def test_difference_gain_keeps_the_99th_percentile_below_white():
    d = np.full(1000, 0.01)
    assert difference_gain(d) == 64  # 0.01 × 64 = 0.64 ≤ 1 < 0.01 × 128
    assert difference_gain(np.full(10, 0.7)) == 1
    assert difference_gain(np.zeros(10)) == 1024


def test_small_image_one_labelled_row_at_native_size(tmp_path):
    a, b = _pair(64, 80, noise=5.0)
    out = comparison_png(a, b, _rec(a.shape), tmp_path / "c.png")
    png = np.asarray(Image.open(out).convert("RGB"))
    labels = _label_mask(png)
    (top, bottom), = _grey_blocks(png, 80)  # one image row, no crop row: the overview is already 1:1
    assert bottom - top + 1 == 64
    band = labels[:top]
    assert band.sum() > 50  # label text above the images
    # three columns of text, separated by label-free stretches
    cols = np.flatnonzero(band.any(axis=0))
    assert len(np.split(cols, np.flatnonzero(np.diff(cols) > 3) + 1)) >= 3
    # the original's panel is the image on [0, 1] at 8 bits, pixel for pixel
    orig = np.clip(a[0] / 1000.0, 0, 1)
    np.testing.assert_array_equal(png[top:bottom + 1, :80, 0], (orig * 255).round().astype(np.uint8))
    # the difference panel is |a − b| on [0, 1] × k with the k of the label; noise σ=5/1000 → k = 64
    k = difference_gain(np.abs(orig - np.clip(b[0] / 1000.0, 0, 1)))
    assert k == 64
    diff_cols = png[top:bottom + 1, :, 0]
    expected = (np.clip(np.abs(orig - np.clip(b[0] / 1000.0, 0, 1)) * k, 0, 1) * 255).round()
    starts = [x for x in range(png.shape[1] - 80 + 1) if np.array_equal(diff_cols[:, x:x + 80], expected)]
    assert starts and starts[0] > 160  # the third panel, right of the other two


def test_large_image_gets_a_native_resolution_centre_crop_row(tmp_path):
    h, w = 3 * OVERVIEW_MAX // 2, OVERVIEW_MAX  # shrunk ÷1.5 in the overview
    a, b = _pair(h, w, noise=20.0, seed=1)
    out = comparison_png(a, b, _rec(a.shape), tmp_path / "c.png")
    png = np.asarray(Image.open(out).convert("RGB"))
    blocks = _grey_blocks(png, round(w / 1.5))
    assert len(blocks) == 2  # overview row, crop row
    ph = round(h / 1.5)
    for top, bottom in blocks:
        assert bottom - top + 1 == ph
        assert _label_mask(png[max(0, top - 24):top]).sum() > 50  # a label band right above each row
    # the crop row's first panel is the original's centre crop, unscaled
    top = blocks[1][0]
    pw = round(w / 1.5)
    y0, x0 = (h - ph) // 2, (w - pw) // 2
    crop = (np.clip(a[0, y0:y0 + ph, x0:x0 + pw] / 1000.0, 0, 1) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(png[top:top + ph, :pw, 0], crop)
    # the overview's first panel is the whole image shrunk, not a crop of it
    o_top = blocks[0][0]
    assert not np.array_equal(png[o_top:o_top + ph, :pw, 0], crop)
    assert abs(float(png[o_top:o_top + ph, :pw, 0].mean()) - float(a[0].mean() / 1000 * 255)) < 3


def test_volume_shows_its_middle_slice(tmp_path):
    rng = np.random.default_rng(2)
    vol = rng.uniform(10, 1000, (20, 24, 9)).astype(np.float32)
    out = comparison_png(vol, vol, _rec(vol.shape, dims=3), tmp_path / "v.png")
    png = np.asarray(Image.open(out).convert("RGB"))
    view_w = 20  # rot90 of a 20×24 slice is 24×20
    (top, bottom), = _grey_blocks(png, view_w)
    view = (np.rot90(vol[:, :, 4]) / 1000.0 * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(png[top:bottom + 1, :view.shape[1], 0], view)
    assert png[top:bottom + 1, 2 * view_w:].max() > 0 and _label_mask(png[:top]).any()


def test_written_atomically_under_the_given_name(tmp_path):
    a, b = _pair(16, 16, noise=1.0)
    out = comparison_png(a, b, _rec(a.shape), tmp_path / "compare.png")
    assert out == tmp_path / "compare.png" and [p.name for p in tmp_path.iterdir()] == ["compare.png"]
