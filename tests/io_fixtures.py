"""Real public images shipped inside pip packages (pydicom test files, pydicom-data, nibabel test data)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def sample_file(name: str) -> Path:
    """A file from pydicom's test files or the pydicom-data store (offline; never downloaded)."""
    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"{name} not available offline (pip install pydicom-data)")
    return Path(p)


def nibabel_data(name: str) -> Path:
    import nibabel.testing

    p = Path(nibabel.testing.data_path) / name
    if not p.exists():
        pytest.skip(f"nibabel test file {name} missing")
    return p


def make_series(folder: Path, n: int = 6, spacing: float = 2.5, skip: tuple[int, ...] = (),
                orientation=(1, 0, 0, 0, 1, 0)) -> Path:
    """A real CT slice (CT_small.dcm) made into a series of ``n`` slices with distinct pixel data.

    Slices are written in shuffled order so that readers must sort by position.
    """
    src = pydicom.dcmread(sample_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    uid = pydicom.uid.generate_uid()
    ori = np.array(orientation, dtype=float)
    normal = np.cross(ori[:3], ori[3:])
    origin = np.array([float(v) for v in src.ImagePositionPatient])
    rng = np.random.default_rng(0)
    for k in rng.permutation(n):
        if k in skip:
            continue
        ds = src.copy()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = int(k) + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in ori]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * spacing * normal]
        px = src.pixel_array.astype(np.int16)
        ds.PixelData = np.roll(px, int(k) * 3, axis=1).astype(px.dtype).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm")
    return folder


def copy_to(tmp: Path, src: Path, name: str | None = None) -> Path:
    dst = tmp / (name or src.name)
    shutil.copy(src, dst)
    return dst


def training_images(root: Path, volume: bool = True) -> Path:
    """A folder of real training images: a CT and an MR slice (DICOM) and, with ``volume``, a T1 volume whose
    slices a 2D run draws too."""
    root.mkdir(parents=True)
    shutil.copy(sample_file("CT_small.dcm"), root / "ct.dcm")
    shutil.copy(sample_file("MR_small.dcm"), root / "mr.dcm")
    if volume:
        shutil.copy(nibabel_data("anatomical.nii"), root / "t1.nii")
    return root


def write_task_image(folder: Path, stem: str, p: np.ndarray, dims: int) -> str:
    """Write a [0, 1] array as a 16-bit PNG (2D) or a float NIfTI volume (3D) for a CAD task; returns the name."""
    from medlatent.io.image import ImageData, spacing_affine
    from medlatent.io.writers import write_image

    if dims == 2:
        name = f"{stem}.png"
        write_image(ImageData(np.round(p * 65535).astype(np.uint16)[None], spacing_affine((1.0, 1.0))),
                    folder / name, "png")
    else:
        name = f"{stem}.nii.gz"
        write_image(ImageData(p.astype(np.float32), np.eye(4)), folder / name, "nifti")
    return name
