"""The evaluation journey as a new user takes it, through the real CLI: several models against equal-values
interpolation in one reconstruction report, CAD on a latent with C > 1 in both channel modes, warnings on
numbers that cannot mean much, and ``--pretrained`` failing fast offline.

Everything runs offline on real public images (pydicom's CT_small/MR_small), the bundled default model
(``medlatent_small_4_4_2d``: 2D, f=16, C=4) and the ``tiny`` classifier. Tests decide on what was computed and
written (rows, columns, channel counts, messages), never on how good a number is.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from io_fixtures import copy_to, sample_file
from medlatent import MedVAE
from medlatent.evaluation import baselines as B
from medlatent.evaluation.cad import CADResult, MethodResult, SeedRun, auroc_ci, cad_warnings
from medlatent.evaluation.cli_cad import register as register_cad
from medlatent.evaluation.cli_recon import register as register_recon

BUNDLED = "medlatent_small_4_4_2d"
runner = CliRunner()


@pytest.fixture()
def app() -> typer.Typer:
    app = typer.Typer()
    register_recon(app)
    register_cad(app)
    return app


def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------ equal-values baselines
def test_interpolation_at_any_factor_keeps_the_shape_and_stores_about_f_fewer_values():
    x = torch.rand(1, 1, 24, 20) * 2 - 1
    fn, multiple = B.interpolation_at(2, 4, "bicubic")  # ÷2 per axis: an exact roundtrip on a padded input
    assert multiple == 2 and fn(x).shape == x.shape
    assert torch.equal(fn(x), B.roundtrip(x, 2, "bicubic"))
    fn, multiple = B.interpolation_at(2, 16 / 3, "bicubic")  # a C=3, f=16 model: ÷2.31 per axis, sizes rounded
    assert multiple == 1 and fn(x).shape == x.shape
    assert B.resized_shape((24, 20), B.per_axis_factor(16 / 3, 2)) == (10, 9)
    fn, _ = B.interpolation_at(3, 4, "area")
    assert fn(torch.rand(1, 1, 8, 8, 6)).shape == (1, 1, 8, 8, 6)
    for bad in (1, 0.5, math.inf):
        with pytest.raises(B.BaselineError, match="> 1"):
            B.interpolation_at(2, bad, "bicubic")


def test_recon_two_models_against_equal_values_bicubic_in_one_report(tmp_path, app):
    """The README journey: the bundled model by its registry name and a saved copy as a folder (like a
    fine-tuned run's final/), in one report with bicubic at the same f and at equal values stored."""
    ct, mr = copy_to(tmp_path, sample_file("CT_small.dcm")), copy_to(tmp_path, sample_file("MR_small.dcm"))
    copy_dir = MedVAE.from_pretrained(BUNDLED).save_pretrained(tmp_path / "run" / "final", name="copy")
    out = tmp_path / "recon"
    res = runner.invoke(app, ["recon", str(ct), str(mr), "-o", str(out), "-m", BUNDLED, "-m", str(copy_dir),
                              "--baselines", "bicubic", "--interp-f", "64", "--seeds", "1", "--figures", "0"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["methods"]
    assert list(methods) == [BUNDLED, "copy", "bicubic", "bicubic (f=4)", "bicubic (f=64)"]
    assert (methods["bicubic (f=4)"]["f"], methods["bicubic"]["f"], methods[BUNDLED]["C"]) == (4, 16, 4)
    for name, m in methods.items():
        assert math.isfinite(m["psnr"]["mean"]) and m["psnr"]["sd"] is None, name  # one seed: no sd

    # values stored, per image: the C=4 latent at ÷4 per axis and bicubic at ÷2 keep H·W/4 (sizes are multiples
    # of 4); bicubic at the model's f keeps H·W/16
    rows = _rows(out / "results.csv")
    for r in rows:
        quarter = int(r["pixels"]) // 4
        expected = {BUNDLED: quarter, "copy": quarter, "bicubic (f=4)": quarter, "bicubic": quarter // 4,
                    "bicubic (f=64)": quarter // 16}[r["method"]]
        assert int(r["values_stored"]) == expected, r
    assert {r["image"] for r in rows} == {"CT_small", "MR_small"}

    report = (out / "report.md").read_text()
    bundled_file = Path(summary["models"][0]["file"])
    for name, sha in ((BUNDLED, _sha12(bundled_file)), ("copy", _sha12(copy_dir / "model.safetensors"))):
        assert f"| {name} | {sha} |" in report  # the summary table names each model by name and SHA
    assert "| values stored |" in report and "| bicubic (f=4) | – | 4 | – | 1/4 |" in report
    model_row = next(ln for ln in report.splitlines() if ln.startswith(f"| {BUNDLED} | "))
    assert model_row.count("± n/a (1 seed)") == 2  # PSNR and MS-SSIM: no made-up "± 0.00" for one seed
    assert "## Warnings" in report and "only 2 image(s)" in report and "one seed" in report
    assert "warning: only 2 image(s)" in res.output and "n/a (1 seed)" in res.output


def test_recon_refuses_bad_factors_and_mixed_options_without_output(tmp_path, app):
    mr = copy_to(tmp_path, sample_file("MR_small.dcm"))
    for args, message in ((["--interp-f", "1"], "> 1"), (["--interp-f", "four"], "comma-separated numbers"),
                          (["--interp", "lanczos"], "lanczos"),
                          (["-m", BUNDLED, "-m", BUNDLED, "-c", str(mr)], "single --model")):
        out = tmp_path / "out"
        res = runner.invoke(app, ["recon", str(mr), "-o", str(out), *args])
        assert res.exit_code == 1 and message in res.output, (args, res.output)
        assert not out.exists(), args  # refused before anything is written


# ------------------------------------------------------------------------------------------ CAD on C > 1
def _task(folder: Path, n: int = 24, size: int = 32) -> Path:
    """``n`` real CT/MR patches; label 1 has a bright square (separable). Half train, 2 val, the rest test."""
    from medlatent.evaluation.finefeature import crop, source_planes, unit
    from medlatent.io.image import ImageData, spacing_affine
    from medlatent.io.writers import write_image

    folder.mkdir(parents=True)
    planes = source_planes(sample_file("CT_small.dcm"), 2) + source_planes(sample_file("MR_small.dcm"), 2)
    rng = np.random.default_rng(0)
    lines = ["path,label,split"]
    for i in range(n):
        plane = planes[i % 2]
        start = [int(rng.integers(0, s - size + 1)) for s in plane.shape]
        patch = unit(crop(plane, start, size))
        if i % 2:
            patch[8:24, 8:24] = 1.0
        write_image(ImageData(np.round(patch * 65535).astype(np.uint16)[None], spacing_affine((1.0, 1.0))),
                    folder / f"p{i:02d}.png", "png")
        lines.append(f"p{i:02d}.png,{i % 2},{'train' if i < n // 2 else 'val' if i < n // 2 + 2 else 'test'}")
    (folder / "task.csv").write_text("\n".join(lines) + "\n")
    return folder / "task.csv"


@pytest.mark.parametrize("mode,channels", [("mean", 1), ("all", 4)])
def test_cad_on_a_c4_latent_in_both_channel_modes(tmp_path, app, monkeypatch, mode, channels):
    pytest.importorskip("torchmetrics")
    import medlatent.evaluation.cad_train as cad

    built: list[int] = []
    real = cad.build_classifier

    def spy(name, spatial_dims, in_channels, num_classes, **kw):
        built.append(in_channels)
        return real(name, spatial_dims, in_channels, num_classes, **kw)

    monkeypatch.setattr(cad, "build_classifier", spy)
    csv_path = _task(tmp_path / "data")
    out = tmp_path / "cad"
    res = runner.invoke(app, ["cad", str(csv_path), "-o", str(out), "-m", BUNDLED, "--latent-channels", mode,
                              "--classifier", "tiny", "--size", "32", "--epochs", "1", "--seeds", "0",
                              "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    rows = {r["kind"]: r for r in _rows(out / "cad.csv")}
    assert rows["latent"]["C"] == "4" and rows["latent"]["input_channels"] == str(channels)
    assert rows["latent"]["input_shape"] == f"{channels}x8x8" and rows["latent"]["latent_channels"] == mode
    assert rows["image"]["input_channels"] == rows["interp"]["input_channels"] == "1"
    assert built == [1, channels, 1]  # the classifiers really got those inputs: image, latent, interp
    assert rows["latent"]["auroc_sd"] == ""  # one seed
    report = (out / "report.md").read_text()
    if mode == "mean":
        assert "| 1 (mean of C=4) |" in report and "the mean of the 4 latent channels" in report
    else:
        assert "| 4 (all C) |" in report and "all 4 latent channels as 4 input channels" in report
    # 10 test images and one seed: both flagged in the report and on the console
    assert "## Warnings" in report and "the test split has 10 image(s)" in report and "n/a (1 seed)" in report
    assert "warning: task: the test split has 10 image(s)" in res.output


def test_cad_rejects_an_unknown_channel_mode(tmp_path, app):
    csv_path = _task(tmp_path / "data", n=8)
    res = runner.invoke(app, ["cad", str(csv_path), "-o", str(tmp_path / "out"), "-m", BUNDLED,
                              "--latent-channels", "max", "--classifier", "tiny", "--size", "32"])
    assert res.exit_code == 1 and "mean, all" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------ warnings
def _result(mean: float, test: dict[str, int], seeds: int = 3) -> CADResult:
    runs = [SeedRun(s, mean, 0, None) for s in range(seeds)]
    rows = [MethodResult("High-Resolution", "image", 1, 1, [1, 8, 8], runs),
            MethodResult("MedVAE (f=16, C=4)", "latent", 16, 4, [1, 2, 2], runs, latent_channels="mean")]
    return CADResult("fine", "AUROC", ["0", "1"], {"test": test}, "tiny", {"seeds": list(range(seeds))}, rows)


def test_auroc_interval_and_warnings_on_meaningless_results():
    lo, hi = auroc_ci(0.5, {"0": 2, "1": 2})
    assert lo < 0.5 < hi
    lo, hi = auroc_ci(0.95, {"0": 100, "1": 100})
    assert 0.5 < lo < 0.95 < hi <= 1
    assert auroc_ci(0.95, {"0": 100, "1": 100}) != auroc_ci(0.95, {"0": 10, "1": 10})  # fewer images: wider
    chance = cad_warnings(_result(0.5, {"0": 2, "1": 2}, seeds=1))
    assert any("test split has 4 image(s)" in w for w in chance)
    assert any("one seed" in w for w in chance)
    assert any("high-resolution reference is at chance" in w for w in chance)
    assert any("MedVAE (f=16, C=4) is indistinguishable from chance" in w for w in chance)
    assert cad_warnings(_result(0.95, {"0": 60, "1": 60})) == []  # enough images, clear of chance, 3 seeds
    few_per_class = cad_warnings(_result(0.95, {"0": 40, "1": 4}))
    assert len(few_per_class) == 1 and "1=4" in few_per_class[0]


# ------------------------------------------------------------------------------------------ --pretrained offline
def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home"), "OMP_NUM_THREADS": "1"}


def test_pretrained_weights_offline_with_an_empty_cache_fail_in_one_line(tmp_path):
    """Without timm: the weights lookup itself (what runs before timm would) fails at once, naming the file."""
    code = ("from medlatent.evaluation.classifiers import resolve_pretrained\n"
            "try:\n    resolve_pretrained('hrnet_w64')\n"
            "except ValueError as e:\n    print(type(e).__name__, e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_offline_env(tmp_path),
                         timeout=300)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith("PretrainedWeightsError") and "\n" not in line
    for part in ("model.safetensors", "timm/hrnet_w64.ms_in1k", "HF_HUB_OFFLINE", "--pretrained-weights", "HF_HOME"):
        assert part in line, part
    from medlatent.evaluation.classifiers import PretrainedWeightsError, resolve_pretrained

    with pytest.raises(PretrainedWeightsError, match="nope.safetensors: no such file"):
        resolve_pretrained("hrnet_w64", tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="no pretrained weights"):
        resolve_pretrained("tiny")


def test_cli_pretrained_offline_fails_fast_before_any_work(tmp_path):
    """Through the installed CLI, HF_HUB_OFFLINE=1 and an empty cache: one error line and no output folder.
    Without timm the line says how to install it; with timm it says how to provide the weights."""
    csv_path = _task(tmp_path / "data", n=8)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medlatent.cli", "evaluate", "cad", str(csv_path), "-o", str(out), "--pretrained",
           "--size", "32"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(tmp_path), timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    try:
        import timm  # noqa: F401
    except ImportError:
        assert "needs timm" in errors[0] and "pip install 'medlatent[pretrained]'" in errors[0]
    else:
        for part in ("model.safetensors", "HF_HUB_OFFLINE", "--pretrained-weights"):
            assert part in errors[0], part
    assert not out.exists()  # nothing prepared, nothing encoded
