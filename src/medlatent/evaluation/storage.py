"""Storage per image: the original against its latent (paper §4.2: "storage costs decrease proportionally with
the downsizing factor, i.e. 64× for 2D and 512× for 3D").

The paper's factors count *spatial positions*: ``f = s**2`` (2D) or ``s**3`` (3D) image positions per latent
position. What you store also depends on the latent channels ``C`` and on bytes per value, so each image gets:

* ``elements`` / ``latent_elements`` — values in the image (all channels) and in ``z`` (``C × latent positions``);
  ``spatial_ratio`` (positions, ≈ ``f``) and ``element_ratio`` (values, ``f / C`` for one-channel images);
* ``raw_bytes`` — the pixel values at their stored width: the array's dtype, or for float arrays that hold
  only integers (DICOM after rescale slope/intercept) the narrowest integer dtype holding them (``stored_dtype``);
* ``file_bytes`` — the file(s) on disk (a DICOM series: all its files);
* ``lossless_bytes`` — zlib (deflate, level 6) of the raw bytes: a codec-independent, reproducible lossless
  reference for any dtype and any dimensionality. Image codecs (PNG, JPEG-LS, JPEG 2000) usually do better
  on images, so this is an upper bound on lossless size;
* ``latent_f16_bytes`` / ``latent_f32_bytes`` — ``z`` as float16 (what ``medlatent encode`` writes by default)
  and float32: ``C × latent positions × 2 (or 4)``, positions after padding to the model's reduction ``s``
  (latent files add a small header on top);
* byte ratios of raw, file and lossless sizes to the float16 latent, and of raw to the float32 latent.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlatent.io.image import ImageData

logger = logging.getLogger(__name__)

_INTEGER_CANDIDATES = (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32)


def stored_dtype(arr: np.ndarray) -> np.dtype:
    """The narrowest dtype that holds ``arr`` losslessly: its own, or an integer one for integral float data."""
    dt = arr.dtype
    if not np.issubdtype(dt, np.floating) or arr.size == 0 or not np.isfinite(arr).all():
        return dt
    lo, hi = float(arr.min()), float(arr.max())
    if not np.array_equal(arr, np.round(arr)):
        return dt
    for cand in _INTEGER_CANDIDATES:
        info = np.iinfo(cand)
        if info.min <= lo and hi <= info.max and np.dtype(cand).itemsize < dt.itemsize:
            return np.dtype(cand)
    return dt


def lossless_bytes(arr: np.ndarray, level: int = 6) -> int:
    """Size of ``arr`` compressed with zlib at ``level`` (C order, at :func:`stored_dtype`)."""
    data = np.ascontiguousarray(arr.astype(stored_dtype(arr), copy=False)).tobytes()
    return len(zlib.compress(data, level))


def latent_grid(spatial_shape: Sequence[int], downsample: int) -> tuple[int, ...]:
    """Latent spatial size of an image: each axis padded up to a multiple of ``downsample``, then divided."""
    return tuple(math.ceil(int(n) / downsample) for n in spatial_shape)


@dataclass
class StorageRecord:
    """Storage numbers of one image (see the module docstring)."""

    image: str
    shape: list[int]
    dtype: str
    stored_dtype: str
    elements: int
    raw_bytes: int
    file_bytes: int | None
    lossless_bytes: int
    latent_shape: list[int]
    latent_elements: int
    latent_f16_bytes: int
    latent_f32_bytes: int
    spatial_ratio: float
    element_ratio: float
    raw_to_f16: float
    raw_to_f32: float
    file_to_f16: float | None
    lossless_to_f16: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def storage_record(img: ImageData, *, spatial_dims: int, downsample: int, C: int,  # noqa: N803 - paper's name
                   file_bytes: int | None = None, name: str = "", compress: bool = True) -> StorageRecord:
    """Storage numbers of one image for a model with ``spatial_dims``, per-axis reduction ``downsample`` and ``C``.

    Args:
        img: the image as read (``C×H×W`` or ``X×Y×Z``).
        file_bytes: size of its file(s) on disk, if known.
        compress: compute ``lossless_bytes`` (zlib); otherwise it is 0 (fast for huge archives).
    """
    where = name or img.source or "image"
    if img.spatial_dims != spatial_dims:
        raise ValueError(f"{where}: a {img.spatial_dims}D image (shape {img.array.shape}) and a {spatial_dims}D "
                         "model; use a model of the image's dimensionality")
    arr = np.asarray(img.array)
    sdt = stored_dtype(arr)
    grid = latent_grid(img.spatial_shape, downsample)
    positions = int(np.prod(img.spatial_shape))
    latent_positions = int(np.prod(grid))
    latent_elements = C * latent_positions
    raw = int(arr.size * sdt.itemsize)
    f16, f32 = 2 * latent_elements, 4 * latent_elements
    packed = lossless_bytes(arr) if compress else 0
    return StorageRecord(
        image=where, shape=list(arr.shape), dtype=str(arr.dtype), stored_dtype=str(sdt), elements=int(arr.size),
        raw_bytes=raw, file_bytes=file_bytes, lossless_bytes=packed, latent_shape=[C, *grid],
        latent_elements=latent_elements, latent_f16_bytes=f16, latent_f32_bytes=f32,
        spatial_ratio=positions / latent_positions, element_ratio=arr.size / latent_elements,
        raw_to_f16=raw / f16, raw_to_f32=raw / f32, file_to_f16=None if file_bytes is None else file_bytes / f16,
        lossless_to_f16=packed / f16)


def totals(records: Sequence[StorageRecord]) -> dict[str, Any]:
    """Sums over images and the ratios of the sums (what an archive of these images would save)."""
    if not records:
        return {}
    s = {k: sum(getattr(r, k) for r in records) for k in
         ("elements", "raw_bytes", "lossless_bytes", "latent_elements", "latent_f16_bytes", "latent_f32_bytes")}
    files = [r.file_bytes for r in records]
    s["file_bytes"] = sum(files) if all(f is not None for f in files) else None
    s["images"] = len(records)
    s["element_ratio"] = s["elements"] / s["latent_elements"]
    s["raw_to_f16"] = s["raw_bytes"] / s["latent_f16_bytes"]
    s["raw_to_f32"] = s["raw_bytes"] / s["latent_f32_bytes"]
    s["file_to_f16"] = None if s["file_bytes"] is None else s["file_bytes"] / s["latent_f16_bytes"]
    s["lossless_to_f16"] = s["lossless_bytes"] / s["latent_f16_bytes"]
    return s


@dataclass
class StorageResult:
    records: list[StorageRecord]
    totals: dict[str, Any]
    failures: list[tuple[str, str]]
    files: dict[str, Path] = field(default_factory=dict)


def storage_report(inputs: Sequence[str | Path], out_dir: str | Path, *, spatial_dims: int, downsample: int,
                   C: int, model_name: str = "", compress: bool = True,  # noqa: N803
                   uneven: str = "refuse") -> StorageResult:
    """Storage numbers of every input; writes ``storage.csv``, ``storage.json`` and ``report.md`` to ``out_dir``.

    Inputs are gathered like :func:`medlatent.evaluation.recon.gather_inputs` (files, folders, CSVs). A file
    that cannot be read is a failure with its reason (also in ``manifest.jsonl``), not skipped.
    """
    from medlatent.batch import MANIFEST, Job, run_jobs
    from medlatent.evaluation.recon import gather_inputs, load_input
    from medlatent.evaluation.report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items, skipped = gather_inputs(inputs)
    records: list[StorageRecord] = []

    def make_job(item):
        def run(img):
            rec = storage_record(img, spatial_dims=spatial_dims, downsample=downsample, C=C,
                                 file_bytes=item.file_bytes, name=item.name, compress=compress)
            records.append(rec)
            return {"raw_to_f16": rec.raw_to_f16}

        return Job(item.name, [], lambda: load_input(item, uneven), run)

    report = run_jobs([make_job(it) for it in items], out, resume=False)
    failures = [(r.item, r.reason) for r in report.failed] + [(str(p), why) for p, why in skipped]
    if skipped:
        with open(out / MANIFEST, "a") as mf:
            for p, why in skipped:
                mf.write(json.dumps({"item": str(p), "status": "failed", "reason": why}) + "\n")
    tot = totals(records)
    files = {"csv": out / "storage.csv", "json": out / "storage.json"}
    rows = [r.to_dict() for r in records]
    with open(files["csv"], "w", newline="") as fh:
        cols = list(StorageRecord.__dataclass_fields__)
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("x".join(map(str, v)) if isinstance(v, list) else "" if v is None else v)
                        for k, v in r.items()})
    model = {"name": model_name, "spatial_dims": spatial_dims, "downsample_per_axis": downsample, "C": C,
             "f": downsample**spatial_dims}
    files["json"].write_text(json.dumps({"model": model, "images": rows, "totals": tot,
                                         "failures": [{"item": i, "reason": r} for i, r in failures]},
                                        indent=2) + "\n")
    table = [{"image": r.image, "shape": r.shape, "dtype": r.stored_dtype, "raw B": r.raw_bytes,
              "file B": r.file_bytes, "zlib B": r.lossless_bytes, "latent": r.latent_shape,
              "f16 B": r.latent_f16_bytes, "f32 B": r.latent_f32_bytes, "positions ÷": round(r.spatial_ratio, 2),
              "values ÷": round(r.element_ratio, 2), "raw/f16": round(r.raw_to_f16, 2),
              "file/f16": None if r.file_to_f16 is None else round(r.file_to_f16, 2),
              "zlib/f16": round(r.lossless_to_f16, 2)} for r in records]
    tables = [("Per image", table)]
    if tot:
        tables.insert(0, ("All images", [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in tot.items()}]))
    notes = [
        f"Model {model_name or '(given sizes)'}: {spatial_dims}D, ÷{downsample} per axis (f = "
        f"{downsample ** spatial_dims}), C = {C}.",
        "`positions ÷` is the paper's spatial downsizing factor f (image positions per latent position); `values ÷` "
        "counts values (image channels × positions against C × latent positions); byte ratios compare the raw pixel "
        "values (at their stored width), the file on disk and zlib-compressed raw bytes with z stored as float16.",
    ]
    if failures:
        notes.append(f"**{len(failures)} input(s) failed**: " + "; ".join(f"`{i}`: {r}" for i, r in failures[:20]))
    files["report"] = write_report(out, "Storage: images against latents", tables, notes=notes)
    return StorageResult(records, tot, failures, files)
