"""Evaluation suite: metrics, baselines, statistics, reconstruction/storage evaluation, report and CLI."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import randomise, tiny_config
from io_fixtures import copy_to, nibabel_data, sample_file
from medlatent import MedVAE
from medlatent.evaluation import baselines as B
from medlatent.evaluation.recon import (
    Box,
    ReconOptions,
    draw_samples,
    evaluate_reconstruction,
    read_rois,
    roi_psnr,
    slicewise_spec,
    summarise,
)
from medlatent.evaluation.report import bar_chart, format_stat, markdown_table, write_report
from medlatent.evaluation.storage import lossless_bytes, storage_record, stored_dtype
from medlatent.io.image import ImageData, spacing_affine
from medlatent.metrics import ms_ssim, ms_ssim_scales, psnr
from medlatent.preprocessing import preprocess


def tiny(dims: int, s: int = 2, seed: int = 0, **kw) -> MedVAE:
    """A random tiny model with reduction ``s`` per axis (ch_mult of all ones keeps it cheap)."""
    levels = {2: (1, 1), 4: (1, 1, 1)}[s]
    return randomise(MedVAE(tiny_config(dims, ch_mult=levels, **kw)), seed).eval()


# ----------------------------------------------------------------------------------------- metrics
def test_metric_sanity_identical_and_known_noise():
    g = np.random.default_rng(0)
    a = (0.25 + 0.5 * g.random((1, 128, 128))).astype(np.float64)  # in [0.25, 0.75]: noise never clips
    assert psnr(a, a) == math.inf
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    for sigma in (0.01, 0.05):
        noisy = a + g.normal(0, sigma, a.shape)
        assert psnr(a, noisy) == pytest.approx(20 * math.log10(1 / sigma), abs=0.2)
    assert ms_ssim(a, a + g.normal(0, 0.05, a.shape)) < ms_ssim(a, a + g.normal(0, 0.01, a.shape)) < 1


def test_ms_ssim_scales_fit_torchmetrics():
    # sides 88–98 used to get 4 scales, which torchmetrics rejects (it needs side // 9 > 10 for four)
    assert [ms_ssim_scales(n) for n in (21, 22, 43, 44, 88, 98, 99, 175, 176)] == [1, 2, 2, 3, 3, 3, 4, 4, 5]
    g = np.random.default_rng(1)
    for side in (88, 93, 98):
        a = g.random((1, side, side + 5))
        assert 0.5 < ms_ssim(a, np.clip(a + 0.02, 0, 1)) < 1
    vol = g.random((3, 40, 40))  # a volume only 3 voxels thick is not an RGB image when told so
    assert math.isnan(ms_ssim(vol, vol, spatial_dims=3))
    assert ms_ssim(vol, vol) == pytest.approx(1.0, abs=1e-6)  # default: read as C×H×W


# ----------------------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("dims,shape", [(2, (1, 23, 17)), (3, (9, 7, 5))], ids=["2d", "3d"])
def test_shrink_has_the_model_latent_size(dims, shape):
    model = tiny(dims)
    arr = np.random.default_rng(0).random(shape).astype(np.float32)
    img = ImageData(arr, spacing_affine((1.0,) * dims))
    x, _ = preprocess(img, spatial_dims=dims, in_channels=1, downsample=model.downsample_per_axis)
    xt = torch.from_numpy(x)[None]
    with torch.inference_mode():
        z = model.encode(xt).mean
    for mode in B.INTERPOLATION[dims]:
        small = B.shrink(xt, model.downsample_per_axis, mode)
        assert small.shape[2:] == z.shape[2:], mode
        assert B.roundtrip(xt, model.downsample_per_axis, mode).shape == xt.shape
    with pytest.raises(B.BaselineError, match="multiples of s=4"):
        B.shrink(torch.zeros(1, 1, *(6,) * dims), 4, "nearest")
    with pytest.raises(B.BaselineError, match="unknown"):
        B.shrink(xt, 2, "lanczos")


@pytest.mark.parametrize("dims", [2, 3])
def test_constant_image_roundtrips_exactly(dims):
    x = torch.full((1, 1, *(8,) * dims), 0.37)
    for name, fn in B.interpolation_methods(dims, 4).items():
        torch.testing.assert_close(fn(x), x, atol=1e-6, rtol=0, msg=name)


def test_interpolation_quality_order_on_a_smooth_image():
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 64), torch.linspace(0, 3, 64), indexing="ij")
    x = torch.sin(xx + yy)[None, None] * 0.8
    err = {m: float(((fn(x) - x) ** 2).mean()) for m, fn in B.interpolation_methods(2, 4).items()}
    assert err["bicubic"] < err["nearest"] and err["bilinear"] < err["nearest"]


def test_slicewise_2d_model_gives_the_3d_latent_shape():
    model2d, model3d = tiny(2, seed=1), tiny(3)
    vol = torch.rand(1, 1, 7, 6, 10) * 2 - 1  # X=7 is not a multiple of 2: padded inside, cropped after
    target = (4, 3, 5)
    z, recon = B.slicewise_2d_model_for_3d(model2d, vol, target)
    assert z.shape == (1, model2d.C, *target)
    assert recon.shape == vol.shape
    with torch.inference_mode():
        z3 = model3d.encode(torch.nn.functional.pad(vol, (0, 0, 0, 0, 0, 1), mode="replicate")).mean
    assert z.shape[2:] == z3.shape[2:]
    # without resizing, the slice latents are the 2D model's latents of each slice
    z_all = B.slicewise_encode(model2d, vol[:, :, :6], None)  # X 7→6: a multiple of 2, no padding
    with torch.inference_mode():
        ref = model2d.encode(vol[:, :, :6, :, 3]).mean
    torch.testing.assert_close(z_all[..., 3], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(B.BaselineError, match="2D model"):
        B.slicewise_encode(model3d, vol, target)


def test_natural_image_autoencoder_from_a_local_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=32)
    vae.save_pretrained(tmp_path / "kl")
    ae = B.natural_image_autoencoder(tmp_path / "kl")
    assert ae.kind == "kl" and ae.downsample_per_axis == 2 and ae.C == 4
    x = torch.rand(1, 1, 10, 7) * 2 - 1  # odd width: padded to the factor and cropped
    assert ae.method()(x).shape == x.shape
    assert ae.method()(torch.rand(1, 1, 6, 4, 3)).shape == (1, 1, 6, 4, 3)  # volumes: slice by slice
    (tmp_path / "empty").mkdir()
    with pytest.raises(B.NaturalModelError, match="empty.*not a diffusers model folder"):
        B.natural_image_autoencoder(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(B.NaturalModelError, match="UNet2DModel"):
        B.natural_image_autoencoder(tmp_path / "other")


def test_model_method_stores_z_as_float16_and_tiles_large_images():
    from medlatent.engine.tiled import TileSettings

    model = tiny(2)
    x = torch.rand(1, 1, 24, 20) * 2 - 1
    with torch.inference_mode():
        ref = model.decode(model.encode(x).mean.half().float(), grayscale=True)
        exact = model.decode(model.encode(x).mean, grayscale=True)
    torch.testing.assert_close(B.model_method(model)(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(B.model_method(model, latent_dtype=None)(x), exact, atol=1e-5, rtol=1e-5)
    tiled = B.model_method(model, tiles=TileSettings(tile=8, overlap=2))(x)  # 12 tiles, blended
    assert tiled.shape == x.shape and torch.isfinite(tiled).all()


def test_inputs_from_a_csv(tmp_path):
    from medlatent.evaluation.recon import EvaluationInputError, gather_inputs

    sub = tmp_path / "data"
    sub.mkdir()
    copy_to(sub, sample_file("MR_small.dcm"))
    (tmp_path / "list.csv").write_text("path,modality\ndata/MR_small.dcm,MRI\nmissing.png,\n")
    (tmp_path / "plain.csv").write_text("data/MR_small.dcm\n")
    items, skipped = gather_inputs([tmp_path / "list.csv", tmp_path / "plain.csv"])
    assert [(it.name, it.modality) for it in items] == [("data/MR_small", "mri"), ("data/MR_small~1", None)]
    assert len(skipped) == 1 and skipped[0][0].name == "missing.png"
    (tmp_path / "bad.csv").write_text("path,modality\n,ct\n")
    with pytest.raises(EvaluationInputError, match="bad.csv, line 2"):
        gather_inputs([tmp_path / "bad.csv"])


# ----------------------------------------------------------------------------------------- ROI and statistics
def test_roi_psnr_is_the_psnr_of_the_crops(tmp_path):
    g = np.random.default_rng(0)
    a, b = g.random((1, 20, 30)), g.random((1, 20, 30))
    box = Box(x0=5, y0=2, x1=25, y1=12)  # x: column, y: row
    assert roi_psnr(a, b, box, 2) == psnr(a[:, 2:12, 5:25], b[:, 2:12, 5:25])
    v1, v2 = g.random((8, 9, 10)), g.random((8, 9, 10))
    assert roi_psnr(v1, v2, Box(1, 2, 5, 7, 3, 9), 3) == psnr(v1[1:5, 2:7, 3:9], v2[1:5, 2:7, 3:9])
    with pytest.raises(ValueError, match="outside"):
        Box(0, 0, 40, 5, where="rois.csv, line 2").crop(a, 2)
    rois = tmp_path / "rois.csv"
    rois.write_text("path,x0,y0,x1,y1\nimg.png,1,2,3,4\nimg.png,0,0,2,2\nbad.png,a,0,1,1\n")
    with pytest.raises(ValueError, match="rois.csv, line 4"):
        read_rois(rois)


def test_seed_statistics_on_a_known_example():
    sampling = draw_samples(pool=4, samples=2, seeds=3)
    assert not sampling.replace and all(len(set(d.tolist())) == 2 for d in sampling.draws)
    assert [d.tolist() for d in sampling.draws] == [d.tolist() for d in draw_samples(4, 2, 3).draws]  # seeded
    values = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    sampling.draws = [np.array([0, 1]), np.array([2, 3]), np.array([1, 3])]  # seed means 1.5, 3.5, 3.0
    out = summarise(values, sampling)
    assert out["seed_means"] == [1.5, 3.5, 3.0]
    assert out["mean"] == pytest.approx(8 / 3)
    assert out["sd"] == pytest.approx(np.std([1.5, 3.5, 3.0], ddof=1))  # = sqrt(13/12)
    assert out["sd"] == pytest.approx(math.sqrt(13 / 12))
    # failed images (missing) and NaN are left out of a seed's mean
    out = summarise({0: 1.0, 1: float("nan"), 3: 4.0}, sampling)
    assert out["seed_means"] == [1.0, 4.0, 4.0] and out["n"] == [1, 1, 1]
    boot = draw_samples(pool=4, samples=0, seeds=2)
    assert boot.replace and boot.samples == 4
    assert summarise(values, draw_samples(4, 0, 1))["sd"] is None


# ----------------------------------------------------------------------------------------- end to end
def _read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_recon_evaluation_2d_on_real_files(tmp_path):
    ct, mr = copy_to(tmp_path, sample_file("CT_small.dcm")), copy_to(tmp_path, sample_file("MR_small.dcm"))
    rois = tmp_path / "rois.csv"
    rois.write_text("path,x0,y0,x1,y1\nCT_small.dcm,10,20,50,60\n")
    model = tiny(2)
    opts = ReconOptions(samples=2, seeds=2, roi_csv=rois, figures=1)
    res = evaluate_reconstruction([ct, mr], model, tmp_path / "out", opts)
    assert res.failures == []
    rows = _read_csv(tmp_path / "out" / "results.csv")
    # C=2, f=4: the equal-values row is bicubic at f=4/2 (÷√2 per axis, sizes rounded)
    assert len(rows) == 2 * 5 and {r["method"] for r in rows} == {"medlatent", "nearest", "bilinear", "bicubic",
                                                                  "bicubic (f=2)"}
    ct_rows = [r for r in rows if r["image"] == "CT_small"]
    assert all(float(r["roi_psnr"]) > 0 for r in ct_rows)
    assert all(r["roi_psnr"] == "" for r in rows if r["image"] == "MR_small")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["protocol"]["replace"] is True and summary["protocol"]["seeds"] == [0, 1]  # 2 of 2 → bootstrap
    m = summary["methods"]["bicubic"]["psnr"]
    per_image = {r["image"]: float(r["psnr"]) for r in rows if r["method"] == "bicubic"}
    drawn = json.loads((tmp_path / "out" / "samples.json").read_text())["seeds"]
    seed_means = [np.mean([per_image[n] for n in drawn[str(k)]]) for k in (0, 1)]
    assert m["seed_means"] == pytest.approx(seed_means)
    assert m["mean"] == pytest.approx(np.mean(seed_means))
    assert m["sd"] == pytest.approx(np.std(seed_means, ddof=1), abs=1e-9)
    assert summary["methods"]["medlatent"]["f"] == 4 and summary["methods"]["medlatent"]["C"] == 2
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| method |" in report and "bicubic" in report and "![" in report and "ROI PSNR" in report
    pngs = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    assert "psnr.png" in pngs and any(p.startswith("example_1_") for p in pngs)
    # the ROI PSNR is the PSNR of the cropped [0, 1] arrays: a 2-pixel box of identical values would be inf
    assert len(_read_csv(tmp_path / "out" / "roi_results.csv")) == 5


def test_recon_evaluation_3d_with_a_slicewise_2d_model(tmp_path):
    vol = copy_to(tmp_path, nibabel_data("anatomical.nii"))
    model3d, model2d = tiny(3), tiny(2, seed=3)
    opts = ReconOptions(seeds=1, figures=1, baselines=("trilinear", "area"))
    res = evaluate_reconstruction([vol], model3d, tmp_path / "out", opts,
                                  extra_methods={"2d-slicewise": slicewise_spec(model2d, model3d)})
    assert res.failures == []
    methods = {r["method"] for r in res.rows}
    assert methods == {"medlatent", "trilinear", "area", "area (f=4)", "2d-slicewise"}  # f=8, C=2: area at f=4
    for r in res.rows:
        assert math.isfinite(r["psnr"]) and 0 < r["ms_ssim"] <= 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["methods"]["area"]["psnr"]["sd"] is None  # one seed: no spread to report
    assert summary["methods"]["2d-slicewise"]["f"] == 8
    assert (tmp_path / "out" / "report.md").is_file() and list((tmp_path / "out" / "figures").glob("example_*"))


def test_unreadable_input_is_a_failure_naming_the_file(tmp_path):
    good = copy_to(tmp_path, sample_file("MR_small.dcm"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    res = evaluate_reconstruction([good, bad], tiny(2), tmp_path / "out", ReconOptions(seeds=1, figures=0))
    assert len(res.failures) == 1 and "broken.png" in res.failures[0][1]
    manifest = (tmp_path / "out" / "manifest.jsonl").read_text()
    assert "broken.png" in manifest and '"failed"' in manifest
    assert "broken.png" in (tmp_path / "out" / "report.md").read_text()


# ----------------------------------------------------------------------------------------- storage and report
def test_storage_numbers_for_a_known_array():
    img = ImageData(np.zeros((1, 64, 64), dtype=np.uint16), spacing_affine((1.0, 1.0)))
    r = storage_record(img, spatial_dims=2, downsample=4, C=1, file_bytes=10000)
    assert r.raw_bytes == 8192 and r.elements == 4096
    assert r.latent_shape == [1, 16, 16] and r.latent_f16_bytes == 16 * 16 * 2 == 512 and r.latent_f32_bytes == 1024
    assert r.spatial_ratio == 16 and r.element_ratio == 16 and r.raw_to_f16 == 16 and r.raw_to_f32 == 8
    assert r.file_to_f16 == pytest.approx(10000 / 512) and 0 < r.lossless_bytes < 8192
    r4 = storage_record(ImageData(np.zeros((1, 63, 65), np.uint8), spacing_affine((1.0, 1.0))),
                        spatial_dims=2, downsample=4, C=4)
    assert r4.latent_shape == [4, 16, 17] and r4.latent_f16_bytes == 4 * 16 * 17 * 2  # padded like encode
    # DICOM rescaled to float (integral HU) counts at its stored width
    assert stored_dtype(np.array([-1024.0, 3071.0])) == np.int16 and stored_dtype(np.array([0.5])) == np.float64
    assert lossless_bytes(np.array([-1024.0, 3071.0])) == lossless_bytes(np.array([-1024, 3071], np.int16))
    with pytest.raises(ValueError, match="3D image"):
        storage_record(ImageData(np.zeros((4, 4, 4)), np.eye(4), source="v.nii"), spatial_dims=2, downsample=4, C=1)


def test_report_helpers(tmp_path):
    assert format_stat(31.694, 0.071) == "31.69 ± 0.07" and format_stat(float("nan")) == "–"
    assert format_stat(0.9612, None, 3) == "0.961"
    table = markdown_table([{"a": 1, "b": 0.123456}, {"a": 2, "c": "x|y"}])
    assert table.splitlines()[0] == "| a | b | c |" and "x\\|y" in table and "0.1235" in table
    chart = bar_chart({"m1": {"auroc": {"mean": 0.8, "sd": 0.02}}, "m2": {"auroc": (0.7, 0.05)},
                       "m3": {"auroc": 0.75}, "m4": {"other": 1}}, "auroc", tmp_path / "figs" / "auroc.png")
    assert chart.stat().st_size > 0
    path = write_report(tmp_path, "CAD", [("AUROC", [{"method": "latent", "auroc": "0.80 ± 0.02"}])],
                        [("AUROC per method", chart)], notes="three seeds")
    text = path.read_text()
    assert text.startswith("# CAD") and "three seeds" in text and "![AUROC per method](figs/auroc.png)" in text


# ----------------------------------------------------------------------------------------- CLI
def _cli_app() -> typer.Typer:
    from medlatent.evaluation.cli_recon import register

    app = typer.Typer()
    register(app)
    return app


def test_cli_recon_and_storage(tmp_path):
    model_dir = tiny(2).save_pretrained(tmp_path / "model", name="tiny2d")
    good = copy_to(tmp_path, sample_file("MR_small.dcm"))
    runner = CliRunner()
    app = _cli_app()
    res = runner.invoke(app, ["recon", str(good), "-o", str(tmp_path / "r"), "-m", str(model_dir),
                              "--seeds", "2", "--figures", "1", "--baselines", "bicubic"])
    assert res.exit_code == 0, res.output
    assert "tiny2d" in res.output and "bicubic" in res.output and (tmp_path / "r" / "report.md").is_file()
    res = runner.invoke(app, ["storage", str(good), "-o", str(tmp_path / "s"), "-m", str(model_dir)])
    assert res.exit_code == 0, res.output
    rows = _read_csv(tmp_path / "s" / "storage.csv")
    assert rows[0]["raw_bytes"] == str(64 * 64 * 2) and rows[0]["latent_f16_bytes"] == str(2 * 32 * 32 * 2)
    assert "values ÷" in (tmp_path / "s" / "report.md").read_text()

    bad = tmp_path / "bad" / "corrupt.nii"
    bad.parent.mkdir()
    bad.write_bytes(b"not a nifti file at all" * 20)
    for cmd in ("recon", "storage"):
        res = runner.invoke(app, [cmd, str(good), str(bad), "-o", str(tmp_path / f"{cmd}-bad"), "-m", str(model_dir),
                                  *(["--seeds", "1", "--figures", "0"] if cmd == "recon" else [])])
        assert res.exit_code == 1, res.output
        assert "corrupt.nii" in res.output
    res = runner.invoke(app, ["recon", str(good), "-o", str(tmp_path / "x"), "-m", str(model_dir),
                              "--baselines", "trilinear"])
    assert res.exit_code == 1 and "trilinear" in res.output
