"""Readers for the formats hospitals and public datasets hold. Each returns :class:`ImageData`.

PNG/JPEG/TIFF/BMP through Pillow; DICOM through pydicom (compressed transfer syntaxes through the pylibjpeg
plugins when installed); DICOM series from a folder (see :mod:`medlatent.io.dicom`); NIfTI through nibabel;
NRRD/MHA/MHD through SimpleITK. Any failure is an :class:`ImageReadError` naming the file and the problem —
never a blank image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medlatent.io.image import ImageData, ImageReadError, spacing_affine

logger = logging.getLogger(__name__)

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_dicom(path: Path) -> bool:
    """DICOM by extension or by the ``DICM`` magic after the 128-byte preamble."""
    if _suffix(path) in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def is_supported(path: Path) -> bool:
    return _suffix(path) in RASTER_SUFFIXES + NIFTI_SUFFIXES + ITK_SUFFIXES or is_dicom(path)


def read_image(path: str | Path, *, uneven: str = "refuse") -> ImageData:
    """Read one image file, or a folder holding one DICOM series.

    Args:
        path: file or folder.
        uneven: for DICOM series with uneven or missing slices: ``"refuse"`` (error) or ``"resample"``
            (linear interpolation onto the median slice spacing).
    """
    path = Path(path)
    if path.is_dir():
        from medlatent.io.dicom import read_dicom_series

        return read_dicom_series(path, uneven=uneven)
    if not path.exists():
        raise ImageReadError(path, "no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty")
    suffix = _suffix(path)
    try:
        if suffix in RASTER_SUFFIXES:
            img = _read_raster(path)
        elif suffix in NIFTI_SUFFIXES:
            img = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            img = _read_itk(path)
        elif is_dicom(path):
            from medlatent.io.dicom import read_dicom_file

            img = read_dicom_file(path)
        else:
            raise ImageReadError(path, f"unsupported file type {suffix or '(no extension)'!r}; "
                                       "medlatent reads PNG/JPEG/TIFF/BMP, DICOM, NIfTI, NRRD and MHA/MHD")
    except ImageReadError:
        raise
    except Exception as e:  # library errors (truncated file, bad header, …) become one clear error type
        raise ImageReadError(path, f"cannot be read ({type(e).__name__}: {e})") from e
    return validate(img)


def validate(img: ImageData) -> ImageData:
    """Refuse what cannot be encoded: empty, 1-pixel, non-finite, or more than 3 spatial axes."""
    arr = img.array
    if arr.size == 0:
        raise ImageReadError(img.source, f"image has no pixels (shape {arr.shape})")
    if min(img.spatial_shape) < 2:
        raise ImageReadError(img.source, f"image of shape {arr.shape} is too small (needs ≥2 pixels per axis)")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ImageReadError(img.source, "image contains NaN or infinite values")
    return img


# ------------------------------------------------------------------------------------------ raster
def _read_raster(path: Path) -> ImageData:
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decode now: truncated files fail here, not later
        mode = im.mode
        if mode in ("P", "PA"):
            im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
        elif mode == "1":
            im = im.convert("L")
        elif mode == "CMYK" or mode == "YCbCr":
            im = im.convert("RGB")
        arr = np.array(im)
        dpi = im.info.get("dpi")
    if arr.ndim == 3:  # H×W×C: drop alpha, gray+alpha → gray
        if arr.shape[2] in (2, 4):
            arr = arr[..., :-1]
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None]
    if arr.shape[0] not in (1, 3):
        raise ImageReadError(path, f"unsupported channel count {arr.shape[0]} (mode {mode})")
    spacing = (25.4 / dpi[1], 25.4 / dpi[0]) if dpi and all(float(d) > 1 for d in dpi) else (1.0, 1.0)
    return ImageData(arr, spacing_affine(spacing), modality=None, source=str(path),
                     meta={"format": "raster", "mode": mode})


# ------------------------------------------------------------------------------------------ NIfTI
def _read_nifti(path: Path) -> ImageData:
    import nibabel as nib

    img = nib.load(str(path))
    shape = img.shape
    # drop trailing singleton axes (X×Y×Z×1), refuse real 4D data
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise ImageReadError(path, f"is a {len(shape)}D image (shape {img.shape}); medlatent encodes 2D images "
                                   "and 3D volumes — split it into 3D volumes first")
    arr = np.asanyarray(img.dataobj).reshape(shape)  # scl_slope/scl_inter applied by nibabel
    if len(shape) == 2:  # a 2D NIfTI: (i, j) → one-channel image
        aff = img.affine
        sp = (float(np.linalg.norm(aff[:3, 0])), float(np.linalg.norm(aff[:3, 1])))
        return ImageData(arr[None], spacing_affine(sp), source=str(path), meta={"format": "nifti2d"})
    return ImageData(arr, np.asarray(img.affine, dtype=np.float64), source=str(path),
                     meta={"format": "nifti"})


# ------------------------------------------------------------------------------------------ ITK
def itk_to_ras_affine(spacing, origin, direction, dims: int) -> np.ndarray:
    """Affine (voxel index → RAS mm) from ITK's LPS spacing/origin/direction."""
    d = np.asarray(direction, dtype=np.float64).reshape(dims, dims)
    a = np.eye(dims + 1)
    a[:dims, :dims] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    a[:dims, dims] = origin
    if dims == 3:
        a[:2] *= -1  # LPS → RAS flips x and y (rows 0 and 1, translation included)
    return a


def _read_itk(path: Path) -> ImageData:
    try:
        import SimpleITK as sitk
    except ImportError as e:
        raise ImageReadError(path, "reading NRRD/MHA needs SimpleITK: pip install 'medlatent[formats]'") from e
    im = sitk.ReadImage(str(path))
    if im.GetNumberOfComponentsPerPixel() not in (1, 3):
        raise ImageReadError(path, f"{im.GetNumberOfComponentsPerPixel()} components per pixel are not supported")
    dims = im.GetDimension()
    arr = sitk.GetArrayFromImage(im)  # reversed axis order: (z, y, x[, c])
    if dims == 4:
        raise ImageReadError(path, f"is a 4D image (size {im.GetSize()}); split it into 3D volumes first")
    if dims == 2:
        arr = np.moveaxis(arr, -1, 0) if arr.ndim == 3 else arr[None]
        sp = im.GetSpacing()
        return ImageData(arr, spacing_affine((sp[1], sp[0])), source=str(path), meta={"format": "itk2d"})
    if arr.ndim != 3:
        raise ImageReadError(path, f"multi-component 3D images are not supported (shape {arr.shape})")
    arr = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))  # → (x, y, z), nibabel's order
    aff = itk_to_ras_affine(im.GetSpacing(), im.GetOrigin(), im.GetDirection(), 3)
    return ImageData(arr, aff, source=str(path), meta={"format": "itk"})
