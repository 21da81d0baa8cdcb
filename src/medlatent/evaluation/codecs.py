"""Classical codecs a latent has to beat on bytes: ``xz -9e`` of the source file and JPEG 2000 of its pixels.

* :func:`xz_bytes` — Python's ``lzma`` at preset ``9 | PRESET_EXTREME`` (what ``xz -9e`` does) of the file(s) as
  they are on disk (gzip ones unpacked): the lossless size anyone gets without knowing the format (from
  :mod:`medlatent.lossless`, re-exported here).
* :func:`j2k_lossless` / :func:`j2k_at_bytes` — JPEG 2000 codestreams (``.j2k``, no JP2 wrapper) through the
  openjpeg library that medlatent already uses to read compressed DICOM (``pylibjpeg-openjpeg``, the
  ``formats`` extra): lossless (reversible 5/3 wavelet), and lossy (9/7 wavelet) at the largest size that fits
  a byte budget, found by bisecting the compression ratio. 2D images are one codestream (RGB with the colour
  transform); volumes are coded slice by slice along their last axis, one ratio for all slices, and their
  bytes summed (JPEG 2000 Part 1 has no third dimension).

The pixels coded are the image's values as read, at :func:`medlatent.evaluation.storage.stored_dtype` (DICOM
after rescale is integral, so CT keeps its HU as int16); images with non-integer values (float NIfTI) have no
JPEG 2000 row (:class:`CodecUnavailable` says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medlatent.evaluation.storage import stored_dtype
from medlatent.lossless import XZ_PRESET, xz_bytes  # noqa: F401 - re-exported: the classical codecs in one place

#: compression ratios searched for a byte budget (1: almost lossless; the top reaches ~100 bytes per megapixel)
RATIO_RANGE = (1.0, 1e5)
#: the smallest plane side openjpeg's fixed 6 resolutions (5 wavelet levels) can code
MIN_SIDE = 32


class CodecUnavailable(ValueError):
    """The codec cannot code this image (library missing, non-integer pixels); the message says which."""


def _openjpeg():
    try:
        import openjpeg
    except ImportError as e:
        raise CodecUnavailable("JPEG 2000 needs pylibjpeg-openjpeg: pip install 'medlatent[formats]'") from e
    return openjpeg


def _planes(arr: np.ndarray, spatial_dims: int) -> tuple[list[np.ndarray], int]:
    """The 2D arrays to code (``H×W`` or ``H×W×3``) and their photometric interpretation for openjpeg."""
    dt = stored_dtype(arr)
    if not np.issubdtype(dt, np.integer):
        raise CodecUnavailable(f"JPEG 2000 codes integer pixels; these are {arr.dtype} with non-integer values")
    arr = arr.astype(dt, copy=False)
    if spatial_dims == 3:
        return [np.ascontiguousarray(arr[:, :, k]) for k in range(arr.shape[2])], 2
    if arr.shape[0] == 3:
        return [np.ascontiguousarray(np.moveaxis(arr, 0, -1))], 1
    if arr.shape[0] != 1:
        raise CodecUnavailable(f"JPEG 2000 rows cover 1- or 3-channel images, not {arr.shape[0]} channels")
    return [np.ascontiguousarray(arr[0])], 2


def _assemble(planes: list[np.ndarray], like: np.ndarray, spatial_dims: int) -> np.ndarray:
    if spatial_dims == 3:
        return np.stack(planes, axis=2).astype(like.dtype)
    p = planes[0]
    return (np.moveaxis(p, -1, 0) if p.ndim == 3 else p[None]).astype(like.dtype)


@dataclass
class J2KResult:
    """A JPEG 2000 coding of one image: ``nbytes`` of codestream(s), the ``ratio`` asked of the encoder (``None``:
    lossless) and the ``decoded`` array in the image's own layout and dtype."""

    nbytes: int
    ratio: float | None
    decoded: np.ndarray


def _code(planes: list[np.ndarray], photometric: int, ratio: float | None) -> tuple[int, list[np.ndarray]]:
    oj = _openjpeg()
    kw = {} if ratio is None else {"compression_ratios": [ratio]}
    try:
        streams = [oj.encode(p, photometric_interpretation=photometric, **kw) for p in planes]
    except RuntimeError as e:  # e.g. a plane under 32 px a side: openjpeg always uses 5 wavelet levels
        raise CodecUnavailable(f"openjpeg cannot code {planes[0].shape} planes ({e}); it needs at least "
                               f"{MIN_SIDE} px a side") from e
    return sum(len(s) for s in streams), [np.asarray(oj.decode(s)) for s in streams]


def j2k_lossless(arr: np.ndarray, spatial_dims: int) -> J2KResult:
    """Lossless JPEG 2000 of ``arr`` (``C×H×W`` or ``X×Y×Z``, values as read); ``decoded`` equals ``arr``."""
    planes, photometric = _planes(arr, spatial_dims)
    n, dec = _code(planes, photometric, None)
    return J2KResult(n, None, _assemble(dec, arr, spatial_dims))


def j2k_at_bytes(arr: np.ndarray, spatial_dims: int, budget: int, steps: int = 24) -> J2KResult:
    """Lossy JPEG 2000 of ``arr`` at the largest size found that is at most ``budget`` bytes.

    The encoder takes a compression ratio, not a size, so the ratio is bisected (on a log scale, ``steps``
    times) between :data:`RATIO_RANGE`. If even the highest ratio does not fit (a tiny image whose headers
    alone exceed the budget), that smallest coding is returned and ``nbytes > budget`` says so.
    """
    if budget < 1:
        raise ValueError(f"a byte budget must be positive, got {budget}")
    planes, photometric = _planes(arr, spatial_dims)
    lo, hi = math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1])
    best: tuple[int, float, list[np.ndarray]] | None = None
    smallest: tuple[int, float, list[np.ndarray]] | None = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        n, dec = _code(planes, photometric, math.exp(mid))
        if smallest is None or n < smallest[0]:
            smallest = (n, math.exp(mid), dec)
        if n <= budget:
            if best is None or n > best[0]:
                best = (n, math.exp(mid), dec)
            hi = mid  # fits: try a lower ratio (more bytes)
        else:
            lo = mid
    if best is None:  # nothing fitted: the highest ratio's coding is the smallest there is
        n, dec = _code(planes, photometric, RATIO_RANGE[1])
        best = min((n, RATIO_RANGE[1], dec), smallest, key=lambda t: t[0])
    n, ratio, dec = best
    return J2KResult(n, ratio, _assemble(dec, arr, spatial_dims))
