"""The sample set comes from installed packages only, keeps its format, and is scaled consistently."""

import numpy as np
import pytest
from typer.testing import CliRunner

from medlatent.cli import app
from medlatent.io.readers import read_image
from medlatent.samples import block_mean

pytest.importorskip("pydicom")


def test_block_mean():
    a = np.arange(24, dtype=float).reshape(4, 6)
    np.testing.assert_allclose(block_mean(a, 2, (0, 1)), [[3.5, 5.5, 7.5], [15.5, 17.5, 19.5]])
    v = np.ones((5, 4, 3))
    assert block_mean(v, 2, (0, 1, 2)).shape == (2, 2, 1)


def test_samples_command(tmp_path):
    res = CliRunner().invoke(app, ["samples", "-o", str(tmp_path), "--max-size-2d", "128"])
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "2d").iterdir())
    names = {f.name for f in files}
    assert {"ct_slice.dcm", "mr_slice.dcm", "radiograph_1.dcm", "ultrasound_rgb.dcm"} <= names
    assert any(n.startswith("mammogram_") for n in names)
    for f in files:
        img = read_image(f)
        assert max(img.spatial_shape) <= 128, f
    src = read_image(__import__("pydicom").data.get_testdata_file("RG1_UNCR.dcm", download=False))
    small = read_image(tmp_path / "2d" / "radiograph_1.dcm")
    factor = round(src.spatial_shape[0] / small.spatial_shape[0])
    assert small.spacing == pytest.approx(tuple(s * factor for s in src.spacing))
    assert small.modality == "xray"
    ct = read_image(tmp_path / "2d" / "ct_slice.dcm")
    assert ct.modality == "ct" and ct.array.min() < -800  # still HU after the copy
    vol = read_image(tmp_path / "3d" / "t1_anatomical.nii.gz")
    assert vol.spatial_dims == 3


def test_default_sizes_and_full_resolution(tmp_path, monkeypatch):
    from medlatent import samples as samples_mod

    one = [("2d/radiograph_1.dcm", 2, samples_mod._pydicom_file("RG1_UNCR.dcm"))]  # 1955×1841
    monkeypatch.setattr(samples_mod, "_sources", lambda: one)
    res = CliRunner().invoke(app, ["samples", "-o", str(tmp_path / "default")])
    assert res.exit_code == 0, res.output
    assert read_image(tmp_path / "default" / "2d" / "radiograph_1.dcm").spatial_shape == (977, 920)  # ÷2 ≤ 1024
    res = CliRunner().invoke(app, ["samples", "-o", str(tmp_path / "full"), "--full-resolution"])
    assert res.exit_code == 0, res.output
    assert read_image(tmp_path / "full" / "2d" / "radiograph_1.dcm").spatial_shape == (1955, 1841)
    res = CliRunner().invoke(app, ["samples", "-o", str(tmp_path / "both"), "--full-resolution", "--max-size-2d", "64"])
    assert res.exit_code != 0 and "--full-resolution" in res.output
    assert not (tmp_path / "both").exists()
