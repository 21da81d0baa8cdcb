"""Readers for the formats hospitals and public datasets hold. Each returns :class:`ImageData`.

PNG/JPEG/TIFF/BMP through Pillow; DICOM through pydicom (compressed transfer syntaxes through the pylibjpeg
plugins when installed); DICOM series from a folder (see :mod:`medlatent.io.dicom`); NIfTI through nibabel;
NRRD/MHA/MHD through SimpleITK. Any failure is an :class:`ImageReadError` naming the file and the problem —
never a blank image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medlatent.io.image import FLOAT32_MAX, ImageData, ImageReadError, spacing_affine

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
        uneven: for DICOM series (and multi-frame files) whose slice gaps differ from the median gap by more
            than :data:`medlatent.io.dicom.SLICE_TOLERANCE`: ``"refuse"`` (error) or ``"resample"`` (linear
            interpolation onto a regular grid from the first to the last slice).
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

            img = read_dicom_file(path, uneven=uneven)
        else:
            raise ImageReadError(path, f"unsupported file type {suffix or '(no extension)'!r}; "
                                       "medlatent reads PNG/JPEG/TIFF/BMP, DICOM, NIfTI, NRRD and MHA/MHD")
    except ImageReadError:
        raise
    except RecursionError as e:  # e.g. self-nested metadata
        raise ImageReadError(path, "cannot be read: its metadata is nested too deeply (malformed header)") from e
    except Exception as e:  # library errors (truncated file, bad header, …) become one clear error type
        raise ImageReadError(path, f"cannot be read ({type(e).__name__}: {e})") from e
    return validate(img)


def validate(img: ImageData) -> ImageData:
    """Refuse what cannot be encoded: empty, 1-pixel, non-finite or beyond float32, or without a usable
    geometry (a NaN or singular affine)."""
    arr = img.array
    if arr.size == 0:
        raise ImageReadError(img.source, f"image has no pixels (shape {arr.shape})")
    if min(img.spatial_shape) < 2:
        raise ImageReadError(img.source, f"image of shape {arr.shape} is too small (needs ≥2 pixels per axis)")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageReadError(img.source, "image contains NaN or infinite values")
        peak = float(np.abs(arr).max())
        if peak > FLOAT32_MAX:
            raise ImageReadError(img.source, f"intensities reach {peak:.3g}, beyond float32 (±{FLOAT32_MAX:.3g}), "
                                             "in which the model computes")
    check_affine(img.source, img.affine)
    return img


def check_affine(source: str | Path, affine: np.ndarray) -> None:
    """A usable voxel → world map: finite, every axis with a non-zero scale, axes independent (3D)."""
    aff = np.asarray(affine, dtype=np.float64)
    d = aff.shape[0] - 1
    if not np.isfinite(aff).all():
        raise ImageReadError(source, "affine contains NaN or infinite values: cannot place the image in space")
    scales = np.linalg.norm(aff[:d, :d], axis=0)
    if not (scales > 0).all():
        axes = ", ".join(str(i) for i in np.flatnonzero(scales == 0))
        raise ImageReadError(source, f"affine is singular (zero scale along axis {axes}): cannot determine "
                                     "orientation")
    if d == 3 and abs(float(np.linalg.det(aff[:3, :3] / scales))) < 1e-6:
        raise ImageReadError(source, "affine is singular (its axes are not independent): cannot determine "
                                     "orientation")


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
    """A NIfTI file as a 3D volume, or as a 2D image when it has two axes or one singleton spatial axis
    (``X×Y×1``, ``X×1×Z``, ``1×Y×Z``; trailing 4D singletons dropped first). 2D images keep the file's shape
    and affine in ``meta["file_geometry"]`` so that decoding writes them back as they were."""
    import nibabel as nib

    header = _unchecked_header(path)
    if header is not None:
        _check_header(path, header)
    img: Any = nib.load(str(path))  # a NIfTI image (nibabel types it as any file-based image)
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise ImageReadError(path, f"is a {len(shape)}D image (shape {img.shape}); medlatent encodes 2D images "
                                   "and 3D volumes — split it into 3D volumes first")
    if len(shape) < 2:
        raise ImageReadError(path, f"is a 1D signal (shape {img.shape}); medlatent encodes 2D images and 3D volumes")
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(path, affine)
    arr = np.asanyarray(img.dataobj).reshape(shape)  # scl_slope/scl_inter applied by nibabel
    _check_scaling(path, img, arr)
    geometry = {"shape": [int(n) for n in img.shape], "affine": affine.tolist()}
    plane = [i for i, n in enumerate(shape) if n > 1]
    if len(shape) == 2 or len(plane) == 2:  # a 2D image, possibly stored with a singleton third axis
        axes = [0, 1] if len(shape) == 2 else plane
        sp = tuple(float(np.linalg.norm(affine[:3, a])) for a in axes)
        return ImageData(arr.reshape([shape[a] for a in axes])[None], spacing_affine(sp), source=str(path),
                         meta={"format": "nifti2d", "file_geometry": geometry})
    meta: dict = {"format": "nifti"}
    if shape != tuple(img.shape):  # X×Y×Z×1: written back with its singleton axis
        meta["file_geometry"] = geometry
    return ImageData(arr, affine, source=str(path), meta=meta)


def _unchecked_header(path: Path):
    """The NIfTI-1/2 header as stored: ``nib.load`` repairs zero or negative voxel sizes (to 1 or their absolute
    value) before anyone can see them. ``None`` if it cannot be parsed (``nib.load`` then reports why)."""
    from nibabel.nifti1 import Nifti1Header
    from nibabel.nifti2 import Nifti2Header
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as fh:
            block = fh.read(Nifti2Header.template_dtype.itemsize)
        for cls in (Nifti1Header, Nifti2Header):
            size = cls.template_dtype.itemsize
            if len(block) >= size:
                header = cls(block[:size], check=False)
                if int(header["sizeof_hdr"]) == size:
                    return header
    except Exception:  # damaged: left to nib.load, whose error is reported
        logger.debug("%s: header not parsed before loading", path, exc_info=True)
    return None


def _check_header(path: Path, header) -> None:
    """Refuse sizes and voxel sizes that nibabel would fail on with its own text, or silently repair."""
    ndim = int(header["dim"][0])
    if not 1 <= ndim <= 7:
        return  # nibabel tries the other byte order and reports what it finds
    sizes = [int(n) for n in header["dim"][1 : ndim + 1]]
    if min(sizes) < 1:
        raise ImageReadError(path, f"header dim {sizes} has a size below 1")
    if int(header["sform_code"]) == 0:  # the affine comes from pixdim (qform or the fallback)
        for axis, (n, v) in enumerate(zip(sizes[:3], header["pixdim"][1:4]), start=1):
            if n > 1 and not (np.isfinite(v) and v > 0):
                raise ImageReadError(path, f"pixdim[{axis}] = {float(v):g} is not a positive voxel size (NIfTI "
                                           "requires pixdim[1..3] > 0; readers disagree on what other values mean)")
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if np.isfinite(slope) and slope != 0 and not np.isfinite(inter):
        raise ImageReadError(path, f"scl_inter {inter:g} is not a finite number")


def _check_scaling(path: Path, img, arr: np.ndarray) -> None:
    """scl_slope/scl_inter that push intensities beyond float32, named as the cause."""
    slope: Any
    inter: Any
    slope, inter = (getattr(img.dataobj, name, None) for name in ("slope", "inter"))
    if arr.dtype.kind != "f" or (slope, inter) in ((None, None), (1.0, 0.0)) or not np.isfinite(arr).all():
        return  # unscaled, or NaN/inf in the data itself (validate reports it)
    peak = float(np.abs(arr).max())
    if peak > FLOAT32_MAX:
        raise ImageReadError(path, f"scl_slope {float(slope):g} and scl_inter {float(inter):g} make intensities "
                                   f"overflow float32 (values up to {peak:.3g}; float32 ends at {FLOAT32_MAX:.3g})")


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
