"""Reconstruction quality on your own images, the way the paper reports it (§4.3; Appendix Tables 5–7, Figure 4).

For every input image (files and folders, or a CSV of ``path[,modality]``):

1. it is read and preprocessed exactly as ``medlatent encode`` does (:func:`medlatent.preprocessing.preprocess`:
   intensity map to [-1, 1], RAS for volumes, edge padding to the model's per-axis reduction ``s``);
2. every method reconstructs the preprocessed tensor (padded to its own multiple): each model (posterior mean
   ``z``, rounded through float16 as latent files store it unless told otherwise, decoded; the tiled engine
   takes images too large for one tile), the interpolation baselines at each model's ``s``
   (:mod:`medlatent.evaluation.baselines`), the equal-values rows (an interpolation at ``f / C`` for every
   model with ``C > 1``: as many values stored as its latent; ``interp_f`` for any other factor) and any extra
   method (a natural-image KL-VAE/VQ-GAN, a 2D model slice by slice on volumes);
3. each reconstruction is put back on the original grid (padding removed, orientation undone) and compared with
   the original image.

**Metric convention.** PSNR and MS-SSIM are computed on arrays mapped to [0, 1] by the image's own intensity
map (:func:`medlatent.report.to_unit`: 2D and MRI min–max, CT the HU window [-1000, 1000], values outside
clipped), with data range 1 — the same convention as ``medlatent roundtrip``. MS-SSIM uses as many of its five
scales as the image size allows (:func:`medlatent.metrics.ms_ssim`); volumes use 3D windows. ROI PSNR (the
paper's fine-grained wrist-fracture evaluation) is the PSNR of the two [0, 1] arrays cropped to a box.

**Statistics protocol (paper Tables 5–6).** The paper reports "mean and standard deviation across four runs with
different random seeds" of a random sample of 1000 images (2D), and a single random sample of 100 volumes (3D).
Here, with ``samples=N`` and ``seeds=K``: for each seed ``k = 0 … K-1`` a generator ``numpy.random.default_rng(k)``
draws ``N`` images from the pool of inputs — *without replacement* when ``N`` is smaller than the pool (a random
subset, as in the paper), otherwise a *bootstrap* sample of the pool's size (with replacement), so that the
seeds still differ; ``replace`` forces either. Each seed's value is the mean of the per-image metric over its
sample (failed images and NaN MS-SSIM of too-small images left out); the summary is the mean ± sample standard
deviation (``ddof=1``) of the ``K`` seed means (``sd`` is ``None`` for one seed). Each image is evaluated once
(its metrics are deterministic), only the images some seed drew. The mean ± sd over all evaluated images is
reported as well (``over_images``). Paper-like settings: ``samples=1000, seeds=4`` (2D), ``samples=100, seeds=1``
(3D).

**Values stored** are the numbers a method keeps per image (a latent ``C × ∏ n/s``, an interpolation its shrunk
image), reported as a fraction of the image's pixels. **Warnings** (``summary["warnings"]``, the report's
"Warnings" section) flag summaries over fewer than :data:`MIN_IMAGES` images, a single seed (its sd reads
"n/a (1 seed)") and failed inputs.

Outputs in ``out_dir``: ``results.csv`` (one row per image × method), ``roi_results.csv`` (per box, when ROIs
are given), ``samples.json`` (the images each seed drew), ``summary.json``, ``figures/*.png`` (examples and bar
charts) and ``report.md``; ``manifest.jsonl`` records every image's outcome. A file that cannot be read or
evaluated is a failure with its reason (naming the file), never skipped silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medlatent.evaluation.baselines import (
    SLICE_BICUBIC,
    Method,
    interpolation_at,
    interpolation_methods,
    model_method,
    per_axis_factor,
    slicewise_method,
)
from medlatent.interpolation import stored_values
from medlatent.latentfile import tensor_bytes
from medlatent.metrics import ms_ssim, psnr

if TYPE_CHECKING:
    from medlatent.batch import ItemResult
    from medlatent.engine.tiled import TileSettings
    from medlatent.evaluation.baselines import NaturalImageAutoencoder
    from medlatent.io.image import ImageData
    from medlatent.model.autoencoder import MedVAE
    from medlatent.preprocessing import Preprocessing

logger = logging.getLogger(__name__)

CONVENTION = ("PSNR (dB) and MS-SSIM on images mapped to [0, 1] by each image's own intensity map (2D/MRI "
              "min–max, CT HU window [-1000, 1000], clipped), data range 1, on the original grid; "
              "ROI PSNR on the same arrays cropped to each box.")
METRICS = ("psnr", "ms_ssim", "roi_psnr")


class EvaluationInputError(ValueError):
    """An input list, CSV or ROI file is unusable; the message names the file (and line)."""


# ===================================================================================== inputs
@dataclass
class EvalInput:
    """One image to evaluate: a file or a DICOM series folder, with an optional modality from a CSV."""

    name: str
    paths: list[Path]
    kind: str = "file"
    modality: str | None = None

    @property
    def source(self) -> Path:
        return self.paths[0].parent if self.kind == "dicom-series" else self.paths[0]

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


def _read_csv_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a CSV with a header, or of a headerless CSV whose first column is the path."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationInputError(f"{path}: cannot read the CSV ({e})") from e
    rows = [r for r in csv.reader(text.splitlines())]
    numbered = [(i + 1, [c.strip() for c in r]) for i, r in enumerate(rows) if r and any(c.strip() for c in r)]
    if not numbered:
        raise EvaluationInputError(f"{path}: the CSV is empty")
    header = [c.lower() for c in numbered[0][1]]
    if "path" in header:
        body = numbered[1:]
    else:
        header = ["path", "modality", "x0", "y0", "x1", "y1", "z0", "z1"][: len(numbered[0][1])]
        body = numbered
    out = []
    for line, cells in body:
        out.append((line, {h: (cells[i] if i < len(cells) else "") for i, h in enumerate(header)}))
    return out


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def gather_inputs(inputs: Sequence[str | Path]) -> tuple[list[EvalInput], list[tuple[Path, str]]]:
    """Images to evaluate, and inputs that were skipped with the reason (missing, unsupported, unreadable).

    Args:
        inputs: image files, folders (walked recursively, DICOM series grouped, as ``medlatent encode`` does)
            and CSV files with a ``path`` column and an optional ``modality`` column (relative paths are taken
            from the CSV's folder; a headerless CSV is ``path[,modality]``).
    """
    from medlatent.io.discover import discover

    items: list[EvalInput] = []
    skipped: list[tuple[Path, str]] = []
    plain: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_file() and p.suffix.lower() == ".csv":
            for line, row in _read_csv_rows(p):
                if not row.get("path"):
                    raise EvaluationInputError(f"{p}, line {line}: no path")
                target = _resolve(p.parent, row["path"])
                found, bad = discover([target])
                skipped += bad
                mod = (row.get("modality") or "").strip().lower() or None
                rel = Path(row["path"])
                for it in found:  # names keep the CSV's relative folders (figure names, results rows)
                    name = (rel / it.name if target.is_dir() else rel.parent / it.name).as_posix()
                    items.append(EvalInput(name, it.paths, it.kind, mod))
        else:
            plain.append(p)
    if plain:
        found, bad = discover(plain)
        skipped += bad
        items += [EvalInput(it.name, it.paths, it.kind) for it in found]
    names: dict[str, int] = {}
    for it in items:  # two inputs with the same relative name (two folders) must not share outputs
        k = names.get(it.name, 0)
        names[it.name] = k + 1
        if k:
            it.name = f"{it.name}~{k}"
    return items, skipped


def load_input(item: EvalInput, uneven: str = "refuse") -> "ImageData":
    """Read one input (a file, or the files of one DICOM series)."""
    from medlatent.io.readers import read_image, validate

    if item.kind == "dicom-series":
        from medlatent.io.dicom import read_dicom_series

        return validate(read_dicom_series(item.paths[0].parent, uneven=uneven, files=item.paths))
    return read_image(item.paths[0], uneven=uneven)


# ===================================================================================== regions of interest
@dataclass(frozen=True)
class Box:
    """A half-open box in pixel/voxel indices of the image as stored in its file.

    2D: ``x`` is the column and ``y`` the row (``array[:, y0:y1, x0:x1]`` of a ``C×H×W`` image). 3D: ``x, y, z``
    are the voxel indices ``i, j, k`` of the file's ``X×Y×Z`` array (``array[x0:x1, y0:y1, z0:z1]``), before
    medlatent reorients anything.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    z0: int | None = None
    z1: int | None = None
    where: str = ""

    def crop(self, arr: np.ndarray, spatial_dims: int) -> np.ndarray:
        """The box's part of a ``C×H×W`` image or ``X×Y×Z`` volume; errors name the ROI file line."""
        if spatial_dims == 2:
            h, w = arr.shape[-2:]
            ok = 0 <= self.x0 < self.x1 <= w and 0 <= self.y0 < self.y1 <= h
            if not ok:
                raise EvaluationInputError(f"{self.where}: box x {self.x0}:{self.x1}, y {self.y0}:{self.y1} is empty "
                                           f"or outside the {h}×{w} image (x is the column, y the row)")
            return arr[..., self.y0:self.y1, self.x0:self.x1]
        if self.z0 is None or self.z1 is None:
            raise EvaluationInputError(f"{self.where}: a 3D image needs z0 and z1 in its box")
        shape = arr.shape[-3:]
        spans = [(self.x0, self.x1), (self.y0, self.y1), (self.z0, self.z1)]
        if not all(0 <= a < b <= n for (a, b), n in zip(spans, shape)):
            raise EvaluationInputError(f"{self.where}: box {spans} is empty or outside the volume of shape {shape}")
        return arr[self.x0:self.x1, self.y0:self.y1, self.z0:self.z1]


def read_rois(path: str | Path) -> dict[Path, list[Box]]:
    """Boxes per image from a CSV ``path, x0, y0, x1, y1[, z0, z1]`` (header optional; several rows per image).

    Paths are resolved (relative ones from the CSV's folder) and matched to the resolved input paths (the folder,
    for a DICOM series). Coordinates are integer pixel indices of the original image, half-open (see :class:`Box`).
    """
    path = Path(path)
    out: dict[Path, list[Box]] = {}
    for line, row in _read_csv_rows(path):
        where = f"{path}, line {line}"
        try:
            vals = {k: int(float(row[k])) for k in ("x0", "y0", "x1", "y1")}
            for k in ("z0", "z1"):
                vals[k] = int(float(row[k])) if row.get(k) else None
        except (KeyError, ValueError) as e:
            raise EvaluationInputError(f"{where}: expected path,x0,y0,x1,y1[,z0,z1] with integer coordinates, "
                                       f"got {row}") from e
        if not row.get("path"):
            raise EvaluationInputError(f"{where}: no path")
        out.setdefault(_resolve(path.parent, row["path"]).resolve(), []).append(Box(**vals, where=where))
    return out


def roi_psnr(a: np.ndarray, b: np.ndarray, box: Box, spatial_dims: int) -> float:
    """PSNR (data range 1) of two [0, 1] arrays cropped to ``box``."""
    return psnr(box.crop(a, spatial_dims), box.crop(b, spatial_dims))


# ===================================================================================== statistics
@dataclass
class Sampling:
    """The images each seed drew (indices into the pool) and how they were drawn."""

    draws: list[np.ndarray]
    replace: bool
    samples: int
    seeds: list[int]

    def union(self) -> list[int]:
        return sorted({int(i) for d in self.draws for i in d})


def draw_samples(pool: int, samples: int = 0, seeds: int = 3, replace: bool | None = None) -> Sampling:
    """Per seed ``k`` in ``0 … seeds-1``, ``samples`` indices into a pool of ``pool`` images (see module docstring).

    Args:
        pool: number of images available.
        samples: images per seed; ``0`` (or anything ≥ ``pool``) means the pool size.
        seeds: number of seeds.
        replace: ``None``: without replacement when ``samples < pool``, bootstrap otherwise.
    """
    if pool < 0 or samples < 0 or seeds < 1:
        raise ValueError(f"need pool ≥ 0, samples ≥ 0 and seeds ≥ 1, got {pool}, {samples}, {seeds}")
    n = pool if samples == 0 else samples
    if replace is None:
        replace = n >= pool
    if not replace and n > pool:
        raise ValueError(f"cannot draw {n} distinct images from {pool}; allow replacement or draw fewer")
    draws = []
    for k in range(seeds):
        rng = np.random.default_rng(k)
        draws.append(rng.choice(pool, size=n, replace=replace) if pool else np.zeros(0, dtype=np.int64))
    return Sampling(draws, bool(replace), n, list(range(seeds)))


def summarise(values: Mapping[int, float], sampling: Sampling) -> dict[str, Any]:
    """Mean ± sd (ddof=1) across seeds of each seed's mean of ``values`` over its drawn images.

    Args:
        values: per-image metric by pool index; missing indices (failed images) and NaN are left out.

    Returns:
        ``{"mean", "sd", "seed_means", "n"}`` (``n``: images that counted, per seed).
    """
    seed_means, counts = [], []
    for d in sampling.draws:
        v = np.array([values[int(i)] for i in d if int(i) in values], dtype=np.float64)
        v = v[~np.isnan(v)]
        counts.append(int(v.size))
        seed_means.append(float(np.mean(v)) if v.size else float("nan"))
    finite = [m for m in seed_means if not math.isnan(m)]
    mean = float(np.mean(finite)) if finite else float("nan")
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 and all(map(math.isfinite, finite)) else None
    return {"mean": mean, "sd": sd, "seed_means": seed_means, "n": counts}


def _over_images(values: Sequence[float]) -> dict[str, Any]:
    v = np.array([x for x in values if not math.isnan(x)], dtype=np.float64)
    if not v.size:
        return {"mean": float("nan"), "sd": None, "n": 0}
    sd = float(np.std(v, ddof=1)) if v.size > 1 and np.isfinite(v).all() else None
    return {"mean": float(np.mean(v)), "sd": sd, "n": int(v.size)}


# ===================================================================================== methods
#: Shape of a preprocessed input ``1×C×…`` → how many values a method stores for it.
StoredCount = Callable[[tuple[int, ...]], int]


@dataclass
class MethodSpec:
    """A reconstruction method with what the report says about it (the paper's ``f`` and ``C`` columns).

    Attributes:
        fn: the method (:data:`medlatent.evaluation.baselines.Method`).
        f, C: downsizing factor and latent channels for the table (``C`` is ``None`` for interpolation).
        note: one line on what the method does.
        multiple: its input is edge-padded to a multiple of this per axis (``None``: the first model's reduction).
        in_channels: channels the preprocessing keeps for it (``None``: the first model's).
        stored: values the method keeps for an input of a given shape (the "values stored" column).
        weights_sha256: SHA-256 of a model's weights (models only).
    """

    fn: Method
    f: float | None = None
    C: int | None = None
    note: str = ""
    multiple: int | None = None
    in_channels: int | None = None
    stored: StoredCount | None = None
    weights_sha256: str = ""


def _latent_count(C: int, s: int) -> StoredCount:  # noqa: N803 - the paper's name
    """Values of a latent of ``C`` channels at ÷``s`` per axis of a padded input."""
    return lambda shape: C * math.prod(n // s for n in shape[2:])


def _shrunk_count(s: int) -> StoredCount:
    """Values of an image shrunk ÷``s`` per axis (every channel of the input kept)."""
    return lambda shape: shape[1] * math.prod(n // s for n in shape[2:])


def natural_spec(ae: "NaturalImageAutoencoder") -> MethodSpec:
    """A natural-image autoencoder as a method (slice by slice on volumes; ``f`` is per 2D image/slice)."""
    kind = "KL-VAE" if ae.kind == "kl" else "VQ-GAN"
    s, c = ae.downsample_per_axis, ae.C

    def stored(shape: tuple[int, ...]) -> int:
        plane = c * math.ceil(shape[2] / s) * math.ceil(shape[3] / s)
        return plane * (shape[4] if len(shape) == 5 else 1)

    return MethodSpec(ae.method(), ae.downsample_per_axis**2, ae.C, f"{kind} from {ae.source} (RGB-replicated)",
                      stored=stored)


def slicewise_spec(model2d: "MedVAE", model3d: "MedVAE", latent_dtype: str | None = "float16") -> MethodSpec:
    """A 2D model on volumes at the 3D model's latent size (paper Table 7, without decoder fine-tuning)."""
    s3 = model3d.downsample_per_axis
    return MethodSpec(slicewise_method(model2d, s3, latent_dtype=latent_dtype), model3d.f, model2d.C,
                      "2D model slice by slice, latents resized to the 3D latent size", multiple=s3, in_channels=1,
                      stored=lambda shape: model2d.C * math.prod(max(1, n // s3) for n in shape[2:]),
                      weights_sha256=weights_sha256(model2d))


def _model_name(model: "MedVAE") -> str:
    return str(model.weights_info.get("model") or "medlatent")


def weights_sha256(model: "MedVAE") -> str:
    """SHA-256 of the model's weights file, or of its tensors when it has no file (random or in-memory weights)."""
    known = model.weights_info.get("sha256")
    if known:
        return str(known)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + b"\0")
        h.update(tensor_bytes(v))
    return h.hexdigest()


def model_labels(models: Sequence["MedVAE"]) -> list[str]:
    """One row name per model: its name, with the weights' SHA-256 (12 hex) appended where two share a name
    (a fine-tuned run's ``final/`` keeps its base model's name)."""
    names = [_model_name(m) for m in models]
    base = [n if names.count(n) == 1 else f"{n}@{weights_sha256(m)[:12]}" for n, m in zip(names, models)]
    # the same weights twice (a registry name and a copy of it): number them in the order given
    return [b if base.count(b) == 1 else f"{b}#{base[:i + 1].count(b)}" for i, b in enumerate(base)]


def format_f(f: float | None) -> str:
    """``16`` for integer factors, ``5.33`` otherwise; ``–`` when unknown."""
    if f is None:
        return "–"
    return str(int(f)) if float(f).is_integer() else f"{f:.3g}"


@dataclass
class ReconOptions:
    """How to evaluate (see the module docstring for the protocol).

    Attributes:
        baselines: interpolation baselines by name (``None``: all of the model's dimensionality; ``()``: none).
        modality: ``auto`` or ct/mri/xray/other for every input (a CSV ``modality`` column wins).
        mri_percentiles: percentile clipping of MRI volumes, as ``medlatent encode --mri-percentiles``.
        latent_dtype: round ``z`` through this dtype before decoding (``float16`` as stored; ``None``: no rounding).
        precision: model compute precision (``fp32``, ``bf16``, ``fp16``).
        tiles: tiled-engine settings (``None``: automatic; images that fit one tile run whole).
        samples, seeds, replace: the sampling protocol.
        roi_csv: bounding boxes for ROI PSNR (:func:`read_rois`).
        figures: how many example figures (paper Figure 4) to draw.
        title: report title.
        uneven: DICOM series with uneven slices: ``refuse`` or ``resample``.
        equal_values: for every model with ``C > 1``, an interpolation row at ``f / C``: it stores as many
            values per image as the model's latent (e.g. bicubic ÷2 per axis for a 2D model with f=16, C=4).
        interp_f: further interpolation rows at these factors ``f`` (any number > 1).
        interp: the interpolation of those rows (``None``: bicubic in 2D, area in 3D).
    """

    baselines: tuple[str, ...] | None = None
    modality: str = "auto"
    mri_percentiles: tuple[float, float] | None = None
    latent_dtype: str | None = "float16"
    precision: str = "fp32"
    tiles: "TileSettings | None" = None
    samples: int = 0
    seeds: int = 3
    replace: bool | None = None
    roi_csv: Path | None = None
    figures: int = 2
    title: str | None = None
    uneven: str = "refuse"
    equal_values: bool = True
    interp_f: tuple[float, ...] = ()
    interp: str | None = None


@dataclass
class ReconResult:
    """What :func:`evaluate_reconstruction` produced."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    failures: list[tuple[str, str]]
    files: dict[str, Path] = field(default_factory=dict)


# ===================================================================================== one image
def _view(arr: np.ndarray, spatial_dims: int) -> np.ndarray:
    """A 2D view for figures: the image (channel mean) or the middle slice along the last (slice) axis."""
    if spatial_dims == 2:
        return arr.mean(axis=0)
    return np.rot90(arr[:, :, arr.shape[2] // 2])


@dataclass
class ImageEvaluation:
    """One image's results: ``metrics[method]`` has ``psnr``, ``ms_ssim``, ``roi_psnr`` (mean over boxes, NaN
    without boxes), ``roi_psnrs`` (per box) and ``stored`` (values the method kept, ``None`` if unknown);
    ``original`` and ``recons[method]`` are the [0, 1] arrays on the original grid (``C×H×W`` or ``X×Y×Z``);
    ``preprocessing`` is the record of what was done to the image (for the first model); ``pixels`` the
    number of pixels (voxels) of the image."""

    metrics: dict[str, dict[str, Any]]
    original: np.ndarray
    recons: dict[str, np.ndarray]
    preprocessing: "Preprocessing"
    pixels: int = 0


def evaluate_image(img: "ImageData", model: "MedVAE", methods: Mapping[str, MethodSpec], *,
                   modality: str = "auto", mri_percentiles: tuple[float, float] | None = None,
                   boxes: Sequence[Box] = ()) -> ImageEvaluation:
    """Metrics of every method on one image, preprocessed as ``medlatent encode`` does.

    Each method gets the image padded to its own ``multiple`` (a model: its reduction), so its result does not
    depend on the other methods of the run; all are compared on the original grid.

    Args:
        img: the image as read.
        model: the first model: its dimensionality, and the padding and channels of methods that name none.
        methods: ``{name: MethodSpec}`` (see :func:`build_methods`).
        boxes: regions for ROI PSNR, in the image's own pixel indices.
    """
    from medlatent.preprocessing import preprocess, restore
    from medlatent.report import to_unit

    d = model.spatial_dims
    prepared: dict[tuple[int, int], tuple[torch.Tensor, "Preprocessing", np.ndarray]] = {}
    metrics: dict[str, dict[str, Any]] = {}
    recons: dict[str, np.ndarray] = {}
    first = None
    for name, spec in methods.items():
        key = (spec.in_channels or model.config.in_channels, spec.multiple or model.downsample_per_axis)
        if key not in prepared:
            x, rec = preprocess(img, spatial_dims=d, in_channels=key[0], downsample=key[1], modality=modality,
                                mri_percentiles=mri_percentiles)
            prepared[key] = (torch.from_numpy(x)[None], rec, to_unit(np.asarray(img.array), rec))
        xt, rec, truth = prepared[key]
        first = first or (truth, rec)
        with torch.inference_mode():
            y = spec.fn(xt)
        if tuple(y.shape) != tuple(xt.shape):
            raise RuntimeError(f"method {name!r} returned shape {tuple(y.shape)} for input {tuple(xt.shape)}")
        out = to_unit(restore(y[0].float().cpu().numpy(), rec, "float32"), rec)
        rois = [roi_psnr(truth, out, b, d) for b in boxes]
        metrics[name] = {"psnr": psnr(truth, out), "ms_ssim": ms_ssim(truth, out, spatial_dims=d),
                         "roi_psnr": float(np.mean(rois)) if rois else float("nan"), "roi_psnrs": rois,
                         "stored": spec.stored(tuple(xt.shape)) if spec.stored else None}
        recons[name] = out
    if first is None:
        raise ValueError("no methods to evaluate")
    return ImageEvaluation(metrics, first[0], recons, first[1], math.prod(img.spatial_shape))


# ===================================================================================== the whole evaluation
def _as_models(model: "MedVAE | Sequence[MedVAE]") -> list["MedVAE"]:
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("give at least one model")
    dims = {m.spatial_dims for m in models}
    if len(dims) > 1:
        raise ValueError("the models mix 2D and 3D; compare models of one dimensionality per run")
    return models


def default_interp(spatial_dims: int) -> str:
    """The interpolation of the equal-values rows: bicubic in 2D, area (antialiased) in 3D."""
    return "bicubic" if spatial_dims == 2 else "area"


def interpolation_spec(d: int, f: float, mode: str, in_channels: int, note: str) -> MethodSpec:
    """Interpolation ``mode`` at any downsizing factor ``f`` of ``d``-D inputs with ``in_channels``, as a method
    whose values stored are those of the shrunk image (sizes rounded per axis for non-integer factors)."""
    fn, multiple = interpolation_at(d, f, mode)
    return MethodSpec(fn, f, None, note, multiple=multiple, in_channels=in_channels,
                      stored=lambda shape: stored_values(shape, f, d))


def build_methods(model: "MedVAE | Sequence[MedVAE]", options: ReconOptions,
                  extra: Mapping[str, MethodSpec] | None = None) -> dict[str, MethodSpec]:
    """The models first, then the interpolation baselines at each model's ``s``, the equal-values rows (an
    interpolation at ``f / C`` for every model with ``C > 1``, then ``options.interp_f``), then ``extra``.

    Baselines are named by their interpolation (``bicubic``) when every model has the same ``f``, else with the
    factor (``bicubic (f=64)``); equal-values and ``interp_f`` rows always carry it (``bicubic (f=4)``).
    """
    models = _as_models(model)
    d = models[0].spatial_dims
    methods: dict[str, MethodSpec] = {}
    labels = model_labels(models)
    for label, m in zip(labels, models):
        s = m.downsample_per_axis
        methods[label] = MethodSpec(
            model_method(m, latent_dtype=options.latent_dtype, tiles=options.tiles, precision=options.precision),
            m.f, m.C, f"posterior mean, z stored as {options.latent_dtype or 'float32'}", multiple=s,
            in_channels=m.config.in_channels, stored=_latent_count(m.C, s), weights_sha256=weights_sha256(m))
    done: set[tuple[str, float]] = set()
    several_f = len({m.f for m in models}) > 1
    for m in models:
        s = m.downsample_per_axis
        for name, fn in interpolation_methods(d, s, options.baselines).items():
            if (name, float(m.f)) in done:
                continue
            done.add((name, float(m.f)))
            how = (f"2D bicubic ÷{s} on every slice, block means of {s} slices along Z, and back"
                   if name == SLICE_BICUBIC else f"shrink ÷{s} per axis and enlarge back")
            methods[f"{name} (f={m.f})" if several_f else name] = MethodSpec(
                fn, m.f, None, how, multiple=s,
                in_channels=m.config.in_channels, stored=_shrunk_count(s))
    mode = options.interp or default_interp(d)
    if options.interp:  # refused when unknown even if no row uses it (a C=1 model has no equal-values row)
        interpolation_at(d, 2.0, mode)
    wanted: list[tuple[float, str]] = []
    if options.equal_values:
        # f / C ≤ 1: the latent keeps as many values as the image or more, and no interpolation matches it
        wanted += [(m.f / m.C, f"stores as many values as {label} (f={m.f}, C={m.C})")
                   for label, m in zip(labels, models) if m.C > 1 and m.f > m.C]
    wanted += [(float(f), "--interp-f") for f in options.interp_f]
    for f, why in wanted:
        f = float(f)
        if (mode, round(f, 6)) in {(n, round(g, 6)) for n, g in done}:
            continue
        done.add((mode, f))
        r = per_axis_factor(f, d)
        how = f"÷{format_f(r)}" if r.is_integer() else f"÷{r:.3f} (sizes rounded)"
        methods[f"{mode} (f={format_f(f)})"] = interpolation_spec(
            d, f, mode, models[0].config.in_channels, f"{mode}: shrink {how} per axis and enlarge back; {why}")
    for name, spec in (extra or {}).items():
        if name in methods:
            raise ValueError(f"method name {name!r} is used twice")
        methods[name] = spec
    return methods


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


def _json_clean(v: Any) -> Any:
    """JSON without NaN/Infinity (null for NaN, strings for ±inf), which strict parsers reject."""
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(v, Mapping):
        return {str(k): _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    if isinstance(v, (np.integer, np.floating)):
        return _json_clean(v.item())
    return v


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                            "x".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in r.items()})


def evaluate_reconstruction(inputs: Sequence[str | Path], model: "MedVAE | Sequence[MedVAE]", out_dir: str | Path,
                            options: ReconOptions | None = None, *,
                            extra_methods: Mapping[str, MethodSpec] | None = None,
                            progress: Callable[["ItemResult"], None] | None = None) -> ReconResult:
    """Evaluate reconstructions of ``inputs`` by one or more models and the baselines; write results and a report.

    Args:
        inputs: files, folders and CSVs (see :func:`gather_inputs`).
        model: the autoencoder (2D or 3D), or several of one dimensionality, in eval mode, on their devices.
        out_dir: output folder (created).
        options: see :class:`ReconOptions`.
        extra_methods: more methods (:func:`natural_spec`, :func:`slicewise_spec`, or your own :class:`MethodSpec`).
        progress: called with each image's :class:`medlatent.batch.ItemResult`.

    Returns:
        :class:`ReconResult`; ``failures`` lists ``(item, reason)`` for inputs that could not be evaluated;
        ``summary["warnings"]`` says which numbers cannot mean much (see :func:`recon_warnings`).
    """
    from medlatent.batch import Job, run_jobs

    opts = options or ReconOptions()
    models = _as_models(model)
    first, d = models[0], models[0].spatial_dims
    items, skipped = gather_inputs(inputs)
    rois = read_rois(opts.roi_csv) if opts.roi_csv else {}
    methods = build_methods(models, opts, extra_methods)
    sampling = draw_samples(len(items), opts.samples, opts.seeds, opts.replace)
    out = Path(out_dir)  # created once the arguments are known to be usable: a refused run leaves nothing
    out.mkdir(parents=True, exist_ok=True)
    chosen = range(len(items)) if sampling.samples >= len(items) else sampling.union()
    fig_dir = out / "figures"
    figures: list[tuple[str, Path]] = []
    values: dict[str, dict[str, dict[int, float]]] = {m: {k: {} for k in METRICS} for m in methods}
    stored: dict[str, list[tuple[int, int]]] = {m: [] for m in methods}  # (values stored, image pixels)
    rows: list[dict[str, Any]] = []
    roi_rows: list[dict[str, Any]] = []
    matched: set[Path] = set()

    def make_job(index: int):
        item = items[index]

        def run(img) -> dict[str, Any]:
            key = item.source.resolve()
            boxes = rois.get(key, [])
            if boxes:
                matched.add(key)
            try:
                ev = evaluate_image(img, first, methods, modality=item.modality or opts.modality,
                                    mri_percentiles=opts.mri_percentiles, boxes=boxes)
            except Exception as e:  # the manifest and the summary must say which file failed
                if str(item.source) in str(e):
                    raise
                raise RuntimeError(f"{item.source}: {e}") from e
            mine, my_rois = [], []
            for name, m in ev.metrics.items():
                mine.append({"image": item.name, "source": str(item.source), "method": name,
                             "psnr": m["psnr"], "ms_ssim": m["ms_ssim"], "roi_psnr": m["roi_psnr"],
                             "values_stored": m["stored"] if m["stored"] is not None else "", "pixels": ev.pixels,
                             "spatial_dims": d, "shape": list(np.shape(img.array)),
                             "modality": ev.preprocessing.modality})
                for b, v in zip(boxes, m["roi_psnrs"]):
                    my_rois.append({"image": item.name, "method": name, "box": b.where,
                                    "x0": b.x0, "y0": b.y0, "x1": b.x1, "y1": b.y1, "z0": b.z0, "z1": b.z1,
                                    "psnr": v})
            if len(figures) < opts.figures:
                from medlatent.evaluation.report import residual_figure

                path = fig_dir / f"example_{len(figures) + 1}_{_safe(item.name)}.png"
                residual_figure(_view(ev.original, d), {k: _view(v, d) for k, v in ev.recons.items()}, path,
                                title=item.name + ("" if d == 2 else " (middle slice)"))
                figures.append((f"{item.name}: original | reconstruction | residual", path))
            # recorded only once everything for this image succeeded
            rows.extend(mine)
            roi_rows.extend(my_rois)
            for name, m in ev.metrics.items():
                for k in METRICS:
                    values[name][k][index] = m[k]
                if m["stored"] is not None:
                    stored[name].append((m["stored"], ev.pixels))
            return {k: {"psnr": v["psnr"], "ms_ssim": v["ms_ssim"]} for k, v in ev.metrics.items()}

        return Job(item.name, [], lambda: load_input(item, opts.uneven), run)

    report = run_jobs([make_job(i) for i in chosen], out, resume=False, progress=progress)
    failures = [(r.item, r.reason) for r in report.failed] + [(str(p), why) for p, why in skipped]
    if skipped:
        from medlatent.batch import MANIFEST

        with open(out / MANIFEST, "a") as mf:
            for p, why in skipped:
                mf.write(json.dumps({"item": str(p), "status": "failed", "reason": why}) + "\n")
    for path in sorted(set(rois) - matched):
        logger.warning("ROI file names %s, which was not evaluated (not among the inputs, or not sampled)", path)

    summary = _summary(models, methods, values, stored, sampling, items, opts, failures, sorted(set(rois) - matched))
    files = _write_outputs(out, rows, roi_rows, summary, sampling, items, figures, opts)
    return ReconResult(rows, summary, failures, files)


# thresholds below which a reconstruction summary is flagged (README: "Results that cannot mean anything")
MIN_IMAGES = 20


def recon_warnings(summary: Mapping[str, Any]) -> list[str]:
    """Why the numbers of ``summary`` may not mean much: too few images, one seed, failed inputs."""
    out = []
    p = summary["protocol"]
    n = p.get("evaluated", p["pool"])
    if n < MIN_IMAGES:
        out.append(f"only {n} image(s) evaluated (fewer than {MIN_IMAGES}): the means describe these images, not "
                   "your data; evaluate at least 20, more to tell close methods apart")
    if len(p["seeds"]) == 1:
        out.append("one seed: there is no spread across seeds, so every sd reads n/a (1 seed); use --seeds 3 or more")
    if summary["failures"]:
        out.append(f"{len(summary['failures'])} input(s) failed and are left out of every mean")
    return out


def _stored_summary(pairs: Sequence[tuple[int, int]]) -> dict[str, Any] | None:
    if not pairs:
        return None
    values, pixels = sum(v for v, _ in pairs), sum(px for _, px in pairs)
    return {"per_image_mean": values / len(pairs), "per_pixel": values / pixels if pixels else float("nan")}


def _summary(models, methods, values, stored, sampling: Sampling, items, opts: ReconOptions, failures,
             unmatched_rois) -> dict[str, Any]:
    per_method: dict[str, Any] = {}
    for name, spec in methods.items():
        entry: dict[str, Any] = {"f": spec.f, "C": spec.C, "note": spec.note, "weights_sha256": spec.weights_sha256,
                                 "values_stored": _stored_summary(stored[name])}
        for k in METRICS:
            vals = values[name][k]
            if k == "roi_psnr" and not any(not math.isnan(v) for v in vals.values()):
                continue
            entry[k] = summarise(vals, sampling)
            entry[k]["over_images"] = _over_images(list(vals.values()))
        per_method[name] = entry
    described = [{"name": label, "model": _model_name(m), "weights_sha256": weights_sha256(m),
                  "file": m.weights_info.get("file", ""), "f": m.f, "C": m.C, "spatial_dims": m.spatial_dims,
                  "downsample_per_axis": m.downsample_per_axis, "latent_dtype": opts.latent_dtype or "float32",
                  "precision": opts.precision}
                 for label, m in zip(model_labels(models), models)]
    evaluated = len({i for v in values.values() for i in v["psnr"]})
    summary = {
        "title": opts.title or f"Reconstruction quality of {', '.join(m['name'] for m in described)}",
        "model": described[0],
        "models": described,
        "convention": CONVENTION,
        "protocol": {"pool": len(items), "evaluated": evaluated, "samples_per_seed": sampling.samples,
                     "seeds": sampling.seeds, "replace": sampling.replace,
                     "statistic": "per seed: mean over its drawn images; reported: mean ± sd (ddof=1) across seeds"},
        "methods": per_method,
        "failures": [{"item": i, "reason": r} for i, r in failures],
        "unmatched_rois": [str(p) for p in unmatched_rois],
    }
    summary["warnings"] = recon_warnings(summary)
    return summary


def format_seed_stat(stat: Mapping[str, Any], seeds: int, digits: int) -> str:
    """``mean ± sd`` across seeds; ``mean ± n/a (1 seed)`` when there is no spread to report."""
    from medlatent.evaluation.report import format_stat

    if seeds == 1 and not _missing(stat.get("mean")):
        return f"{format_stat(stat['mean'], None, digits)} ± n/a (1 seed)"
    return format_stat(stat.get("mean"), stat.get("sd"), digits)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def format_values_stored(entry: Mapping[str, Any] | None) -> str:
    """``1/16``: values a method keeps per pixel (voxel) of the image; ``–`` when unknown."""
    if not entry or _missing(entry.get("per_pixel")) or not entry["per_pixel"]:
        return "–"
    return f"1/{1 / entry['per_pixel']:.3g}"


def _write_outputs(out: Path, rows, roi_rows, summary, sampling: Sampling, items, figures,
                   opts: ReconOptions) -> dict[str, Path]:
    from medlatent.evaluation.report import bar_chart, format_stat, write_report

    files: dict[str, Path] = {}
    files["results"] = out / "results.csv"
    _write_csv(files["results"], rows) if rows else files["results"].write_text("image,method,psnr,ms_ssim\n")
    if roi_rows:
        files["roi_results"] = out / "roi_results.csv"
        _write_csv(files["roi_results"], roi_rows)
    files["samples"] = out / "samples.json"
    files["samples"].write_text(json.dumps({"replace": sampling.replace, "seeds": {
        str(k): [items[int(i)].name for i in d] for k, d in zip(sampling.seeds, sampling.draws)}}, indent=1) + "\n")
    files["summary"] = out / "summary.json"
    files["summary"].write_text(json.dumps(_json_clean(summary), indent=2) + "\n")

    charts = []
    has_values = any(math.isfinite(m.get("psnr", {}).get("mean", float("nan"))) for m in summary["methods"].values())
    if has_values:
        for metric, label in (("psnr", "PSNR (dB)"), ("ms_ssim", "MS-SSIM"), ("roi_psnr", "ROI PSNR (dB)")):
            if any(metric in m for m in summary["methods"].values()):
                p = bar_chart(summary["methods"], metric, out / "figures" / f"{metric}.png",
                              title=f"{label}, mean ± sd across seeds", ylabel=label)
                charts.append((f"{label} per method (error bars: sd across seeds)", p))

    k = len(summary["protocol"]["seeds"])
    table = []
    for name, m in summary["methods"].items():
        row = {"method": name, "weights SHA-256": m["weights_sha256"][:12] or "–", "f": format_f(m["f"]),
               "C": m["C"] if m["C"] is not None else "–", "values stored": format_values_stored(m["values_stored"]),
               "PSNR (dB)": format_seed_stat(m["psnr"], k, 2), "MS-SSIM": format_seed_stat(m["ms_ssim"], k, 3)}
        if "roi_psnr" in m:
            row["ROI PSNR (dB)"] = format_seed_stat(m["roi_psnr"], k, 2)
        table.append(row)
    models = [{"model": m["name"], "weights SHA-256 (12 hex)": m["weights_sha256"][:12],
               "weights file": m["file"] or "–", "dims": f"{m['spatial_dims']}D", "f": m["f"],
               "÷ per axis": m["downsample_per_axis"], "C": m["C"]} for m in summary["models"]]
    over = [{"method": name, "images": m["psnr"]["over_images"]["n"],
             "PSNR (dB)": format_stat(m["psnr"]["over_images"]["mean"], m["psnr"]["over_images"]["sd"], 2),
             "MS-SSIM": format_stat(m["ms_ssim"]["over_images"]["mean"], m["ms_ssim"]["over_images"]["sd"], 3)}
            for name, m in summary["methods"].items()]
    per_image = [{"image": r["image"], "method": r["method"], "PSNR": r["psnr"], "MS-SSIM": r["ms_ssim"],
                  **({"ROI PSNR": r["roi_psnr"]} if "roi_psnr" in summary["methods"].get(r["method"], {}) else {})}
                 for r in rows[:200]]
    p = summary["protocol"]
    notes = [
        "Models: " + "; ".join(
            f"`{m['name']}` (SHA-256 {m['weights_sha256'][:12]}): {m['spatial_dims']}D, f = {m['f']} "
            f"(÷{m['downsample_per_axis']} per axis), C = {m['C']}" for m in summary["models"])
        + f"; z decoded after rounding to {summary['model']['latent_dtype']}.",
        "Values stored: numbers a method keeps per image, as a fraction of the image's pixels (voxels); a model "
        "keeps C/f, an interpolation 1/f. Rows with equal values stored compare codecs at equal storage "
        "(for a model with C > 1, its f / C interpolation row).",
        f"Metrics: {CONVENTION}",
        f"Protocol: {len(p['seeds'])} seed(s), {p['samples_per_seed']} image(s) per seed drawn "
        f"{'with replacement (bootstrap)' if p['replace'] else 'without replacement'} from {p['pool']} input(s); "
        "each seed's mean over its images, then mean ± sd (ddof=1) across seeds (paper Tables 5–6).",
    ]
    if summary["failures"]:
        notes.append(f"**{len(summary['failures'])} input(s) failed** and are left out: " + "; ".join(
            f"`{f['item']}`: {f['reason']}" for f in summary["failures"][:20]))
    tables = [("Summary (mean ± sd across seeds)", table), ("Models", models),
              ("All evaluated images (mean ± sd across images)", over),
              ("Per image" + (" (first 200 rows; all in results.csv)" if len(rows) > 200 else ""), per_image)]
    files["report"] = write_report(out, summary["title"], tables, figures + charts, notes,
                                   warnings=summary["warnings"])
    files.update({f"figure_{i + 1}": path for i, (_, path) in enumerate(figures + charts)})
    return files
