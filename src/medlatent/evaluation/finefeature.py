"""A reproducible fine-feature detection task built offline from real images (a stand-in for the paper's
calcification / fracture CAD tasks, §4.1, when the clinical datasets are not at hand).

Patches are cut from real images (2D images, slices of volumes, or 3D sub-volumes); half of them (label 1)
receive one small, faint synthetic finding at a recorded position, the rest (label 0) are left unaltered:

* ``calcification`` — a microcalcification-like cluster: ``cluster_count`` single bright pixels/voxels within a
  disc/ball of radius ``size`` around the centre, each raised by ``contrast``;
* ``nodule`` — a small low-contrast Gaussian blob of peak ``contrast`` and σ = ``size`` (cut at 3σ);
* ``mixed`` — either, at random.

Each patch is min–max normalised to [0, 1] and ``contrast`` is a fraction of that range. Findings are only
placed where they fit under the patch maximum, so the patch's minimum and maximum — and hence the per-image
min–max normalisation medlatent applies — are the same with and without the finding: the only cue is the
finding itself. Patches are written as 16-bit PNG (2D) or float32 NIfTI (3D), with a CSV manifest
(``path,label,split,source``) that :func:`medlatent.evaluation.cad.run_cad` consumes and a ``findings.json``
recording each patch's origin and findings. Everything is a function of the seed.

Labels are drawn independently of where a patch comes from, so patches of one source image may sit in
different splits without leaking labels (the task is about the inserted findings, not about the anatomy).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlatent.evaluation.cad import CADConfig, CADResult, default_methods, run_cad, write_cad_table
from medlatent.evaluation.classifiers import check_classifier

logger = logging.getLogger(__name__)

FINDINGS = ("calcification", "nodule", "mixed")
# tries for a patch with content / for a finding position that fits under the patch maximum
PATCH_TRIES = 100
POSITION_TRIES = 200


@dataclass(frozen=True)
class FineFeatureSpec:
    """Parameters of the generated task.

    Attributes:
        spatial_dims: 2 (patches of images or of volume slices) or 3 (sub-volumes of volumes).
        patch_size: patch edge in pixels/voxels.
        n_patches: number of patches (half get a finding).
        finding: ``calcification``, ``nodule`` or ``mixed``.
        contrast: intensity added at a finding's peak, as a fraction of the patch's [0, 1] range.
        size: nodule σ, or calcification cluster radius, in pixels/voxels.
        cluster_count: bright pixels per calcification cluster.
        splits: fractions of train, val and test (stratified by label).
        min_std: patches whose std (in [-1, 1] units) is below this are background and skipped.
        seed: everything is a function of it.
    """

    spatial_dims: int = 2
    patch_size: int = 64
    n_patches: int = 200
    finding: str = "calcification"
    contrast: float = 0.1
    size: float = 2.0
    cluster_count: int = 5
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2)
    min_std: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", tuple(float(f) for f in self.splits))
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.finding not in FINDINGS:
            raise ValueError(f"finding must be one of {', '.join(FINDINGS)}, got {self.finding!r}")
        if not 0 < self.contrast <= 1:
            raise ValueError(f"contrast must be in (0, 1] (a fraction of the patch range), got {self.contrast}")
        if self.size <= 0 or self.cluster_count < 1:
            raise ValueError(f"size must be > 0 and cluster_count ≥ 1, got {self.size} and {self.cluster_count}")
        if self.patch_size < 2 * self.margin + 1:
            raise ValueError(f"patch_size {self.patch_size} is too small for findings of size {self.size} "
                             f"(needs ≥ {2 * self.margin + 1})")
        d = self.spatial_dims
        r = int(math.floor(self.size))
        lattice = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * d, indexing="ij"), -1).reshape(-1, d)
        if self.finding != "nodule" and int((np.square(lattice).sum(1) <= self.size**2).sum()) < self.cluster_count:
            raise ValueError(f"a cluster of radius {self.size} holds fewer than cluster_count={self.cluster_count} "
                             "distinct pixels; raise size or lower cluster_count")
        if self.n_patches < 6:
            raise ValueError(f"n_patches must be ≥ 6 (both classes in every split), got {self.n_patches}")
        if len(self.splits) != 3 or min(self.splits) < 0 or self.splits[0] <= 0 or self.splits[2] <= 0:
            raise ValueError(f"splits must be three fractions (train, val, test) with train and test > 0, "
                             f"got {self.splits}")

    @property
    def margin(self) -> int:
        """Distance a finding's centre keeps from the patch border (its footprint's radius)."""
        return int(math.ceil(3 * self.size))


@dataclass
class FineFeatureDataset:
    """What :func:`make_finefeature_dataset` wrote: the CSV, ``findings.json`` and one record per patch."""

    csv_path: Path
    findings_path: Path
    records: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ sources
def source_planes(path: str | Path, spatial_dims: int) -> list[np.ndarray]:
    """Arrays patches are cut from, in [-1, 1] after medlatent's preprocessing (volumes in RAS).

    ``spatial_dims=2``: a 2D image gives itself; a volume gives its slices along the last (S) axis.
    ``spatial_dims=3``: a volume gives itself; 2D images give nothing.
    """
    from medlatent.io.readers import read_image
    from medlatent.preprocessing import preprocess

    img = read_image(path)
    x, _ = preprocess(img, spatial_dims=img.spatial_dims, in_channels=1, downsample=1)
    x = x[0]
    if spatial_dims == 3:
        return [x] if x.ndim == 3 else []
    return [x] if x.ndim == 2 else [np.ascontiguousarray(x[..., k]) for k in range(x.shape[-1])]


def _sources(source: "str | Path | Sequence[str | Path]") -> list[Path]:
    from medlatent.io.discover import discover

    paths = [source] if isinstance(source, (str, Path)) else list(source)
    items, skipped = discover([Path(p) for p in paths])
    for p, why in skipped:
        logger.warning("%s: skipped (%s)", p, why)
    return sorted(it.source for it in items)


def unit(patch: np.ndarray) -> np.ndarray:
    """Min–max to [0, 1] (float64)."""
    p = patch.astype(np.float64)
    lo, hi = p.min(), p.max()
    return (p - lo) / (hi - lo) if hi > lo else np.zeros_like(p)


def crop(plane: np.ndarray, start: Sequence[int], size: int) -> np.ndarray:
    return plane[tuple(slice(s, s + size) for s in start)]


# ------------------------------------------------------------------------------------------ findings
def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    return list(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))


def finding_map(shape: tuple[int, ...], finding: Mapping[str, Any]) -> np.ndarray:
    """The intensity a recorded finding adds to a patch of ``shape`` (0 outside its footprint)."""
    out = np.zeros(shape, dtype=np.float64)
    if finding["kind"] == "calcification":
        for p in finding["pixels"]:
            out[tuple(p)] = finding["amplitude"]
        return out
    sigma = finding["sigma"]
    r2 = sum((g - c) ** 2 for g, c in zip(_grid(shape), finding["center"]))
    blob = finding["amplitude"] * np.exp(-r2 / (2 * sigma**2))
    blob[r2 > (3 * sigma) ** 2] = 0.0  # a finite footprint: nothing changes beyond 3σ
    return blob


def insert_finding(patch: np.ndarray, rng: np.random.Generator, spec: FineFeatureSpec
                   ) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Add one finding to a [0, 1] patch where it fits under the maximum (so min and max are unchanged).

    Returns:
        ``(patch with finding, record)``, or ``None`` when no position fits (the caller takes another patch).
        The record holds ``kind``, ``center``, ``amplitude`` and ``sigma`` (nodule) or ``pixels`` (calcification).
    """
    kind = spec.finding if spec.finding != "mixed" else ("calcification", "nodule")[int(rng.integers(0, 2))]
    shape, m = patch.shape, spec.margin
    for _ in range(POSITION_TRIES):
        center = [int(rng.integers(m, n - m)) for n in shape]
        if kind == "nodule":
            rec: dict[str, Any] = {"kind": kind, "center": center, "amplitude": spec.contrast, "sigma": spec.size}
        else:
            pixels: list[list[int]] = []
            while len(pixels) < spec.cluster_count:  # distinct points in the disc/ball of radius `size`
                off = rng.uniform(-spec.size, spec.size, size=len(shape))
                p = [c + int(round(o)) for c, o in zip(center, off)]
                if float(np.sum(np.square(np.subtract(p, center)))) <= spec.size**2 and p not in pixels:
                    pixels.append(p)
            rec = {"kind": kind, "center": center, "amplitude": spec.contrast, "pixels": pixels}
        add = finding_map(shape, rec)
        if np.all(patch + add <= 1.0):
            return np.minimum(patch + add, 1.0), rec
    return None


# ------------------------------------------------------------------------------------------ generator
def _stratified_splits(labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> list[str]:
    out = [""] * len(labels)
    total = sum(fractions)
    for lab in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        n = len(idx)
        n_train = max(1, int(round(n * fractions[0] / total)))
        n_val = int(round(n * fractions[1] / total))
        n_val = min(n_val, n - n_train - 1)
        for k, i in enumerate(idx):
            out[i] = "train" if k < n_train else "val" if k < n_train + n_val else "test"
    return out


def make_finefeature_dataset(source: "str | Path | Sequence[str | Path]", out_dir: str | Path,
                             spec: FineFeatureSpec | None = None) -> FineFeatureDataset:
    """Cut patches from real images, insert findings into half, write the files and the CSV manifest.

    Args:
        source: image files and/or folders (walked recursively; DICOM series become volumes).
        out_dir: receives ``patches/``, ``finefeature.csv`` and ``findings.json``.
        spec: task parameters (see :class:`FineFeatureSpec`).

    Raises:
        ValueError: no usable source (too small, wrong dimensionality, or only background).
    """
    from medlatent.io.atomic import atomic_write
    from medlatent.io.image import ImageData, spacing_affine
    from medlatent.io.writers import write_image

    spec = spec or FineFeatureSpec()
    rng = np.random.default_rng(spec.seed)
    planes: list[tuple[Path, int, np.ndarray]] = []
    for path in _sources(source):
        for k, plane in enumerate(source_planes(path, spec.spatial_dims)):
            if min(plane.shape) >= spec.patch_size:
                planes.append((path, k, plane))
    if not planes:
        raise ValueError(f"{source}: no {spec.spatial_dims}D image or slice of at least {spec.patch_size} per axis "
                         "to cut patches from")

    n_pos = spec.n_patches // 2
    labels = rng.permutation(np.array([1] * n_pos + [0] * (spec.n_patches - n_pos)))
    splits = _stratified_splits(labels, spec.splits, rng)
    out = Path(out_dir)
    (out / "patches").mkdir(parents=True, exist_ok=True)
    suffix = ".png" if spec.spatial_dims == 2 else ".nii.gz"
    records: list[dict[str, Any]] = []
    for i, label in enumerate(labels):
        for _ in range(PATCH_TRIES):
            path, k, plane = planes[int(rng.integers(0, len(planes)))]
            start = [int(rng.integers(0, n - spec.patch_size + 1)) for n in plane.shape]
            raw = crop(plane, start, spec.patch_size)
            if raw.std() < spec.min_std:
                continue
            patch, findings = unit(raw), []
            if label:
                hit = insert_finding(patch, rng, spec)
                if hit is None:
                    continue
                patch, rec = hit
                findings.append(rec)
            break
        else:
            raise ValueError(f"{source}: could not find a patch with content (std ≥ {spec.min_std}) where a "
                             f"finding fits after {PATCH_TRIES} tries; lower min_std or contrast")
        name = f"patches/{i:05d}{suffix}"
        if spec.spatial_dims == 2:  # 16-bit PNG: contrasts of 1/65535 survive
            arr = np.round(patch * 65535).astype(np.uint16)[None]
            write_image(ImageData(arr, spacing_affine((1.0, 1.0))), out / name, "png")
        else:
            write_image(ImageData(patch.astype(np.float32), np.eye(4)), out / name, "nifti")
        records.append({"path": name, "label": int(label), "split": splits[i], "source": str(path), "plane": k,
                        "start": start, "findings": findings})

    csv_path, findings_path = out / "finefeature.csv", out / "findings.json"
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "source"])
        for r in records:
            w.writerow([r["path"], r["label"], r["split"], Path(r["source"]).name])
    with atomic_write(findings_path) as tmp:
        tmp.write_text(json.dumps({"spec": dataclasses.asdict(spec), "patches": records}, indent=1), encoding="utf-8")
    logger.info("wrote %d patches (%d with findings) to %s", len(records), n_pos, out)
    return FineFeatureDataset(csv_path, findings_path, records)


# ------------------------------------------------------------------------------------------ the task
@dataclass
class FineFeatureResult:
    dataset: FineFeatureDataset
    cad: CADResult
    files: dict[str, Path]


def run_finefeature(source: "str | Path | Sequence[str | Path]", out_dir: str | Path,
                    models: "Mapping[str, Any] | Sequence[Any] | Any | None" = None, *,
                    spec: FineFeatureSpec | None = None, config: CADConfig | None = None,
                    kinds: Sequence[str] = ("image", "latent", "interp"), interp: str = "bicubic",
                    interp_f: Sequence[int] = (), cache_dir: str | Path | None = None,
                    latent_channels: str = "mean") -> FineFeatureResult:
    """Generate the task, then run CAD on image / MedVAE latent (per model, e.g. f=16 and f=64) / interpolation.

    The classifier input size is the patch size. Writes ``out_dir/data/`` (the task) and
    ``out_dir/finefeature.{md,csv,json}`` (the AUROC table, with warnings when the test split is small or the
    full-resolution reference is at chance: then no row means anything).
    """
    spec = spec or FineFeatureSpec()
    config = dataclasses.replace(config or CADConfig(), size=spec.patch_size)
    methods = default_methods(models, kinds=kinds, interp=interp, interp_f=interp_f, spatial_dims=spec.spatial_dims,
                              latent_channels=latent_channels)
    check_classifier(config.classifier_for(spec.spatial_dims), spec.spatial_dims, config.pretrained,
                     config.pretrained_weights)  # before the task is generated: fail fast
    dataset = make_finefeature_dataset(source, Path(out_dir) / "data", spec)
    task = f"{spec.finding} (contrast {spec.contrast:g}, size {spec.size:g})"
    result = run_cad(dataset.csv_path, methods, config=config, cache_dir=cache_dir, task=task,
                     spatial_dims=spec.spatial_dims)
    files = write_cad_table(result, out_dir, stem="finefeature", title="Fine-feature detection")
    return FineFeatureResult(dataset, result, files)
