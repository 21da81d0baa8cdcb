"""Writers that consume the same :class:`ImageData` the readers return; all writes are atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlatent.io.atomic import atomic_write
from medlatent.io.image import ImageData

FORMATS = ("nifti", "png", "tiff", "npy")
_SUFFIX = {"nifti": ".nii.gz", "png": ".png", "tiff": ".tif", "npy": ".npy"}


def output_suffix(fmt: str) -> str:
    try:
        return _SUFFIX[fmt]
    except KeyError:
        raise ValueError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}") from None


def default_format(img: ImageData) -> str:
    return "nifti" if img.spatial_dims == 3 else "png"


def write_image(img: ImageData, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``img`` to ``path`` atomically (a killed run leaves no partial file)."""
    path = Path(path)
    fmt = fmt or default_format(img)
    output_suffix(fmt)  # unknown formats fail before anything is written
    with atomic_write(path) as tmp:
        if fmt == "nifti":
            _write_nifti(img, tmp)
        elif fmt in ("png", "tiff"):
            _write_raster(img, tmp, fmt)
        else:  # npy
            with open(tmp, "wb") as fh:
                np.save(fh, img.array)
    return path


def _write_nifti(img: ImageData, path: Path) -> None:
    import nibabel as nib

    arr = img.array
    if img.spatial_dims == 2:  # C×H×W → H×W(×C), spacing on the diagonal
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
        aff = np.eye(4)
        aff[0, 0], aff[1, 1] = img.spacing
    else:
        aff = img.affine
    geometry = img.meta.get("file_geometry")
    if geometry:  # the source file's own layout (e.g. X×Y×1), restored for a faithful round trip
        arr, aff = arr.reshape(geometry["shape"]), np.asarray(geometry["affine"], dtype=np.float64)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    nimg = nib.Nifti1Image(arr, aff)
    nimg.header.set_xyzt_units("mm")
    nib.save(nimg, str(path))


def _write_raster(img: ImageData, path: Path, fmt: str) -> None:
    from PIL import Image

    if img.spatial_dims != 2:
        raise ValueError(f"{fmt.upper()} holds 2D images; write 3D volumes as nifti")
    arr = img.array
    if arr.dtype not in (np.uint8, np.uint16):
        # floats or signed values: map the range onto 16 bits (the intensity scale lives in the latent file)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.round((arr - lo) / (hi - lo or 1.0) * 65535).astype(np.uint16)
    if arr.shape[0] == 3:
        if arr.dtype != np.uint8:
            arr = (arr // 257).astype(np.uint8)  # 8-bit RGB: what PNG readers expect
        im = Image.fromarray(np.ascontiguousarray(np.moveaxis(arr, 0, -1)), mode="RGB")
    elif arr.dtype == np.uint16:
        im = Image.fromarray(np.ascontiguousarray(arr[0]).astype(np.uint16))
    else:
        im = Image.fromarray(np.ascontiguousarray(arr[0]), mode="L")
    dpi = tuple(25.4 / s for s in img.spacing[::-1])
    im.save(path, format="PNG" if fmt == "png" else "TIFF", dpi=dpi)
