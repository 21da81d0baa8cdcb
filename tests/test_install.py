"""The core commands never depend on optional packages, and a broken optional package cannot break them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlatent.metrics import MS_SSIM_BETAS, ms_ssim, ms_ssim_scales

BROKEN = "raise RuntimeError('operator torchvision::nms does not exist')\n"


def _poisoned_path(tmp_path: Path) -> dict:
    """An environment in which ``import torchvision`` (and timm, lpips, open_clip) fails as a mismatched build does."""
    site = tmp_path / "poison"
    for name in ("torchvision", "timm", "lpips", "open_clip"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(BROKEN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return env


def test_roundtrip_works_beside_a_broken_torchvision(tmp_path):
    env = _poisoned_path(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], env=env, capture_output=True, text=True)
    assert "torchvision::nms" in probe.stderr  # the poison is in place
    src = tmp_path / "in"
    src.mkdir()
    g = np.random.default_rng(0)
    Image.fromarray((g.random((48, 40)) * 255).astype(np.uint8)).save(src / "a.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medlatent.cli", "roundtrip", str(src), "-o", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok"]
    assert (out / "a.recon.png").exists() and (out / "a.latent.safetensors").exists()
    assert "ms_ssim" in (out / "metrics.csv").read_text().lower().replace("-", "_")


@pytest.mark.parametrize("shape, spatial_dims", [((1, 64, 64), 2), ((3, 100, 130), 2), ((1, 200, 180), 2),
                                                  ((40, 44, 50), 3)])
def test_ms_ssim_equals_torchmetrics(shape, spatial_dims):
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.functional.image")
    g = np.random.default_rng(0)
    a = g.random(shape).astype(np.float32)
    b = np.clip(a + g.normal(0, 0.05, shape), 0, 1).astype(np.float32)
    n = ms_ssim_scales(min(shape[-spatial_dims:]))
    betas = tuple(x / sum(MS_SSIM_BETAS[:n]) for x in MS_SSIM_BETAS[:n])
    at, bt = torch.tensor(a), torch.tensor(b)
    at, bt = (at[None], bt[None]) if spatial_dims == 2 else (at[None, None], bt[None, None])
    ref = float(tm.multiscale_structural_similarity_index_measure(at, bt, data_range=1.0, betas=betas,
                                                                   normalize="relu"))
    assert ms_ssim(a, b, spatial_dims=spatial_dims) == pytest.approx(ref, abs=1e-5)


def test_optional_imports_name_the_feature_and_the_way_out(tmp_path, monkeypatch):
    from medlatent.optional import OptionalDependencyError, import_optional

    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text(BROKEN)
    (tmp_path / "needsdep").mkdir()
    (tmp_path / "needsdep" / "__init__.py").write_text("import not_a_real_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(OptionalDependencyError, match=r"the X feature needs brokenpkg, which is installed but fails "
                                                      r"to import: RuntimeError.*matching pair"):
        import_optional("brokenpkg", "the X feature", "pip install x")
    with pytest.raises(OptionalDependencyError, match="cannot import its dependency not_a_real_module_xyz: pip"):
        import_optional("needsdep", "the X feature", "pip install x")
    with pytest.raises(OptionalDependencyError, match="needs absentpkg_xyz, which is not installed: pip install x"):
        import_optional("absentpkg_xyz", "the X feature", "pip install x")
