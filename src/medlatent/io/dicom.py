"""DICOM: single files (2D, multi-frame) and series from folders, in physical units and with geometry.

Pixel values get the modality LUT (rescale slope/intercept: CT in HU); MONOCHROME1 is inverted so that
bright means dense, as in MONOCHROME2. Series are grouped by SeriesInstanceUID, sorted by position along the
slice normal, and checked for uneven or missing slices.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlatent.io.image import ImageData, ImageReadError, spacing_affine

logger = logging.getLogger(__name__)

_MODALITY = {"CT": "ct", "MR": "mri", "CR": "xray", "DX": "xray", "DR": "xray", "MG": "xray", "RG": "xray",
             "PX": "xray", "IO": "xray", "XA": "xray", "RF": "xray", "PT": "other", "NM": "other", "US": "other"}
SLICE_TOLERANCE = 0.01  # relative deviation of slice gaps from their median that counts as uneven


def _modality(ds) -> str | None:
    return _MODALITY.get(str(getattr(ds, "Modality", "")).upper())


def _pixels(ds, path: Path) -> np.ndarray:
    """Pixel array with the modality LUT applied and MONOCHROME1 inverted; frames first if multi-frame."""
    from pydicom.pixels import apply_modality_lut

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(path, "DICOM file holds no pixel data (a report, structure set or other object)")
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
        out = apply_modality_lut(arr, ds)
        if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
            out = _functional_group_rescale(ds, out)
        if photometric == "MONOCHROME1":
            out = out.max() + out.min() - out
        return np.asarray(out)
    if photometric.startswith("YBR") or photometric == "RGB":
        return np.asarray(arr)  # pydicom converts YBR to RGB when decoding
    raise ImageReadError(path, f"photometric interpretation {photometric} is not supported")


def _functional_group_rescale(ds, arr: np.ndarray) -> np.ndarray:
    """Rescale slope/intercept of enhanced multi-frame objects (in the shared/per-frame functional groups)."""
    groups = []
    if "PerFrameFunctionalGroupsSequence" in ds:
        groups.append(ds.PerFrameFunctionalGroupsSequence[0])
    if "SharedFunctionalGroupsSequence" in ds:
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for g in groups:
        if "PixelValueTransformationSequence" in g:
            t = g.PixelValueTransformationSequence[0]
            slope, inter = float(t.get("RescaleSlope", 1.0)), float(t.get("RescaleIntercept", 0.0))
            if (slope, inter) != (1.0, 0.0):
                return arr.astype(np.float64) * slope + inter
            return arr
    return arr


def read_dicom_file(path: Path) -> ImageData:
    import pydicom

    ds = pydicom.dcmread(str(path))
    arr = _pixels(ds, path)
    mod = _modality(ds)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    rgb = int(getattr(ds, "SamplesPerPixel", 1)) == 3
    sp = _pixel_spacing(ds)
    meta = {"format": "dicom", "photometric": str(getattr(ds, "PhotometricInterpretation", ""))}
    if frames > 1 and not rgb:
        # multi-frame grayscale: frames are slices → X×Y×Z volume
        vol = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))
        geo = _functional_group_geometry(ds)
        if geo is None:  # no per-frame positions: a regular stack along the normal of an axial plane
            thickness = float(getattr(ds, "SpacingBetweenSlices", 0) or getattr(ds, "SliceThickness", 0) or 1.0)
            aff = np.diag([sp[1], sp[0], thickness, 1.0])
            return ImageData(vol, aff, modality=mod, source=str(path), meta=meta)
        positions, ori, sp = geo
        order, aff, problem = stack_geometry(positions, ori, sp)
        if problem:
            raise ImageReadError(path, problem)
        return ImageData(np.ascontiguousarray(vol[..., order]), aff, modality=mod, source=str(path), meta=meta)
    if frames > 1:
        raise ImageReadError(path, f"multi-frame colour DICOM ({frames} frames) is not supported")
    img = np.moveaxis(arr, -1, 0) if rgb else arr[None]
    return ImageData(img, spacing_affine(sp), modality=mod, source=str(path), meta=meta)


def _functional_group_geometry(ds) -> tuple[list[np.ndarray], np.ndarray, tuple[float, float]] | None:
    """Per-frame positions, orientation and pixel spacing of an enhanced multi-frame object, if present."""
    try:
        shared = ds.SharedFunctionalGroupsSequence[0]
        per_frame = ds.PerFrameFunctionalGroupsSequence

        def item(name: str, frame):
            return frame[name][0] if name in frame else shared[name][0]

        ori = np.array([float(v) for v in item("PlaneOrientationSequence", per_frame[0]).ImageOrientationPatient])
        pm = item("PixelMeasuresSequence", per_frame[0]).PixelSpacing
        positions = [np.array([float(v) for v in item("PlanePositionSequence", f).ImagePositionPatient])
                     for f in per_frame]
        return positions, ori, (float(pm[0]), float(pm[1]))
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def stack_geometry(positions: list[np.ndarray], ori: np.ndarray, sp: tuple[float, float]
                   ) -> tuple[np.ndarray, np.ndarray, str]:
    """Slice order along the normal, RAS affine of the stacked ``X×Y×Z`` volume, and a problem (or "").

    The array's ``i`` runs along a row (the row direction cosine, column spacing), ``j`` down the columns,
    ``k`` along the slice normal; DICOM's LPS is converted to RAS.
    """
    row_cos, col_cos = ori[:3], ori[3:]
    normal = np.cross(row_cos, col_cos)
    dist = np.array([float(p @ normal) for p in positions])
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    gaps = np.diff(dist)
    step = float(np.median(gaps)) if len(gaps) else 1.0
    problem = ""
    if len(gaps) and np.any(gaps < 1e-6):
        problem = "two or more slices share the same position (duplicate slices)"
    elif len(gaps) and float(np.max(np.abs(gaps - step)) / step) > SLICE_TOLERANCE:
        problem = (f"uneven slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm "
                   f"(median {step:.3f} mm){' — missing slices?' if gaps.max() > 1.5 * step else ''}")
    aff = np.eye(4)
    aff[:3, 0] = row_cos * sp[1]
    aff[:3, 1] = col_cos * sp[0]
    aff[:3, 2] = normal * step
    aff[:3, 3] = positions[order[0]]
    aff[:2] *= -1  # LPS → RAS
    return order, aff, problem


def _pixel_spacing(ds) -> tuple[float, float]:
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        v = getattr(ds, tag, None)
        if v is not None and len(v) == 2 and float(v[0]) > 0 and float(v[1]) > 0:
            return float(v[0]), float(v[1])
    return 1.0, 1.0


# ------------------------------------------------------------------------------------------ series
@dataclass
class SeriesFile:
    path: Path
    uid: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    number: int


def scan_dicom_headers(paths: list[Path]) -> tuple[dict[str, list[SeriesFile]], list[tuple[Path, str]]]:
    """Read headers only; group by SeriesInstanceUID. Returns (series, unreadable files with reasons)."""
    import pydicom

    groups: dict[str, list[SeriesFile]] = defaultdict(list)
    bad: list[tuple[Path, str]] = []
    for p in paths:
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except Exception as e:
            bad.append((p, f"not a readable DICOM file ({type(e).__name__}: {e})"))
            continue
        pos = getattr(ds, "ImagePositionPatient", None)
        ori = getattr(ds, "ImageOrientationPatient", None)
        groups[str(getattr(ds, "SeriesInstanceUID", f"no-uid:{p.parent}"))].append(SeriesFile(
            p, str(getattr(ds, "SeriesInstanceUID", "")),
            np.array([float(v) for v in pos]) if pos is not None else None,
            np.array([float(v) for v in ori]) if ori is not None else None,
            int(getattr(ds, "InstanceNumber", 0) or 0),
        ))
    return dict(groups), bad


def is_volume_series(files: list[SeriesFile]) -> bool:
    return len(files) > 1 and all(f.position is not None and f.orientation is not None for f in files)


def read_dicom_series(folder: Path, *, uneven: str = "refuse", files: list[Path] | None = None) -> ImageData:
    """One volume from the DICOM slices in ``folder`` (or the given ``files`` of one series).

    The array is ``X×Y×Z`` (columns, rows, slices) with a RAS affine, as nibabel/dcm2niix would give.
    """
    if uneven not in ("refuse", "resample"):
        raise ValueError(f"uneven must be 'refuse' or 'resample', got {uneven!r}")
    import pydicom

    where = folder
    candidates = files if files is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    groups, bad = scan_dicom_headers(candidates)
    if not groups:
        raise ImageReadError(where, "holds no readable DICOM files")
    if len(groups) > 1:
        desc = ", ".join(f"{uid[-12:]} ({len(fs)} files)" for uid, fs in groups.items())
        raise ImageReadError(where, f"holds {len(groups)} DICOM series ({desc}); give one series per folder "
                                    "or encode the folder's parent, which splits series automatically")
    series = next(iter(groups.values()))
    if len(series) < 2:
        raise ImageReadError(where, "a DICOM series needs at least 2 slices to form a volume")
    if not is_volume_series(series):
        raise ImageReadError(where, "slices lack ImagePositionPatient/ImageOrientationPatient; cannot stack them")
    ori = series[0].orientation
    if any(np.abs(f.orientation - ori).max() > 1e-3 for f in series):
        raise ImageReadError(where, "slices have different orientations (e.g. a localizer mixed in)")
    positions = [f.position for f in series]
    order, aff, problem = stack_geometry(positions, ori, (1.0, 1.0))
    series = [series[i] for i in order]
    if problem.startswith("two or more"):
        raise ImageReadError(where, problem)

    slices, meta_ds = [], None
    for f in series:
        ds = pydicom.dcmread(str(f.path))
        meta_ds = meta_ds or ds
        px = _pixels(ds, f.path)
        if px.ndim != 2:
            raise ImageReadError(f.path, f"slice is not a single grayscale frame (shape {px.shape})")
        slices.append(px.astype(np.float32) if px.dtype.kind == "f" else px)
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise ImageReadError(where, f"slices have different sizes {sorted(shapes)}")
    vol = np.stack([s.T for s in slices], axis=-1)  # (cols, rows, slices) = X×Y×Z
    sp = _pixel_spacing(meta_ds)
    _, aff, _ = stack_geometry(positions, ori, sp)
    if problem:
        if uneven == "refuse":
            raise ImageReadError(where, problem + "; pass --uneven resample to interpolate onto a regular grid")
        logger.warning("%s: %s; resampling", where, problem)
        normal = np.cross(ori[:3], ori[3:])
        dist = np.array([float(f.position @ normal) for f in series])
        step = float(np.median(np.diff(dist)))
        vol, _ = _resample_slices(vol, dist, step)
    if bad:
        logger.warning("%s: skipped %d unreadable files (first: %s)", where, len(bad), bad[0][0])
    return ImageData(vol, aff, modality=_modality(meta_ds), source=str(where),
                     meta={"format": "dicom-series", "slices": len(series)})


def _resample_slices(vol: np.ndarray, dist: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation along Z onto positions ``dist[0] + k·step``."""
    n = int(np.floor((dist[-1] - dist[0]) / step + 1e-6)) + 1
    target = dist[0] + step * np.arange(n)
    idx = np.clip(np.searchsorted(dist, target, side="right") - 1, 0, len(dist) - 2)
    w = ((target - dist[idx]) / (dist[idx + 1] - dist[idx])).astype(np.float32)
    v = vol.astype(np.float32)
    out = v[..., idx] * (1 - w) + v[..., idx + 1] * w
    return out, target
