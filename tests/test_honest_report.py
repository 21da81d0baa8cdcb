"""Honest comparisons: equal-values factors, the cubic-spline baseline, xz and JPEG 2000 bytes, and a whole row
and report with a tiny model."""

import gzip
import json
import lzma

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomise, tiny_config
from medlatent import MedVAE
from medlatent.evaluation.baselines import cubic_spline_matrix, cubic_spline_resize, interpolation_at, roundtrip
from medlatent.evaluation.codecs import CodecUnavailable, j2k_at_bytes, j2k_lossless, xz_bytes
from medlatent.evaluation.honest import (
    csv_groups,
    equal_values_factor,
    evaluate_image_honestly,
    summarise_honestly,
    write_honest_report,
)
from medlatent.evaluation.recon import gather_inputs
from medlatent.metrics import psnr

pytest.importorskip("openjpeg")


# ------------------------------------------------------------------------------------------ equal values
@pytest.mark.parametrize("f, C, dims, expected", [
    (16, 4, 2, (4.0, 2.0)),     # the 4-channel 2D model: bicubic ÷2 per axis
    (16, 1, 2, (16.0, 4.0)),    # C=1: the same f
    (64, 1, 3, (64.0, 4.0)),    # the 3D default: ÷4 per axis
    (64, 4, 3, (16.0, 16 ** (1 / 3))),  # not an integer: sizes rounded per axis
    (64, 8, 3, (8.0, 2.0)),
])
def test_equal_values_factor(f, C, dims, expected):  # noqa: N803
    g, r = equal_values_factor(f, C, dims)
    assert g == pytest.approx(expected[0]) and r == pytest.approx(expected[1])
    assert r ** dims * C == pytest.approx(f)  # as many values: N/r^d = C·N/f


def test_equal_values_factor_without_a_match():
    assert equal_values_factor(4, 4, 2) is None  # the latent keeps as many values as the image
    with pytest.raises(ValueError):
        equal_values_factor(16, 0, 2)


# ------------------------------------------------------------------------------------------ cubic spline
def test_cubic_spline_interpolates_the_samples_and_keeps_constants():
    np.testing.assert_allclose(cubic_spline_matrix(9, 9), np.eye(9), atol=1e-12)
    m = cubic_spline_matrix(7, 21)  # ×3: output centre 3i+1 sits on input sample i
    np.testing.assert_allclose(m[1::3], np.eye(7), atol=1e-12)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)


def test_cubic_spline_enlarges_a_smooth_signal_better_than_linear():
    n, m = 24, 96
    centres = lambda k: (np.arange(k) + 0.5) / k  # noqa: E731
    wave = lambda x: np.cos(4 * np.pi * x)  # noqa: E731 - mirror-symmetric at both ends, like the boundary rule
    signal = torch.tensor(wave(centres(n)))[None, None, :, None].repeat(1, 1, 1, 2)
    spline = cubic_spline_resize(signal, (m, 2))[0, 0, :, 0].numpy()
    linear = torch.nn.functional.interpolate(signal, size=(m, 2), mode="bilinear")[0, 0, :, 0].numpy()
    inner = slice(2, -2)  # linear interpolation clamps at the outermost half pixels
    truth = wave(centres(m))
    assert np.abs(spline - truth)[inner].max() < np.abs(linear - truth)[inner].max() / 5


def test_cubic_spline_baseline_in_3d():
    x = torch.rand(1, 1, 16, 12, 8) * 2 - 1
    assert roundtrip(x, 4, "cubic-spline").shape == x.shape
    fn, multiple = interpolation_at(3, 64 / 4, "cubic-spline")  # ÷2.52 per axis
    assert multiple == 1 and fn(x).shape == x.shape


# ------------------------------------------------------------------------------------------ bytes
def test_xz_bytes_is_lzma_9e_and_unpacks_gzip(tmp_path):
    data = (np.arange(20000) % 251).astype(np.uint8).tobytes()
    raw, gz = tmp_path / "a.nii", tmp_path / "a.nii.gz"
    raw.write_bytes(data)
    gz.write_bytes(gzip.compress(data))
    expected = len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    assert xz_bytes([raw]) == xz_bytes([gz]) == expected < len(data)
    assert xz_bytes([raw, gz]) == 2 * expected


def _ct(h: int = 96, w: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = 400 * np.sin(xx / 6.0) * np.cos(yy / 9.0) - 300 + np.random.default_rng(0).normal(0, 20, (h, w))
    return np.round(img).astype(np.float64)[None]  # integral HU as float (DICOM after rescale), some negative


def test_j2k_lossless_round_trips_signed_values():
    a = _ct()
    res = j2k_lossless(a, 2)
    assert res.ratio is None and res.decoded.dtype == a.dtype
    np.testing.assert_array_equal(res.decoded, a)
    assert 0 < res.nbytes < a.size * 2  # int16 pixels, compressed


def test_j2k_at_bytes_fits_the_budget_and_more_bytes_mean_better_quality():
    a = _ct()
    full = j2k_lossless(a, 2).nbytes
    small, large = j2k_at_bytes(a, 2, full // 16), j2k_at_bytes(a, 2, full // 3)
    assert small.nbytes <= full // 16 and large.nbytes <= full // 3
    assert large.nbytes > 0.8 * (full // 3)  # the bisection uses the budget, not a fraction of it
    span = a.max() - a.min()
    assert psnr(a / span, large.decoded / span) > psnr(a / span, small.decoded / span)
    tiny = j2k_at_bytes(a, 2, 10)  # headers alone are larger: the smallest coding, flagged by its size
    assert tiny.nbytes > 10


def test_j2k_volumes_slice_by_slice_and_rgb():
    vol = np.random.default_rng(1).integers(0, 4000, (36, 32, 6)).astype(np.int16)
    res = j2k_lossless(vol, 3)
    np.testing.assert_array_equal(res.decoded, vol)
    with pytest.raises(CodecUnavailable, match="32 px"):
        j2k_lossless(vol[:20, :16], 3)  # openjpeg's 5 wavelet levels need 32 px a side
    rgb = np.random.default_rng(2).integers(0, 255, (3, 40, 48)).astype(np.uint8)
    np.testing.assert_array_equal(j2k_lossless(rgb, 2).decoded, rgb)
    with pytest.raises(CodecUnavailable, match="integer"):
        j2k_lossless(vol.astype(np.float32) + 0.5, 3)


# ------------------------------------------------------------------------------------------ one row, a report
def _tiny(dims: int) -> MedVAE:
    return randomise(MedVAE(tiny_config(dims))).eval()  # ÷2 per axis, C=2: f=4 (2D), 8 (3D)


def test_row_and_report_2d(tmp_path):
    png = tmp_path / "img.png"
    yy, xx = np.mgrid[0:64, 0:64]
    Image.fromarray((127 + 100 * np.sin(xx / 5) * np.cos(yy / 7)).astype(np.uint8)).save(png)
    (tmp_path / "list.csv").write_text("path,source_modality\nimg.png,fundus\n")
    items, skipped = gather_inputs([tmp_path / "list.csv"])
    assert not skipped and len(items) == 1
    model = _tiny(2)
    row = evaluate_image_honestly(items[0], model)
    m = row["methods"]
    assert set(m) == {"model", "interp_same_f", "interp_equal_values", "j2k_at_latent_bytes"}
    assert m["model"]["values"] == 2 * 32 * 32
    assert m["interp_same_f"]["values"] == 32 * 32
    assert m["interp_equal_values"]["values"] == 45 * 45  # ÷√2 per axis, 64/1.414 rounded: as many as the latent
    assert "rounded" in m["interp_equal_values"]["how"]
    assert row["bytes"]["latent"] > m["model"]["values"] * 2  # float16 z plus its header
    assert m["j2k_at_latent_bytes"]["bytes"] <= row["bytes"]["latent"]
    assert row["bytes"]["file"] == png.stat().st_size and row["bytes"]["xz"] > 0
    groups = {it.name: g for it in items if (g := csv_groups(tmp_path / "list.csv").get(it.source.resolve()))}
    assert groups == {items[0].name: "fundus"}
    summary = summarise_honestly([row], groups)
    assert set(summary) == {"fundus", "all"} and summary["all"]["images"] == 1
    assert summary["all"]["model"]["psnr"] == pytest.approx(m["model"]["psnr"])
    assert summary["all"]["latent_over_xz"] == pytest.approx(row["bytes"]["latent"] / row["bytes"]["xz"])
    files = write_honest_report(tmp_path / "out", [row], summary, {"tiny": model})
    saved = json.loads(files["json"].read_text())
    assert saved["images"][0]["methods"]["model"]["values"] == 2048 and saved["models"]["tiny"]["C"] == 2
    text = files["report"].read_text()
    assert "| fundus | 1 |" in text and "JPEG 2000 at latent bytes" in text


def test_row_3d_uses_cubic_spline_and_codes_slices(tmp_path):
    vol = np.random.default_rng(3).integers(0, 1000, (32, 36, 8)).astype(np.int16)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    items, _ = gather_inputs([path])
    with torch.inference_mode():
        row = evaluate_image_honestly(items[0], _tiny(3))
    m = row["methods"]
    assert m["interp_same_f"]["how"].startswith("cubic-spline ÷2")
    assert m["interp_equal_values"]["f"] == pytest.approx(4.0)  # f=8, C=2
    assert row["bytes"]["j2k_lossless"] > 0 and "j2k_at_latent_bytes" in m
