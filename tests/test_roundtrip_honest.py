"""`medlatent roundtrip`'s honest summary: interpolation at the latent's number of values, xz -9e of the source,
and which inputs the model was trained on (the model folder's training_data.json against the samples manifest)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from io_fixtures import nibabel_data, sample_file
from medlatent.lossless import xz_bytes
from medlatent.provenance import TRAINING_DATA, TrainingDataError, read_training_data


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _samples(root: Path, monkeypatch) -> Path:
    """``medlatent samples`` with two real sources: CT_small (copied as is) and RG1_UNCR (block-averaged)."""
    from medlatent import samples as samples_mod

    sample_file("RG1_UNCR.dcm")  # skips when pydicom-data is missing
    two = [("2d/ct_slice.dcm", 2, samples_mod._pydicom_file("CT_small.dcm")),
           ("2d/radiograph_1.dcm", 2, samples_mod._pydicom_file("RG1_UNCR.dcm"))]
    monkeypatch.setattr(samples_mod, "_sources", lambda: two)
    res, text = run_cli("samples", "-o", root, "--max-size-2d", "64")
    assert res.exit_code == 0, text
    return root


def _model(model_dirs, tmp_path: Path, trained_on: list[dict] | None, dims: int = 2) -> Path:
    folder = tmp_path / f"model{dims}d"
    shutil.copytree(model_dirs[dims], folder)
    if trained_on is not None:
        (folder / TRAINING_DATA).write_text(json.dumps(trained_on))
    return folder


def _rows(out: Path) -> dict[str, dict]:
    return {r["item"]: r for r in json.loads((out / "summary.json").read_text())}


# ------------------------------------------------------------------------------------------ the samples manifest
def test_samples_manifest_records_each_source(tmp_path, monkeypatch):
    from medlatent.samples import recorded_source

    root = _samples(tmp_path / "samples", monkeypatch)
    lines = {r["item"]: r for r in map(json.loads, (root / "manifest.jsonl").read_text().splitlines())}
    ct, rg = lines["2d/ct_slice.dcm"], lines["2d/radiograph_1.dcm"]
    assert (ct["package"], ct["origin"]) == ("pydicom", "pydicom/data/test_files/CT_small.dcm")
    assert (rg["package"], rg["origin"]) == ("pydicom-data", "data_store/data/RG1_UNCR.dcm")
    assert rg["sha256"] == _sha(sample_file("RG1_UNCR.dcm")) != rg["file_sha256"]  # the copy is block-averaged
    assert rg["file_sha256"] == _sha(root / "2d" / "radiograph_1.dcm")
    assert recorded_source(root / "2d" / "radiograph_1.dcm").sha256 == rg["sha256"]
    shutil.copy(sample_file("MR_small.dcm"), root / "2d" / "radiograph_1.dcm")  # no longer the file written
    assert recorded_source(root / "2d" / "radiograph_1.dcm") is None
    assert recorded_source(sample_file("CT_small.dcm")) is None  # no manifest above it names it


def test_training_data_reader(tmp_path):
    assert read_training_data(tmp_path) is None
    sha = "ab" * 32
    (tmp_path / TRAINING_DATA).write_text(json.dumps([{"package": "p", "origin": "p/a.dcm", "sha256": sha.upper()}]))
    got = read_training_data(tmp_path)
    assert sha in got and "cd" * 32 not in got and got.files[sha] == "p:p/a.dcm"
    for bad, why in (("{}", "expected a JSON list"), ("[{\"package\": \"p\", \"origin\": \"o\"}]", "entry 0"),
                     ("[{\"package\": \"p\", \"origin\": \"o\", \"sha256\": \"xyz\"}]", "entry 0"), ("[", "JSON")):
        (tmp_path / TRAINING_DATA).write_text(bad)
        with pytest.raises(TrainingDataError, match=why) as e:
            read_training_data(tmp_path)
        assert str(tmp_path / TRAINING_DATA) in str(e.value)


# ------------------------------------------------------------------------------------------ roundtrip
def test_roundtrip_marks_training_images_and_reports_baselines(tmp_path, monkeypatch, model_dirs):
    """Samples are matched through their recorded source, other files through their own hash; the summary has
    interpolation at equal values (C=2 here: ÷√2 per axis) and xz -9e of each source."""
    from PIL import Image

    root = _samples(tmp_path / "samples", monkeypatch)
    (root / "other").mkdir()
    mr = shutil.copy(sample_file("MR_small.dcm"), root / "other" / "mr.dcm")  # a training file, not a sample
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 36)).astype(np.uint8)).save(root / "other" / "noise.png")
    trained = [{"package": "pydicom-data", "origin": "data_store/data/RG1_UNCR.dcm",
                "sha256": _sha(sample_file("RG1_UNCR.dcm"))},
               {"package": "pydicom", "origin": "pydicom/data/test_files/MR_small.dcm", "sha256": _sha(Path(mr))}]
    model = _model(model_dirs, tmp_path, trained)
    out = tmp_path / "out"
    res, text = run_cli("roundtrip", root, "-o", out, "--model", model)
    assert res.exit_code == 0, text
    rows = _rows(out)
    assert {k: r["in_training_set"] for k, r in rows.items()} == {
        "2d/ct_slice": False, "2d/radiograph_1": True, "other/mr": True, "other/noise": None}
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if " px → " in line}
    assert sorted(k for k, line in lines.items() if line.endswith("[training image]")) == ["2d/radiograph_1",
                                                                                          "other/mr"]
    for name, src in (("2d/ct_slice", root / "2d" / "ct_slice.dcm"), ("other/noise", root / "other" / "noise.png")):
        r = rows[name]
        assert r["interp"] == "bicubic ÷1.414 per axis (each axis rounded)" and r["interp_equal_values"] is True
        assert r["interp_f"] == pytest.approx(2.0)  # f=4, C=2
        assert abs(r["interp_values"] - r["latent_values"]) <= 0.1 * r["latent_values"]  # sizes rounded per axis
        assert np.isfinite([r["interp_psnr"], r["interp_ms_ssim"]]).all()
        assert r["source_xz_bytes"] == xz_bytes([src])
        assert r["xz_storage_ratio"] == pytest.approx(r["source_xz_bytes"] / r["latent_file_bytes"])
        assert f"(bicubic at equal values {r['interp_psnr']:.2f})" in lines[name]
        assert f"MS-SSIM {r['ms_ssim']:.4f} ({r['interp_ms_ssim']:.4f})" in lines[name]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"in_training_set", "interp_psnr", "interp_ms_ssim", "source_xz_bytes", "psnr", "storage_ratio"} <= {
        *header}


def test_roundtrip_baseline_is_the_honest_reports_equal_values_row(tmp_path, model_dirs):
    """The same protocol as scripts/evaluate_default_model.py: same numbers, in 2D (C=2: ÷√2) and in 3D
    (cubic-spline, C=2 at f=8: ÷4^(1/3) per axis)."""
    from medlatent import MedVAE
    from medlatent.evaluation.honest import evaluate_image_honestly
    from medlatent.evaluation.recon import gather_inputs

    for dims, src in ((2, sample_file("CT_small.dcm")), (3, nibabel_data("anatomical.nii"))):
        model = _model(model_dirs, tmp_path, None, dims)
        out = tmp_path / f"out{dims}"
        res, text = run_cli("roundtrip", src, "-o", out, "--model", model)
        assert res.exit_code == 0, text
        (row,) = _rows(out).values()
        assert row["in_training_set"] is None  # the model has no training_data.json
        items, _ = gather_inputs([src])
        honest = evaluate_image_honestly(items[0], MedVAE.from_pretrained(model), j2k=False)
        eq = honest["methods"]["interp_equal_values"]
        assert row["interp"] == eq["how"] and row["interp_values"] == eq["values"]
        assert row["interp_psnr"] == pytest.approx(eq["psnr"], rel=1e-6)
        assert row["interp_ms_ssim"] == pytest.approx(eq["ms_ssim"], rel=1e-6)
        assert row["source_xz_bytes"] == honest["bytes"]["xz"]
        assert row["interp"].startswith("bicubic" if dims == 2 else "cubic-spline")


def test_no_baselines_leaves_them_out(tmp_path, model_dirs):
    src = sample_file("CT_small.dcm")
    out = tmp_path / "out"
    res, text = run_cli("roundtrip", src, "-o", out, "--model", model_dirs[2], "--no-baselines")
    assert res.exit_code == 0, text
    (row,) = _rows(out).values()
    assert not any(k.startswith("interp") or "xz" in k for k in row), row
    assert row["in_training_set"] is None and np.isfinite(row["psnr"])
    line = next(line for line in text.splitlines() if " px → " in line)
    assert "bicubic" not in line and "xz" not in line and "[training image]" not in line


def test_a_broken_training_list_fails_its_inputs_by_name(tmp_path, model_dirs):
    model = _model(model_dirs, tmp_path, None)
    (model / TRAINING_DATA).write_text("{\"not\": \"a list\"}")
    out = tmp_path / "out"
    res, text = run_cli("roundtrip", sample_file("CT_small.dcm"), "-o", out, "--model", model)
    assert res.exit_code == 1 and f"{model / TRAINING_DATA}: expected a JSON list" in " ".join(text.split()), text
    assert not (out / "CT_small.latent.safetensors").exists()
