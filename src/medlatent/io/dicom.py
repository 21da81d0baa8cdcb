"""DICOM: single files (2D, multi-frame) and series from folders, in physical units and with geometry.

Pixel values get the modality LUT (rescale slope/intercept: CT in HU); MONOCHROME1 is inverted so that
bright means dense, as in MONOCHROME2. Series are grouped by SeriesInstanceUID and sorted by position along the
slice normal. Slices whose gaps stay within :data:`SLICE_TOLERANCE` of the median gap are stacked as they are
(no interpolation) on the mean spacing, first to last slice, with a logged warning when the gaps vary; larger
deviations (missing slices) are refused, or resampled onto a regular grid that keeps the first and last slice
positions. Header values are checked before use, so a truncated or malformed file is refused with the tag and
the problem, never decoded into a wrong image.
"""

from __future__ import annotations

import logging
import struct
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from medlatent.io.image import FLOAT32_MAX, ImageData, ImageReadError, spacing_affine

logger = logging.getLogger(__name__)

_MODALITY = {"CT": "ct", "MR": "mri", "CR": "xray", "DX": "xray", "DR": "xray", "MG": "xray", "RG": "xray",
             "PX": "xray", "IO": "xray", "XA": "xray", "RF": "xray", "PT": "other", "NM": "other", "US": "other"}
# A gap may differ from the median gap by this fraction and the slices still count as evenly spaced: the
# position rounding and table jitter of real scanners (a few per cent; dicom2nifti also allows 5 %) pass,
# a missing slice (a gap twice the median) does not.
SLICE_TOLERANCE = 0.05
# Gap differences below this fraction are rounding of the positions written in the header: no warning.
_JITTER_NOTICE = 1e-3
_ORTHOGONALITY = 1e-2  # |cos| between the row and column directions accepted as perpendicular (≈0.6°)
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_UNDEFINED_LENGTH = 0xFFFFFFFF
_WARNINGS_LOCK = threading.Lock()


def _modality(ds) -> str | None:
    return _MODALITY.get(str(getattr(ds, "Modality", "")).upper())


# ------------------------------------------------------------------------------------------ reading
@contextmanager
def _pydicom_warnings_logged(path: Path) -> Iterator[None]:
    """Turn pydicom's ``warnings.warn`` about odd values into debug log lines: what matters is checked below
    and refused with a clear error. The lock keeps the process-wide warning filters consistent across the
    loader threads, which read files concurrently."""
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        logger.debug("%s: %s", path, w.message)


def read_dataset(path: Path, *, header_only: bool = False):
    """``pydicom.dcmread`` that refuses truncated and malformed headers instead of returning part of a file."""
    import pydicom
    from pydicom.errors import BytesLengthException

    try:
        with _pydicom_warnings_logged(path):
            ds = pydicom.dcmread(str(path), stop_before_pixels=header_only)
    except RecursionError as e:
        raise ImageReadError(path, "malformed DICOM header: sequences are nested too deeply to parse") from e
    except (struct.error, BytesLengthException) as e:  # an element's tag, length or value cut short
        raise ImageReadError(path, f"truncated or malformed DICOM header: an element cannot be read ({e})") from e
    _check_complete(ds, path, header_only)
    return ds


def _check_complete(ds, path: Path, header_only: bool) -> None:
    """pydicom reads a file cut short without complaint; compare what its elements declare with the file size."""
    size = path.stat().st_size
    meta = getattr(ds, "file_meta", None)
    end: int | None = None
    if getattr(ds, "preamble", None) is not None and meta is not None:
        end = 144 + int(meta.get("FileMetaInformationGroupLength") or 0)  # preamble, DICM, group length
        if size < end:
            raise ImageReadError(path, f"truncated DICOM header: the file ends at byte {size}, inside the file "
                                       f"meta information (which ends at byte {end})")
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
        if tell is None or length is None or length == _UNDEFINED_LENGTH:
            end = None  # a sequence or encapsulated data of undefined length: its end is not declared
            continue
        end = tell + length
        if end > size:
            raise _truncated(path, int(tag), size, tell, length)
    if not header_only and end is not None and 0 < size - end < 12:  # cut inside the next element's header
        raise ImageReadError(path, f"truncated DICOM header: the file ends at byte {size}, inside an element's "
                                   "tag and length")


def _truncated(path: Path, tag: int, size: int, tell: int, length: int) -> ImageReadError:
    from pydicom.datadict import keyword_for_tag
    from pydicom.tag import Tag

    if tag in _PIXEL_TAGS:
        return ImageReadError(path, f"pixel data cannot be decoded: the file is truncated (pixel data holds "
                                    f"{max(size - tell, 0)} of {length} bytes)")
    name = keyword_for_tag(tag) or "a private element"
    return ImageReadError(path, f"truncated DICOM header: the file ends at byte {size}, inside {name} {Tag(tag)}, "
                                f"which needs {tell + length} bytes")


# ------------------------------------------------------------------------------------------ header values
def _numbers(ds, keyword: str, path: Path) -> list[float] | None:
    """The numbers of a DS/IS/US/FL element, or ``None`` when absent or empty.

    Decimal and integer strings are parsed here from the raw bytes, not by pydicom, so that a malformed value is
    one clear error naming the tag (pydicom warns, then fails later with its own text).
    """
    from pydicom.datadict import dictionary_VR
    from pydicom.multival import MultiValue
    from pydicom.tag import Tag

    if keyword not in ds:
        return None
    raw = ds.get_item(keyword)
    value = getattr(raw, "value", None)
    if isinstance(value, bytes) and dictionary_VR(Tag(keyword)) in ("DS", "IS"):
        text = value.decode("ascii", errors="replace").strip(" \x00")
        if not text:
            return None
        try:
            return [float(v) for v in text.split("\\")]
        except ValueError:
            raise ImageReadError(path, f"{keyword} {text!r} is not a number") from None
    value = ds[keyword].value
    if value is None or value == "" or value == b"":
        return None
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ImageReadError(path, f"{keyword} {value!r} is not a number") from None


def _finite(ds, keyword: str, path: Path, count: int) -> list[float] | None:
    """``count`` finite numbers from ``keyword``, ``None`` when absent, or an error naming the tag."""
    values = _numbers(ds, keyword, path)
    if values is None:
        return None
    if len(values) != count:
        raise ImageReadError(path, f"{keyword} has {len(values)} value(s) {_fmt(values)}; it needs {count}")
    if not np.isfinite(values).all():
        raise ImageReadError(path, f"{keyword} {_fmt(values)} is not finite")
    return values


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]" if len(values) > 1 else f"{values[0]:g}"


def _whole(ds, keyword: str, path: Path, default: int | None = None) -> int:
    """A positive whole number (Rows, Columns, NumberOfFrames, …)."""
    values = _finite(ds, keyword, path, 1)
    if values is None:
        if default is None:
            raise ImageReadError(path, f"{keyword} is missing")
        return default
    n = int(values[0])
    if n != values[0] or n < 1:
        raise ImageReadError(path, f"{keyword} {values[0]:g} is invalid (it must be a whole number ≥ 1)")
    return n


def _pixel_spacing(ds, path: Path) -> tuple[float, float]:
    """(row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing; 1 mm when neither is given.

    ``0\\0`` is how some devices write "unknown" (pydicom's own RG1_UNCR.dcm does) and counts as not given;
    a negative, non-finite or half-zero spacing is refused.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = _finite(ds, keyword, path, 2)
        if values is None or values == [0.0, 0.0]:
            continue
        if min(values) <= 0:
            raise ImageReadError(path, f"{keyword} {_fmt(values)} is not positive: pixel sizes must be > 0 mm")
        return values[0], values[1]
    return 1.0, 1.0


def _orientation(ds, path: Path) -> np.ndarray | None:
    """ImageOrientationPatient as two unit vectors (row, column direction), checked for zero and non-orthogonal
    directions, which would otherwise stack the slices at one position."""
    values = _finite(ds, "ImageOrientationPatient", path, 6)
    if values is None:
        return None
    row, col = np.array(values[:3]), np.array(values[3:])
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if nr < 1e-6 or nc < 1e-6:
        raise ImageReadError(path, f"ImageOrientationPatient {_fmt(values)} has a zero direction vector")
    cos = float(row @ col) / (nr * nc)
    if abs(cos) > _ORTHOGONALITY:
        angle = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
        raise ImageReadError(path, f"ImageOrientationPatient {_fmt(values)} is not orthogonal: rows and columns "
                                   f"are {angle:.1f}° apart")
    return np.concatenate([row / nr, col / nc])


def _position(ds, path: Path) -> np.ndarray | None:
    values = _finite(ds, "ImagePositionPatient", path, 3)
    return None if values is None else np.array(values)


# ------------------------------------------------------------------------------------------ pixels
def _check_pixel_module(ds, path: Path) -> None:
    """Rows, Columns, bits and frames must describe the pixel data; pydicom would otherwise fail with its own
    text, or silently split a too-long buffer into extra frames."""
    from pydicom.pixels.utils import get_expected_length

    rows, cols = _whole(ds, "Rows", path), _whole(ds, "Columns", path)
    bits = _whole(ds, "BitsAllocated", path)
    if bits not in (1, 8, 16, 32, 64):
        raise ImageReadError(path, f"BitsAllocated {bits} is invalid (DICOM allows 1, 8, 16, 32 or 64)")
    stored = _whole(ds, "BitsStored", path, default=bits)
    if stored > bits:
        raise ImageReadError(path, f"BitsStored {stored} exceeds BitsAllocated {bits}")
    samples = _whole(ds, "SamplesPerPixel", path, default=1)
    if samples not in (1, 3):
        raise ImageReadError(path, f"SamplesPerPixel {samples} is not supported (1 = gray or 3 = colour)")
    frames = _whole(ds, "NumberOfFrames", path, default=1)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" not in ds or ts is None or ts.is_compressed:
        return
    expected, actual = int(get_expected_length(ds, "bytes")), len(ds.PixelData)
    if actual not in (expected, expected + 1):  # + 1: padding to an even length
        raise ImageReadError(path, f"pixel data holds {actual} bytes, but Rows × Columns × NumberOfFrames "
                                   f"({rows} × {cols} × {frames}, {samples} sample(s) of {bits} bits) need "
                                   f"{expected}: the header does not match the pixel data")


def _no_pixels(ds) -> str:
    """Why a file has no pixel data: cut short (its header says it is an image) or not an image at all."""
    if "Rows" in ds and "Columns" in ds:
        return (f"DICOM header describes a {ds.Rows}×{ds.Columns} image, but the file holds no pixel data "
                "(truncated file?)")
    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    name = str(getattr(sop, "name", "") or "")
    if "Image Storage" in name:
        return (f"truncated DICOM header: the file is a {name} object but ends before its image attributes and "
                "pixel data")
    return f"DICOM file holds no pixel data ({name or 'a report, structure set or other object'})"


def _pixels(ds, path: Path) -> np.ndarray:
    """Pixel array with the modality LUT applied and MONOCHROME1 inverted; frames first if multi-frame."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(path, _no_pixels(ds))
    _check_pixel_module(ds, path)
    try:
        arr = ds.pixel_array
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        hint = (" For compressed DICOM install the decoders: pip install 'medlatent[formats]'"
                if getattr(ts, "is_compressed", False) else "")
        raise ImageReadError(path, f"pixel data cannot be decoded (transfer syntax {name}): {e}.{hint}") from e
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        out = _modality_lut(ds, arr, path)
        return _invert(out) if photometric == "MONOCHROME1" else out
    if photometric.startswith("YBR") or photometric == "RGB":
        return np.asarray(arr)  # pydicom converts YBR to RGB when decoding
    raise ImageReadError(path, f"photometric interpretation {photometric} is not supported")


def _modality_lut(ds, arr: np.ndarray, path: Path) -> np.ndarray:
    """Stored values → physical units: a Modality LUT table, else rescale slope/intercept (top level, or in the
    functional groups of enhanced multi-frame objects)."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(arr, ds))
    slope, inter = _rescale(ds, path)
    if (slope, inter) == (1.0, 0.0):
        return np.asarray(arr)
    lo, hi = float(arr.min()), float(arr.max())
    peak = max(abs(slope * lo + inter), abs(slope * hi + inter))  # Python floats: inf, never a warning
    if peak > FLOAT32_MAX:
        raise ImageReadError(path, f"RescaleSlope {slope:g} and RescaleIntercept {inter:g} make intensities "
                                   f"overflow float32 (values up to {peak:.3g}; float32 ends at {FLOAT32_MAX:.3g})")
    return arr.astype(np.float64) * slope + inter


def _rescale(ds, path: Path) -> tuple[float, float]:
    item = ds
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        item = _functional_group_item(ds, "PixelValueTransformationSequence") or ds
    slope = _finite(item, "RescaleSlope", path, 1)
    inter = _finite(item, "RescaleIntercept", path, 1)
    s, i = (slope or [1.0])[0], (inter or [0.0])[0]
    if s == 0:
        raise ImageReadError(path, "RescaleSlope 0 maps every pixel to the same value")
    return s, i


def _functional_group_item(ds, name: str):
    """The first ``name`` item of the per-frame (first frame), else the shared functional groups."""
    for seq in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        if seq in ds and len(ds[seq].value) and name in ds[seq].value[0] and len(ds[seq].value[0][name].value):
            return ds[seq].value[0][name].value[0]
    return None


def _invert(arr: np.ndarray) -> np.ndarray:
    """MONOCHROME1 → MONOCHROME2 (``max + min − value``), in a type wide enough not to wrap around."""
    hi, lo = arr.max(), arr.min()
    if arr.dtype.kind in "iu":
        return ((int(hi) + int(lo)) - arr.astype(np.int64)).astype(arr.dtype)
    return (float(hi) + float(lo)) - arr.astype(np.float64)


# ------------------------------------------------------------------------------------------ single files
def read_dicom_file(path: Path, *, uneven: str = "refuse") -> ImageData:
    """One DICOM file: a 2D image (``C×H×W``) or a multi-frame volume (``X×Y×Z``, RAS affine)."""
    ds = read_dataset(path)
    arr = _pixels(ds, path)
    mod = _modality(ds)
    frames = _whole(ds, "NumberOfFrames", path, default=1)
    rgb = _whole(ds, "SamplesPerPixel", path, default=1) == 3
    sp = _pixel_spacing(ds, path)
    meta = {"format": "dicom", "photometric": str(getattr(ds, "PhotometricInterpretation", ""))}
    if frames > 1 and not rgb:
        # multi-frame grayscale: frames are slices → X×Y×Z volume
        vol = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))
        geo = _functional_group_geometry(ds, path, frames)
        if geo is None:  # no per-frame positions: a regular stack along the normal of an axial plane
            aff = np.diag([sp[1], sp[0], _frame_spacing(ds, path), 1.0])
            return ImageData(vol, aff, modality=mod, source=str(path), meta=meta)
        positions, ori, sp = geo
        stack = SliceStack.along(positions, ori)
        if stack.duplicates:
            raise ImageReadError(path, stack.duplicates)
        vol, aff = _on_grid(np.ascontiguousarray(vol[..., stack.order]), stack, ori, sp, path, uneven)
        return ImageData(vol, aff, modality=mod, source=str(path), meta=meta)
    if frames > 1:
        raise ImageReadError(path, f"multi-frame colour DICOM ({frames} frames) is not supported")
    img = np.moveaxis(arr, -1, 0) if rgb else arr[None]
    return ImageData(img, spacing_affine(sp), modality=mod, source=str(path), meta=meta)


def _frame_spacing(ds, path: Path) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        values = _finite(ds, keyword, path, 1)
        if values is not None and values[0] != 0:
            return abs(values[0])  # old MR files give SpacingBetweenSlices a sign
    return 1.0


def _functional_group_geometry(ds, path: Path, frames: int
                               ) -> tuple[list[np.ndarray], np.ndarray, tuple[float, float]] | None:
    """Per-frame positions, orientation and pixel spacing of an enhanced multi-frame object, if present."""
    try:
        shared: Any = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
        per_frame = ds.PerFrameFunctionalGroupsSequence

        def item(name: str, frame):
            return frame[name][0] if name in frame else shared[name][0]

        ori_item = item("PlaneOrientationSequence", per_frame[0])
        measures = item("PixelMeasuresSequence", per_frame[0])
        position_items = [item("PlanePositionSequence", f) for f in per_frame]
    except (AttributeError, KeyError, IndexError, TypeError):
        return None
    if len(position_items) != frames:
        raise ImageReadError(path, f"PerFrameFunctionalGroupsSequence has {len(position_items)} items for "
                                   f"{frames} frames")
    ori = _orientation(ori_item, path)
    positions = [_position(it, path) for it in position_items]
    if ori is None or any(p is None for p in positions):
        return None
    return positions, ori, _pixel_spacing(measures, path)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ slice stacks
@dataclass(frozen=True)
class SliceStack:
    """Slices sorted along their normal.

    Attributes:
        order: indices that sort the given slices along the normal.
        dist: sorted positions along the normal (mm).
        origin: position (LPS mm) of the first sorted slice.
    """

    order: np.ndarray
    dist: np.ndarray
    origin: np.ndarray

    @classmethod
    def along(cls, positions: list[np.ndarray], ori: np.ndarray) -> SliceStack:
        normal = np.cross(ori[:3], ori[3:])
        dist = np.array([float(p @ normal) for p in positions])
        order = np.argsort(dist, kind="stable")
        return cls(order, dist[order], np.asarray(positions[order[0]], dtype=np.float64))

    @property
    def gaps(self) -> np.ndarray:
        return np.diff(self.dist)

    @property
    def median_gap(self) -> float:
        return float(np.median(self.gaps))

    @property
    def mean_gap(self) -> float:
        """First to last slice over ``n − 1``: the spacing that puts both ends where they are."""
        return float(self.dist[-1] - self.dist[0]) / (len(self.dist) - 1)

    @property
    def duplicates(self) -> str:
        if np.any(self.gaps < 1e-6):
            return "two or more slices share the same position (duplicate slices)"
        return ""

    @property
    def deviation(self) -> float:
        """Largest relative difference of a gap from the median gap."""
        return float(np.max(np.abs(self.gaps - self.median_gap)) / self.median_gap)

    def uneven(self) -> str:
        """Why the slices are not evenly spaced within :data:`SLICE_TOLERANCE`, or ``""``."""
        if self.deviation <= SLICE_TOLERANCE:
            return ""
        gaps, med = self.gaps, self.median_gap
        worst = int(np.argmax(np.abs(gaps - med)))
        missing = " — missing slices?" if gaps.max() > 1.5 * med else ""
        return (f"uneven slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm (median {med:.3f} mm); "
                f"the gap of {gaps[worst]:.3f} mm between slices {worst + 1} and {worst + 2} of {len(self.dist)} "
                f"(at {self.dist[worst]:.3f} and {self.dist[worst + 1]:.3f} mm along the normal) differs from the "
                f"median by {abs(gaps[worst] - med) / med:.0%}, beyond the {SLICE_TOLERANCE:.0%} tolerance{missing}")


def stack_affine(ori: np.ndarray, sp: tuple[float, float], origin: np.ndarray, step: float) -> np.ndarray:
    """RAS affine of an ``X×Y×Z`` stack: ``i`` along a row (row direction cosine, column spacing), ``j`` down the
    columns, ``k`` along the slice normal by ``step`` mm; DICOM's LPS is converted to RAS."""
    row_cos, col_cos = ori[:3], ori[3:]
    aff = np.eye(4)
    aff[:3, 0] = row_cos * sp[1]
    aff[:3, 1] = col_cos * sp[0]
    aff[:3, 2] = np.cross(row_cos, col_cos) * step
    aff[:3, 3] = origin
    aff[:2] *= -1  # LPS → RAS
    return aff


def _on_grid(vol: np.ndarray, stack: SliceStack, ori: np.ndarray, sp: tuple[float, float], where: Path,
             uneven: str, note: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The sorted ``X×Y×Z`` volume on a regular grid along Z, and its affine.

    Within the tolerance the slices stay as they are, on the mean spacing; beyond it they are refused or (with
    ``uneven="resample"``) interpolated onto a grid from the first to the last slice.
    """
    problem = stack.uneven()
    if not problem:
        if stack.deviation > _JITTER_NOTICE:
            logger.warning("%s: slice gaps vary from %.3f to %.3f mm (up to %.1f%% from the median, within the "
                           "%.0f%% tolerance); stacked without interpolation on their mean spacing %.4f mm",
                           where, stack.gaps.min(), stack.gaps.max(), 100 * stack.deviation,
                           100 * SLICE_TOLERANCE, stack.mean_gap)
        return vol, stack_affine(ori, sp, stack.origin, stack.mean_gap)
    if uneven == "refuse":
        raise ImageReadError(where, f"{problem}; pass --uneven resample to interpolate onto a regular grid{note}")
    vol, step = resample_slices(vol, stack.dist, stack.median_gap)
    logger.warning("%s: %s; resampled onto %d slices %.4f mm apart, first and last slice kept in place",
                   where, problem, vol.shape[-1], step)
    return vol, stack_affine(ori, sp, stack.origin, step)


def resample_slices(vol: np.ndarray, dist: np.ndarray, target_gap: float) -> tuple[np.ndarray, float]:
    """Linear interpolation along Z onto ``n`` evenly spaced positions from ``dist[0]`` to ``dist[-1]``.

    ``n`` is chosen so that the spacing ``(dist[-1] − dist[0]) / (n − 1)`` is the nearest to ``target_gap``;
    the first and last slices keep their positions exactly. Returns the volume (float32) and the spacing.
    """
    extent = float(dist[-1] - dist[0])
    n = max(2, round(extent / target_gap) + 1)
    target = dist[0] + extent * np.arange(n) / (n - 1)
    target[-1] = dist[-1]
    idx = np.clip(np.searchsorted(dist, target, side="right") - 1, 0, len(dist) - 2)
    w = ((target - dist[idx]) / (dist[idx + 1] - dist[idx])).astype(np.float32)
    v = vol.astype(np.float32)
    return v[..., idx] * (1 - w) + v[..., idx + 1] * w, extent / (n - 1)


# ------------------------------------------------------------------------------------------ series
@dataclass
class SeriesFile:
    path: Path
    uid: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    number: int
    problem: str = ""  # malformed geometry in the header: the series that holds this file cannot be read


def scan_dicom_headers(paths: list[Path]) -> tuple[dict[str, list[SeriesFile]], list[tuple[Path, str]]]:
    """Read headers only; group by SeriesInstanceUID. Returns (series, unreadable files with reasons)."""
    groups: dict[str, list[SeriesFile]] = defaultdict(list)
    bad: list[tuple[Path, str]] = []
    for p in paths:
        try:
            ds = read_dataset(p, header_only=True)
        except ImageReadError as e:
            bad.append((p, e.problem))
            continue
        except Exception as e:
            bad.append((p, f"not a readable DICOM file ({type(e).__name__}: {e})"))
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", ""))
        try:
            position, orientation, problem = _position(ds, p), _orientation(ds, p), ""
        except ImageReadError as e:
            position, orientation, problem = None, None, e.problem
        try:
            number = int((_numbers(ds, "InstanceNumber", p) or [0])[0])
        except (ImageReadError, OverflowError, ValueError):  # informational only: never a reason to refuse
            number = 0
        groups[uid or f"no-uid:{p.parent}"].append(SeriesFile(p, uid, position, orientation, number, problem))
    return dict(groups), bad


def is_volume_series(files: list[SeriesFile]) -> bool:
    """More than one file, each with a position and orientation (or with malformed ones, to be reported)."""
    return len(files) > 1 and all(f.problem or (f.position is not None and f.orientation is not None)
                                  for f in files)


def read_dicom_series(folder: Path, *, uneven: str = "refuse", files: list[Path] | None = None) -> ImageData:
    """One volume from the DICOM slices in ``folder`` (or the given ``files`` of one series).

    The array is ``X×Y×Z`` (columns, rows, slices) with a RAS affine, as nibabel/dcm2niix would give.
    Any failure is an :class:`ImageReadError` naming the folder (or the slice) and the problem.
    """
    if uneven not in ("refuse", "resample"):
        raise ValueError(f"uneven must be 'refuse' or 'resample', got {uneven!r}")
    try:
        return _read_series(Path(folder), uneven, files)
    except ImageReadError:
        raise
    except Exception as e:  # library errors become one clear error type, naming the series
        raise ImageReadError(folder, f"DICOM series cannot be read ({type(e).__name__}: {e})") from e


def _read_series(where: Path, uneven: str, files: list[Path] | None) -> ImageData:
    candidates = files if files is not None else sorted(p for p in where.rglob("*") if p.is_file())
    groups, bad = scan_dicom_headers(candidates)
    if not groups:
        raise ImageReadError(where, "holds no readable DICOM files" + _skipped(bad))
    if len(groups) > 1:
        desc = ", ".join(f"{uid[-12:]} ({len(fs)} files)" for uid, fs in groups.items())
        raise ImageReadError(where, f"holds {len(groups)} DICOM series ({desc}); give one series per folder "
                                    "or encode the folder's parent, which splits series automatically")
    series = next(iter(groups.values()))
    malformed = [f for f in series if f.problem]
    if malformed:
        raise ImageReadError(malformed[0].path, malformed[0].problem)
    if len(series) < 2:
        raise ImageReadError(where, "a DICOM series needs at least 2 slices to form a volume" + _skipped(bad))
    if not is_volume_series(series):
        raise ImageReadError(where, "slices lack ImagePositionPatient/ImageOrientationPatient; cannot stack them")
    ori = cast(np.ndarray, series[0].orientation)  # is_volume_series: every slice has position and orientation
    if any(np.abs(cast(np.ndarray, f.orientation) - ori).max() > 1e-3 for f in series):
        raise ImageReadError(where, "slices have different orientations (e.g. a localizer mixed in)")
    stack = SliceStack.along([cast(np.ndarray, f.position) for f in series], ori)
    if stack.duplicates:
        raise ImageReadError(where, stack.duplicates)
    if uneven == "refuse" and stack.uneven():  # before reading any pixels
        raise ImageReadError(where, f"{stack.uneven()}; pass --uneven resample to interpolate onto a regular "
                                    f"grid{_skipped(bad)}")
    series = [series[i] for i in stack.order]
    slices, first = [], None
    for f in series:
        ds = read_dataset(f.path)
        first = first or ds
        px = _pixels(ds, f.path)
        if px.ndim != 2:
            raise ImageReadError(f.path, f"slice is not a single grayscale frame (shape {px.shape})")
        slices.append(px.astype(np.float32) if px.dtype.kind == "f" else px)
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise ImageReadError(where, f"slices have different sizes {sorted(shapes)}")
    vol = np.stack([s.T for s in slices], axis=-1)  # (cols, rows, slices) = X×Y×Z
    vol, aff = _on_grid(vol, stack, ori, _pixel_spacing(first, series[0].path), where, uneven, _skipped(bad))
    if bad:
        logger.warning("%s: skipped %d unreadable files (first: %s: %s)", where, len(bad), bad[0][0], bad[0][1])
    return ImageData(vol, aff, modality=_modality(first), source=str(where),
                     meta={"format": "dicom-series", "slices": len(series)})


def _skipped(bad: list[tuple[Path, str]]) -> str:
    """A note for errors that unreadable files may explain (a truncated slice leaves a gap)."""
    if not bad:
        return ""
    return f" ({len(bad)} unreadable file(s) skipped; first: {bad[0][0].name}: {bad[0][1]})"
