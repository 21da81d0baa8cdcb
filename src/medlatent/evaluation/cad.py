"""CAD harness: do latents keep what a classifier needs? (paper §4.1, Table 1, App. B.1).

For one labelled CSV task the same classifier is trained on three kinds of input and its test AUROC compared:

* ``image`` — the high-resolution image, preprocessed as for encoding (:func:`medlatent.preprocessing.preprocess`:
  intensities to [-1, 1], volumes to RAS, RGB to gray) and resized to a fixed input size
  (:attr:`CADConfig.size`, bicubic with antialiasing; the paper resized FFDMs to 1024×512 the same way);
* ``latent`` — MedVAE's ``z`` of that image (posterior mean); for 2D models the stage-2 features
  ``stage2_features(z)`` when the model has the stage-2 head. With ``C > 1`` latent channels the classifier
  gets their mean as one input channel by default (App. B.1: "we preprocess latent representations by
  applying the mean operation across the channel dimension"), or all ``C`` as ``C`` input channels
  (``latent_channels="all"``); reports say which;
* ``interp`` — the image shrunk to the latent's size by interpolation (bicubic by default; the paper's
  baseline). 3D uses the separable tricubic equivalent (2D bicubic per slice, then 1D along the slice axis).
* ``stitched`` — 3D tasks only: a 2D model's latents of every slice along the last axis, stacked and resized
  (block means along the slice axis) to the size a 3D model of the same per-axis reduction gives: the paper's
  2D rows of the 3D tasks (§4.1, Table 1 bottom, Table 4);
* ``natural`` — a natural-image autoencoder's latent (diffusers KL-VAE / VQ-GAN, the image replicated to RGB):
  Table 1's KL-VAE and VQ-GAN rows; on 3D tasks stitched across slices as ``stitched``.

Training follows App. B.1: AdamW, a fixed number of epochs, binary tasks with one logit and BCE (multi-class:
softmax + cross-entropy), several seeds, AUROC / macro one-vs-rest AUROC from torchmetrics, reported as mean ± sd,
the final epoch's classifier tested (``CADConfig.select="best"`` keeps the epoch of the best validation AUROC
instead), batch 256 in 2D and 20 (latents) / 10 (images) in 3D, inputs of 1024×512 in 2D. Class-weighted
sampling (``WeightedRandomSampler``) is on for 3D tasks and off for 2D ones by default: the paper used it on two
of its three (imbalanced) 3D tasks and on no 2D task. Every report says which epoch was kept and how the
classifier started (ImageNet weights or from scratch). docs/paper-protocol.md lists each default beside the paper.

Prepared inputs are cached as ``<cache>/<kind>/<name>-<settings digest>/<file sha256>.safetensors`` (float16):
a second run neither reads the images nor encodes. A latent folder's digest covers the model's weights (hashed
each run, so a fine-tuned model never reuses stale latents), the input size and the preprocessing settings.
The sd over seeds is the sample standard deviation.

CSV manifest: columns ``path,label,split`` and optionally ``patient`` (no patient may appear in two splits);
``split`` is ``train``, ``val`` or ``test``; labels are integers or strings (mapped to ids in sorted order);
relative paths are relative to the CSV's folder. Every data error names the CSV line and the file.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import logging
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, WeightedRandomSampler

from medlatent.evaluation.baselines import NaturalImageAutoencoder
from medlatent.evaluation.classifiers import EVAL_EXTRA, PAPER_CLASSIFIER, build_classifier, check_classifier
from medlatent.latentfile import tensor_bytes

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
KINDS = ("image", "latent", "interp", "stitched", "natural")
#: kinds whose input is an autoencoder's latent (their rows carry f and C, and the channel mode)
LATENT_KINDS = ("latent", "stitched", "natural")
LATENT_CHANNELS = ("mean", "all")
# results that cannot mean much are flagged in the report (README: "Show that latents keep the signal")
MIN_TEST_IMAGES = 20
MIN_TEST_PER_CLASS = 5
RESIZE_MODES = ("nearest", "bilinear", "bicubic", "area")
# bump when the way inputs are prepared changes, so old cache entries are not reused
CACHE_VERSION = 1
#: ``last``: test the final epoch's classifier (App. B.1); ``best``: the epoch of the best validation AUROC
SELECT_RULES = ("last", "best")
#: the paper's input sizes: 2D 1024×512 (the FFDM and wrist tasks; bone age used 1024×1024); 3D, in the axis
#: order of medlatent's volumes (X×Y×Z, slices along Z), 224×224×160 (spine CT; head CT 224×224×44, knee MRI
#: 56×256×256)
PAPER_SIZE = {2: (1024, 512), 3: (224, 224, 160)}


def paper_batch_size(spatial_dims: int, kind: str) -> int:
    """App. B.1's batch sizes: 256 in 2D; in 3D 20 for latents (and inputs of their size), 10 for original images."""
    if spatial_dims == 2:
        return 256
    return 10 if kind == "image" else 20


class CADDataError(ValueError):
    """A CAD task that cannot be run; the message names the CSV line, file or patient and what to do."""


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class CADConfig:
    """How inputs are prepared and classifiers trained (defaults follow App. B.1 where it says).

    Attributes:
        classifier: ``"hrnet_w64"``, ``"seresnet152"``, ``"tiny"``; ``None`` = the paper's choice
            (HRNet-w64 in 2D, SEResNet-152 in 3D).
        size: high-resolution input size: one int (all axes) or one per axis (e.g. ``(1024, 512)``); ``None`` =
            the paper's (:data:`PAPER_SIZE`: 1024×512 in 2D, 224×224×160 in 3D).
        epochs: training epochs (paper: 100).
        batch_size: training batch size; ``None`` = the paper's (:func:`paper_batch_size`: 256 in 2D; 3D 20 for
            latents and interpolated volumes, 10 for full-resolution ones).
        lr: AdamW learning rate (paper: 1e-4).
        weight_decay: AdamW weight decay.
        seeds: one classifier is trained per seed (paper: three).
        balanced: class-weighted sampling (each class drawn equally often); ``None`` = the paper's: on for 3D
            tasks, off for 2D ones.
        select: ``"last"`` tests the final epoch's classifier (the paper's rule); ``"best"`` keeps the epoch with
            the best validation AUROC (the last epoch when the CSV has no usable val split).
        resize: interpolation to the fixed input size: nearest, bilinear, bicubic or area.
        modality: passed to :func:`~medlatent.preprocessing.preprocess` (``auto``: from the file).
        device: where classifiers train (``"cpu"``, ``"cuda"``, ``"cuda:1"``, …); models encode where they are.
        pretrained: ImageNet weights for ``hrnet_w64`` (the paper used a pretrained HRNet).
        pretrained_weights: a local file of those weights (default: the Hugging Face cache, where timm keeps
            them, or a download; offline without them the run stops before any work, saying how to get them).
        preload_gb: inputs of one method are held in memory when they fit in this much; else read per batch.
        num_workers: DataLoader workers.
    """

    classifier: str | None = None
    size: int | tuple[int, ...] | None = None
    epochs: int = 100
    batch_size: int | None = None
    lr: float = 1e-4
    weight_decay: float = 1e-2
    seeds: tuple[int, ...] = (0, 1, 2)
    balanced: bool | None = None
    select: str = "last"
    resize: str = "bicubic"
    modality: str = "auto"
    device: str = "cpu"
    pretrained: bool = False
    pretrained_weights: str | None = None
    preload_gb: float = 2.0
    num_workers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if self.size is not None:
            if not isinstance(self.size, int):
                object.__setattr__(self, "size", tuple(int(n) for n in self.size))
            sizes = (self.size,) if isinstance(self.size, int) else self.size
            if not sizes or min(sizes) < 2:
                raise ValueError(f"size must be ≥ 2 per axis, got {self.size}")
        if self.epochs < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError(f"epochs and batch_size must be ≥ 1, got {self.epochs} and {self.batch_size}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.select not in SELECT_RULES:
            raise ValueError(f"select must be one of {', '.join(SELECT_RULES)}, got {self.select!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay ≥ 0, got {self.lr} and {self.weight_decay}")

    def size_for(self, spatial_dims: int) -> tuple[int, ...]:
        if self.size is None:
            return PAPER_SIZE[spatial_dims]
        if isinstance(self.size, int):
            return (self.size,) * spatial_dims
        if len(self.size) != spatial_dims:
            raise ValueError(f"size {self.size} has {len(self.size)} axes; the task is {spatial_dims}D")
        return self.size

    def classifier_for(self, spatial_dims: int) -> str:
        return self.classifier or PAPER_CLASSIFIER[spatial_dims]

    def batch_size_for(self, spatial_dims: int, kind: str) -> int:
        """The batch size of a method's classifier: ``batch_size``, else the paper's."""
        return self.batch_size or paper_batch_size(spatial_dims, kind)

    def balanced_for(self, spatial_dims: int) -> bool:
        """Class-weighted sampling: ``balanced``, else the paper's (3D tasks only)."""
        return self.balanced if self.balanced is not None else spatial_dims == 3

    @property
    def initialisation(self) -> str:
        """How the classifier starts: ``ImageNet-pretrained (FILE)`` or ``from scratch``."""
        if not self.pretrained:
            return "from scratch"
        return f"ImageNet-pretrained ({self.pretrained_weights})" if self.pretrained_weights else "ImageNet-pretrained"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        d["size"] = self.size if self.size is None or isinstance(self.size, int) else list(self.size)
        return d


@dataclass(frozen=True, eq=False)
class Method:
    """One kind of classifier input (a row of Table 1).

    Attributes:
        label: the row name (e.g. ``"High-Resolution"``, ``"MedVAE (f=16, C=1)"``, ``"Bicubic"``).
        kind: ``"image"``, ``"latent"``, ``"interp"``, ``"stitched"`` or ``"natural"``.
        model: the MedVAE (``latent``), a 2D MedVAE (``stitched``) or a
            :class:`~medlatent.evaluation.baselines.NaturalImageAutoencoder` (``natural``).
        downsample: per-axis reduction (``interp``; ``latent`` takes the model's).
        interp: interpolation of ``interp``: nearest, bilinear, bicubic or area.
        latent_channels: ``latent`` with ``C > 1``: ``"mean"`` (one input channel, the paper's App. B.1) or
            ``"all"`` (``C`` input channels).
    """

    label: str
    kind: str
    model: Any = None
    downsample: int = 1
    interp: str = "bicubic"
    latent_channels: str = "mean"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind in LATENT_KINDS and self.model is None:
            raise ValueError(f"method {self.label!r}: a {self.kind} method needs a model")
        if self.kind == "stitched" and self.model.spatial_dims != 2:
            raise ValueError(f"method {self.label!r}: stitched latents come from a 2D model, got a "
                             f"{self.model.spatial_dims}D one")
        if self.kind == "interp" and (self.downsample < 1 or self.interp not in RESIZE_MODES):
            raise ValueError(f"method {self.label!r}: downsample must be ≥ 1 and interp one of "
                             f"{', '.join(RESIZE_MODES)}")
        if self.latent_channels not in LATENT_CHANNELS:
            raise ValueError(f"latent channels must be one of {', '.join(LATENT_CHANNELS)}, "
                             f"got {self.latent_channels!r}")

    @property
    def per_axis(self) -> int:
        return self.model.downsample_per_axis if self.kind in LATENT_KINDS else self.downsample

    def f(self, spatial_dims: int) -> int:
        """The paper's downsizing factor (area or volume reduction)."""
        return self.per_axis**spatial_dims if self.kind != "image" else 1

    @property
    def C(self) -> int:  # noqa: N802 - the paper's name
        return self.model.C if self.kind in LATENT_KINDS else 1

    @property
    def input_channels(self) -> int:
        """Channels the classifier sees: ``C`` only for a latent given with ``latent_channels="all"``."""
        return self.C if self.kind in LATENT_KINDS and self.latent_channels == "all" else 1


def default_methods(models: "Mapping[str, Any] | Sequence[Any] | Any | None" = None,
                    kinds: Sequence[str] = ("image", "latent", "interp"), interp: str = "bicubic",
                    interp_f: Sequence[int] = (), spatial_dims: int = 2, latent_channels: str = "mean",
                    stitched: "Mapping[str, Any] | None" = None, natural: "Mapping[str, Any] | None" = None
                    ) -> list[Method]:
    """Table 1's rows for the given models: High-Resolution, then per model its latent and an interpolation
    baseline at the same per-axis reduction (one per distinct reduction).

    Args:
        models: a MedVAE, a list of them, or ``{name: model}`` (names label the rows).
        kinds: which of ``image``, ``latent``, ``interp`` to include.
        interp: interpolation of the baseline.
        interp_f: further interpolation rows at these downsizing factors ``f`` (the paper's: area or volume
            reduction, e.g. 64 = ÷8 per axis in 2D), with or without a model of that factor.
        spatial_dims: of the task, to turn ``interp_f`` into a per-axis reduction.
        latent_channels: ``"mean"`` (the paper's) or ``"all"``: how latents with ``C > 1`` reach the classifier.
        stitched: ``{name: 2D model}``: stitched-2D rows for a 3D task (with an interpolation row at each
            reduction, as for ``models``).
        natural: ``{name: NaturalImageAutoencoder}``: KL-VAE / VQ-GAN rows (stitched across slices in 3D).
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown method kinds {bad}; choose from {', '.join(KINDS)}")
    if models is None:
        named: list[tuple[str, Any]] = []
    elif isinstance(models, Mapping):
        named = list(models.items())
    elif isinstance(models, (list, tuple)):
        named = [(m.weights_info.get("model", f"model{i}"), m) for i, m in enumerate(models)]
    else:
        named = [(models.weights_info.get("model", "MedVAE"), models)]
    if not (named or stitched or natural) and any(k != "image" for k in kinds) and not interp_f:
        raise ValueError("latent and interp methods need at least one model (give --model, or only --method image)")
    out: list[Method] = []
    if "image" in kinds:
        out.append(Method("High-Resolution", "image"))
    seen: set[int] = set()  # per-axis reductions that have their interpolation row

    def add_interp(s: int, dims: int) -> None:
        if s not in seen:
            seen.add(s)
            out.append(Method(f"{interp.capitalize()} (f={s**dims})", "interp", downsample=s, interp=interp))

    for name, m in named:
        if "latent" in kinds:
            out.append(Method(f"MedVAE {name} (f={m.f}, C={m.C})" if len(named) > 1 else f"MedVAE (f={m.f}, C={m.C})",
                              "latent", model=m, latent_channels=latent_channels))
        if "interp" in kinds:
            add_interp(m.downsample_per_axis, m.spatial_dims)
    for name, m in (stitched or {}).items():
        out.append(Method(f"2D {name} stitched (C={m.C})", "stitched", model=m, latent_channels=latent_channels))
        if "interp" in kinds:
            add_interp(m.downsample_per_axis, 3)
    for name, ae in (natural or {}).items():
        kind = "KL-VAE" if ae.kind == "kl" else "VQ-GAN"
        out.append(Method(f"{kind} {name} (C={ae.C})", "natural", model=ae, latent_channels=latent_channels))
    for f in interp_f:
        s = round(f ** (1 / spatial_dims))
        if s < 2 or s**spatial_dims != f:
            raise ValueError(f"interpolation factor f={f} is not a {spatial_dims}D power of a per-axis reduction "
                             f"(2D: 16, 64; 3D: 64, 512)")
        add_interp(s, spatial_dims)
    return out


# ------------------------------------------------------------------------------------------ the CSV
@dataclass(frozen=True)
class CADEntry:
    """One CSV row: the file, its class id, split and (optional) patient; ``line`` for error messages."""

    line: int
    path: Path
    label: int
    split: str
    patient: str = ""


@dataclass
class CADTask:
    """A parsed CSV: rows, class names (id → name) and the CSV path."""

    csv_path: Path
    entries: list[CADEntry]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices(self, split: str) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e.split == split]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in SPLITS:
            labels = [e.label for e in self.entries if e.split == s]
            if labels:
                out[s] = {self.class_names[k]: labels.count(k) for k in range(self.num_classes)}
        return out


def _label_order(raw: list[str]) -> list[str]:
    """Distinct labels sorted numerically when all are integers, else as strings."""
    distinct = sorted(set(raw))
    try:
        return sorted(distinct, key=lambda s: int(s))
    except ValueError:
        return distinct


def read_cad_csv(csv_path: str | Path) -> CADTask:
    """Parse and check a CAD manifest.

    Raises:
        CADDataError: missing columns, empty cells, unknown split, missing file, a patient in two splits,
            fewer than two classes, or a class absent from train or test (AUROC would be undefined).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CADDataError(f"{csv_path}: no such CSV file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
            rows = [(reader.line_num, {(k or "").strip().lower(): (v or "").strip() if isinstance(v, str) else ""
                                       for k, v in row.items()}) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CADDataError(f"{csv_path}: cannot be read as a CSV ({type(e).__name__}: {e})") from e
    missing = [c for c in ("path", "label", "split") if c not in columns]
    if missing:
        raise CADDataError(f"{csv_path}: missing column(s) {', '.join(missing)} "
                           f"(found: {', '.join(columns) or 'none'});"
                           " a CAD manifest has columns path,label,split and optionally patient")
    has_patient = "patient" in columns
    parsed: list[tuple[int, Path, str, str, str]] = []
    for line, row in rows:
        if not any(row.values()):
            continue
        where = f"{csv_path}, line {line}"
        for col in ("path", "label", "split"):
            if not row.get(col):
                raise CADDataError(f"{where}: empty {col}")
        split = row["split"].lower()
        if split not in SPLITS:
            raise CADDataError(f"{where}: split must be one of {', '.join(SPLITS)}, got {row['split']!r}")
        path = Path(row["path"]).expanduser()
        if not path.is_absolute():
            path = csv_path.parent / path
        if not path.exists():
            raise CADDataError(f"{where}: file {path} does not exist (relative paths are relative to the CSV's folder)")
        patient = row.get("patient", "") if has_patient else ""
        if has_patient and not patient:
            raise CADDataError(f"{where}: empty patient (the CSV has a patient column; fill it for every row)")
        parsed.append((line, path, row["label"], split, patient))
    if not parsed:
        raise CADDataError(f"{csv_path}: no rows")

    first_seen: dict[str, tuple[str, int]] = {}
    for line, _, _, split, patient in parsed:
        if not patient:
            continue
        if patient in first_seen and first_seen[patient][0] != split:
            s0, l0 = first_seen[patient]
            raise CADDataError(f"{csv_path}: patient {patient!r} appears in split {s0!r} (line {l0}) and split "
                               f"{split!r} (line {line}); all images of a patient must be in one split")
        first_seen.setdefault(patient, (split, line))

    class_names = _label_order([p[2] for p in parsed])
    if len(class_names) < 2:
        raise CADDataError(f"{csv_path}: only one class ({class_names[0]!r}); a CAD task needs at least two")
    ids = {name: i for i, name in enumerate(class_names)}
    entries = [CADEntry(line, path, ids[label], split, patient) for line, path, label, split, patient in parsed]
    task = CADTask(csv_path, entries, class_names)
    counts = task.counts()
    for split in ("train", "test"):
        absent = [c for c, n in counts.get(split, {c: 0 for c in class_names}).items() if n == 0]
        if absent:
            raise CADDataError(f"{csv_path}: split {split!r} has no rows of class(es) {', '.join(map(repr, absent))}; "
                               f"every class must appear in train and test (AUROC is undefined otherwise)")
    return task


# ------------------------------------------------------------------------------------------ input preparation
def resize(x: torch.Tensor, size: Sequence[int], mode: str = "bicubic") -> torch.Tensor:
    """Resize ``C×H×W`` or ``C×D×H×W`` to ``size`` (antialiased when shrinking, for bilinear/bicubic).

    3D bilinear/bicubic is separable: 2D per slice over the first two axes, then 1D along the last — the
    tricubic filter PyTorch lacks (trilinear has no antialiasing either).
    """
    size = tuple(int(n) for n in size)
    d = x.ndim - 1
    if len(size) != d:
        raise ValueError(f"size {size} does not match a {d}D input of shape {tuple(x.shape)}")
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    x = x.float()
    if tuple(x.shape[1:]) == size:
        return x.clone()
    if mode in ("nearest", "area") or d == 2 and mode in ("bilinear", "bicubic"):
        kw = {} if mode in ("nearest", "area") else {"align_corners": False, "antialias": True}
        return F.interpolate(x[None], size=size, mode=mode, **kw)[0]
    c, nx, ny, nz = x.shape
    kw = {"align_corners": False, "antialias": True}
    t = x.permute(0, 3, 1, 2).reshape(c * nz, 1, nx, ny)                       # slices along the last axis
    t = F.interpolate(t, size=size[:2], mode=mode, **kw)                       # (c·nz)×1×X'×Y'
    t = t.reshape(c, nz, size[0] * size[1]).permute(0, 2, 1).reshape(-1, 1, 1, nz)
    t = F.interpolate(t, size=(1, size[2]), mode=mode, **kw)                   # 1-D along the last axis
    return t.reshape(c, size[0], size[1], size[2])


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (DICOM series) by relative name and content."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's config and weights (so a fine-tuned model never reuses stale cached latents)."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)  # diffusers: a dict
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + b"\0")
        h.update(tensor_bytes(v))
    return h.hexdigest()


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "model"


def _settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class InputBuilder:
    """Prepares (and caches) classifier inputs of a task for each method.

    The prepared high-resolution image is the base of all three kinds and is cached too, so a latent or
    interpolation method whose cache misses still does not decode the original file twice.
    """

    def __init__(self, task: CADTask, spatial_dims: int, config: CADConfig, cache_dir: Path) -> None:
        self.task = task
        self.dims = spatial_dims
        self.config = config
        self.size = config.size_for(spatial_dims)
        self.cache_dir = Path(cache_dir)
        self._digests: dict[Path, str] = {}
        self._fingerprints: dict[int, str] = {}  # hashed once per run: weights may change between runs
        self.image_settings = {"version": CACHE_VERSION, "kind": "image", "size": list(self.size),
                               "resize": config.resize, "modality": config.modality, "spatial_dims": spatial_dims}

    # ---------------------------------------------------------------------------------- cache
    def _digest(self, entry: CADEntry) -> str:
        if entry.path not in self._digests:
            try:
                self._digests[entry.path] = file_digest(entry.path)
            except OSError as e:
                raise CADDataError(f"{self.task.csv_path}, line {entry.line}: cannot read {entry.path} "
                                   f"({type(e).__name__}: {e})") from e
        return self._digests[entry.path]

    def folder(self, method: Method) -> Path:
        """Cache folder of a method's inputs."""
        if method.kind == "image":
            return self.cache_dir / "image" / f"{'x'.join(map(str, self.size))}-{_settings_digest(self.image_settings)}"
        if method.kind == "interp":
            s = {**self.image_settings, "kind": "interp", "downsample": method.per_axis, "interp": method.interp}
            return self.cache_dir / "interp" / f"x{method.per_axis}-{method.interp}-{_settings_digest(s)}"
        m = method.model
        if id(m) not in self._fingerprints:
            self._fingerprints[id(m)] = model_fingerprint(m.vae if method.kind == "natural" else m)
        s = {**self.image_settings, "kind": method.kind, "model": self._fingerprints[id(m)], "stage2_2d": True,
             "latent_channels": method.latent_channels}
        name = Path(m.source).name if method.kind == "natural" else m.weights_info.get("model", "model")
        return self.cache_dir / method.kind / f"{_slug(name)}-{_settings_digest(s)}"

    @staticmethod
    def _cached(path: Path) -> bool:
        """A readable cache entry exists (only its header is read)."""
        if not path.is_file():
            return False
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                return "x" in fh.keys()
        except (SafetensorError, OSError) as e:
            logger.warning("%s: damaged cache entry rebuilt (%s)", path, e)
            return False

    def _load(self, path: Path) -> torch.Tensor | None:
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))["x"]
        except (SafetensorError, OSError, KeyError) as e:  # a damaged entry is rebuilt, not trusted
            logger.warning("%s: damaged cache entry rebuilt (%s)", path, e)
            return None

    @staticmethod
    def _store(path: Path, x: torch.Tensor, source: Path) -> None:
        from safetensors.torch import save_file

        from medlatent.io.atomic import atomic_write

        with atomic_write(path) as tmp:
            save_file({"x": x.contiguous()}, str(tmp), metadata={"source": str(source)})

    # ---------------------------------------------------------------------------------- building
    def _read(self, entry: CADEntry) -> torch.Tensor:
        from medlatent.io.image import ImageReadError
        from medlatent.io.readers import read_image
        from medlatent.preprocessing import PreprocessingError, preprocess

        where = f"{self.task.csv_path}, line {entry.line}"
        try:
            img = read_image(entry.path)
            x, _ = preprocess(img, spatial_dims=self.dims, in_channels=1, downsample=1, modality=self.config.modality)
        except (ImageReadError, PreprocessingError) as e:
            raise CADDataError(f"{where}: {e}") from e
        return resize(torch.from_numpy(x), self.size, self.config.resize).clamp_(-1.0, 1.0)

    def image(self, entry: CADEntry) -> torch.Tensor:
        """The prepared high-resolution image ``1×size`` in [-1, 1] (cached)."""
        path = self.folder(Method("image", "image")) / f"{self._digest(entry)}.safetensors"
        x = self._load(path)
        if x is None:
            # stored and used as float16 either way, so a latent made now equals one made after a cache hit
            x = self._read(entry).to(torch.float16)
            self._store(path, x, entry.path)
        return x.float()

    def _make(self, method: Method, entry: CADEntry) -> torch.Tensor:
        img = self.image(entry)
        if method.kind == "image":
            return img
        if method.kind == "interp":
            return resize(img, [n // method.per_axis for n in self.size], method.interp).clamp_(-1.0, 1.0)
        if method.kind == "latent":
            return latent_input(method.model, img, method.latent_channels)
        if img.ndim == 4:  # stitched, or a natural-image autoencoder on a volume: slice by slice
            return stitched_latent_input(method.model, img, method.latent_channels)
        return _channel_mode(encode_2d(method.model, img[None])[0], method.latent_channels)

    def build(self, method: Method) -> "CachedInputs":
        """All rows' inputs for ``method`` (computed once, then read from the cache)."""
        s = method.per_axis
        if any(n % s for n in self.size):
            raise CADDataError(f"input size {self.size} is not a multiple of {s} per axis (method {method.label!r}); "
                               f"choose a size divisible by {s}")
        folder = self.folder(method)
        files = []
        made = 0
        for entry in self.task.entries:
            path = folder / f"{self._digest(entry)}.safetensors"
            if not self._cached(path):
                x = self._make(method, entry)
                if method.kind != "image":  # image() has stored it already
                    self._store(path, x.to(torch.float16), entry.path)
                made += 1
            files.append(path)
        logger.info("%s: %d inputs prepared, %d from the cache (%s)", method.label, made, len(files) - made, folder)
        return CachedInputs(files, preload_gb=self.config.preload_gb)


@torch.inference_mode()
def latent_input(model: Any, image: torch.Tensor, channels: str = "mean") -> torch.Tensor:
    """The classifier input of the ``latent`` method for one prepared image ``1×…`` in [-1, 1].

    ``z`` (2D: ``stage2_features(z)`` when the model has the stage-2 head), then with ``channels="mean"`` the
    mean over its ``C`` channels (App. B.1) → ``1×H/s×W/s`` (``1×D/s×H/s×W/s``); with ``"all"`` the ``C``
    channels as they are → ``C×H/s×W/s``.
    """
    from medlatent.engine.tiled import TiledAutoencoder

    if channels not in LATENT_CHANNELS:
        raise ValueError(f"channels must be one of {', '.join(LATENT_CHANNELS)}, got {channels!r}")
    dev = model.device
    z = TiledAutoencoder(model).encode(image[None].to(dev)).to(torch.float32)
    if model.spatial_dims == 2 and model.config.stage2_head:
        z = model.stage2_features(z).float()
    if channels == "mean" and z.shape[1] > 1:
        z = z.mean(dim=1, keepdim=True)
    return z[0].cpu()


def _channel_mode(z: torch.Tensor, channels: str) -> torch.Tensor:
    """``C×…`` latent → the classifier input: the channel mean ``1×…`` (``mean``) or as it is (``all``)."""
    if channels not in LATENT_CHANNELS:
        raise ValueError(f"channels must be one of {', '.join(LATENT_CHANNELS)}, got {channels!r}")
    return z.mean(dim=0, keepdim=True) if channels == "mean" and z.shape[0] > 1 else z


@torch.inference_mode()
def encode_2d(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Latents of 2D images ``B×1×H×W`` (sides multiples of the reduction) → ``B×C×H/s×W/s`` float32 on the CPU.

    A MedVAE gives its posterior mean (the stage-2 features when it has the stage-2 head, as ``latent``); a
    natural-image autoencoder its latent of the RGB-replicated image.
    """
    if isinstance(model, NaturalImageAutoencoder):
        return model.encode(x).float().cpu()
    z = model.encode(x.to(model.device)).mean.float()
    if model.config.stage2_head:
        z = model.stage2_features(z).float()
    return z.cpu()


@torch.inference_mode()
def stitched_latent_input(model: Any, volume: torch.Tensor, channels: str = "mean", batch_size: int = 16
                          ) -> torch.Tensor:
    """A 2D model's latent of a volume ``1×X×Y×Z`` at the size of a 3D latent of the same per-axis reduction ``s``.

    Every slice along the last axis is encoded (:func:`encode_2d`), the slice latents are stacked into
    ``C×X/s×Y/s×Z`` and the slice axis is reduced to ``Z/s`` by block means: the paper's stitched 2D latents
    (§4.1: "stitching 2D latent representations together across slices such that the size ... matches those
    generated by 3D models"). Then the channel mode of :func:`latent_input`.
    """
    if volume.ndim != 4:
        raise ValueError(f"stitched latents need a volume 1×X×Y×Z, got shape {tuple(volume.shape)}")
    s = model.downsample_per_axis
    nx, ny, nz = volume.shape[1:]
    slices = volume.permute(3, 0, 1, 2)  # Z×1×X×Y
    z = torch.cat([encode_2d(model, chunk) for chunk in slices.split(batch_size)])  # Z×C×X/s×Y/s
    z = z.permute(1, 2, 3, 0)[None]  # 1×C×X/s×Y/s×Z
    z = F.interpolate(z, size=(nx // s, ny // s, max(1, nz // s)), mode="area")[0]
    return _channel_mode(z, channels)


class CachedInputs(Dataset):
    """Prepared inputs of one method: held in memory when they fit ``preload_gb``, else read per item."""

    def __init__(self, files: list[Path], preload_gb: float = 2.0) -> None:
        from safetensors import safe_open

        self.files = files
        with safe_open(str(files[0]), "pt") as fh:
            self.shape = tuple(fh.get_slice("x").get_shape())
        total = len(files) * math.prod(self.shape) * 4
        self.data: torch.Tensor | None = None
        if total <= preload_gb * 2**30:
            self.data = torch.stack([self._read(i) for i in range(len(files))])

    def _read(self, i: int) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.files[i]))["x"].float()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i] if self.data is not None else self._read(i)


class _Labelled(Dataset):
    def __init__(self, inputs: Dataset, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.labels[i]


# ------------------------------------------------------------------------------------------ metric
def auroc(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """AUROC (binary) or macro one-vs-rest AUROC (multi-class), computed with torchmetrics.

    Args:
        scores: ``N`` probabilities of class 1 (binary; ``N×2`` also accepted) or ``N×K`` class probabilities.
        labels: ``N`` class ids.
        num_classes: ``K``.
    """
    try:
        from torchmetrics.functional.classification import binary_auroc, multiclass_auroc
    except ImportError as e:
        raise ImportError(f"AUROC needs torchmetrics: {EVAL_EXTRA}") from e
    labels = labels.long()
    if num_classes == 2:
        if scores.ndim == 2:
            scores = scores[:, 1]
        return float(binary_auroc(scores.float(), labels))
    return float(multiclass_auroc(scores.float(), labels, num_classes=num_classes, average="macro"))


# ------------------------------------------------------------------------------------------ training
@dataclass
class SeedRun:
    """One trained classifier: its test AUROC, the kept epoch and its validation AUROC (if any)."""

    seed: int
    test_auroc: float
    epoch: int
    val_auroc: float | None


@torch.inference_mode()
def _scores(net: torch.nn.Module, data: Dataset, num_classes: int, batch_size: int, device: str) -> torch.Tensor:
    net.eval()
    out = []
    for x, _ in DataLoader(data, batch_size=batch_size, shuffle=False):
        logits = net(x.to(device)).float()
        out.append(torch.sigmoid(logits[:, 0]) if num_classes == 2 else torch.softmax(logits, dim=1))
    return torch.cat(out).cpu()


def train_classifier(inputs: Dataset, labels: torch.Tensor, splits: Mapping[str, Sequence[int]], *,
                     num_classes: int, spatial_dims: int, config: CADConfig, seed: int, kind: str = "latent"
                     ) -> SeedRun:
    """Train one classifier on ``splits["train"]`` and report its test AUROC (App. B.1).

    Args:
        inputs: item ``i`` is a ``C×…`` tensor.
        labels: ``N`` class ids.
        splits: row indices of ``train``, ``test`` and optionally ``val``.
        num_classes: ``K``; binary tasks use one logit + BCE, multi-class ``K`` logits + cross-entropy.
        spatial_dims: 2 or 3.
        config: training settings.
        seed: seeds the weights and the sampling.
        kind: the method's kind (``image``, ``latent``, …): the paper's 3D batch size depends on it.
    """
    torch.manual_seed(seed)
    in_channels = int(inputs[0].shape[0])
    out = 1 if num_classes == 2 else num_classes
    net = build_classifier(config.classifier_for(spatial_dims), spatial_dims, in_channels, out,
                           pretrained=config.pretrained, weights=config.pretrained_weights).to(config.device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    data = _Labelled(inputs, labels)
    train_idx = list(splits["train"])
    train = Subset(data, train_idx)
    g = torch.Generator().manual_seed(seed)
    batch_size = config.batch_size_for(spatial_dims, kind)
    if config.balanced_for(spatial_dims):  # each class drawn equally often (weights 1/count), as many draws as rows
        counts = torch.bincount(labels[train_idx], minlength=num_classes).float()
        weights = (1.0 / counts.clamp(min=1))[labels[train_idx]]
        sampler = WeightedRandomSampler(weights.double(), num_samples=len(train_idx), replacement=True, generator=g)
    else:
        sampler = RandomSampler(train, generator=g)
    # drop a ragged last batch of one: BatchNorm cannot train on a single sample with pooled features
    loader = DataLoader(train, batch_size=batch_size, sampler=sampler, num_workers=config.num_workers,
                        drop_last=len(train_idx) % batch_size == 1 and len(train_idx) > batch_size)
    val_idx = list(splits.get("val", []))
    val_classes = set(labels[val_idx].tolist()) if val_idx else set()
    use_val = config.select == "best" and len(val_classes) == num_classes
    if config.select == "best" and val_idx and not use_val:
        logger.warning("the val split lacks some classes; keeping the last epoch instead of the best val AUROC")
    val = Subset(data, val_idx) if use_val else None

    best: tuple[float, dict[str, torch.Tensor] | None, int] = (-math.inf, None, config.epochs - 1)
    for epoch in range(config.epochs):
        net.train()
        for x, y in loader:
            logits = net(x.to(config.device))
            y = y.to(config.device)
            loss = (F.binary_cross_entropy_with_logits(logits[:, 0].float(), y.float()) if num_classes == 2
                    else F.cross_entropy(logits.float(), y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val is not None:
            v = auroc(_scores(net, val, num_classes, batch_size, config.device), labels[val_idx], num_classes)
            if v > best[0]:  # strictly better: ties keep the earlier epoch
                best = (v, copy.deepcopy(net.state_dict()), epoch)
    if best[1] is not None:
        net.load_state_dict(best[1])
    test_idx = list(splits["test"])
    test_scores = _scores(net, Subset(data, test_idx), num_classes, batch_size, config.device)
    return SeedRun(seed, auroc(test_scores, labels[test_idx], num_classes), best[2],
                   best[0] if best[1] is not None else None)


# ------------------------------------------------------------------------------------------ results
@dataclass
class MethodResult:
    """One row of the table: a method's AUROC over seeds."""

    label: str
    kind: str
    f: int
    C: int  # noqa: N815 - the paper's name
    input_shape: list[int]
    runs: list[SeedRun] = field(default_factory=list)
    latent_channels: str = ""
    batch_size: int | None = None

    @property
    def input_channels(self) -> int:
        """Channels the classifier saw (1 for images and channel-averaged latents)."""
        return int(self.input_shape[0])

    @property
    def input_description(self) -> str:
        """``1 (mean of C=4)``, ``4 (all C)`` or ``1``: what the classifier's input channels were."""
        if self.kind in LATENT_KINDS and self.C > 1:
            return (f"{self.input_channels} (mean of C={self.C})" if self.latent_channels == "mean"
                    else f"{self.input_channels} (all C)")
        return str(self.input_channels)

    @property
    def aurocs(self) -> list[float]:
        return [r.test_auroc for r in self.runs]

    @property
    def mean(self) -> float:
        return float(np.mean(self.aurocs))

    @property
    def sd(self) -> float | None:
        """Sample standard deviation over seeds; ``None`` for one seed (there is no spread to report)."""
        return float(np.std(self.aurocs, ddof=1)) if len(self.runs) > 1 else None

    def cell(self) -> str:
        """``85.3±2.1`` (AUROC ×100), or ``85.3±n/a (1 seed)``."""
        sd = "n/a (1 seed)" if self.sd is None else f"{100 * self.sd:.1f}"
        return f"{100 * self.mean:.1f}±{sd}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.label, "kind": self.kind, "f": self.f, "C": self.C, "input_shape": self.input_shape,
                "input_channels": self.input_channels, "latent_channels": self.latent_channels or None,
                "batch_size": self.batch_size, "auroc_mean": self.mean, "auroc_sd": self.sd,
                "runs": [dataclasses.asdict(r) for r in self.runs]}


@dataclass
class CADResult:
    """A task's results: one :class:`MethodResult` per method."""

    task: str
    metric: str
    class_names: list[str]
    counts: dict[str, dict[str, int]]
    classifier: str
    config: dict[str, Any]
    rows: list[MethodResult]

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            lo, hi = auroc_ci(r.mean, self.counts.get("test", {}))
            rows.append({**r.to_dict(), "auroc_ci95": [lo, hi]})
        return {"task": self.task, "metric": self.metric, "class_names": self.class_names, "counts": self.counts,
                "classifier": self.classifier, "classifier_init": self.config.get("classifier_init"),
                "epoch_selection": self.config.get("select"), "config": self.config, "rows": rows,
                "warnings": cad_warnings(self)}


def auroc_ci(auc: float, test_counts: Mapping[str, int], z: float = 1.96) -> tuple[float, float]:
    """A 95% interval of an AUROC from the test split's class counts (Hanley & McNeil, Radiology 1982).

    Binary: positives and negatives; multi-class (macro one-vs-rest): the smallest class against the rest,
    the widest of its one-vs-rest intervals. It covers the test split's sampling only, not the spread over seeds.
    """
    counts = sorted(int(n) for n in test_counts.values())
    if len(counts) < 2 or counts[0] < 1 or not math.isfinite(auc):
        return 0.0, 1.0
    n1, n0 = counts[0], sum(counts) - counts[0]
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def cad_warnings(result: CADResult) -> list[str]:
    """Why a CAD result may not mean anything: a test split under :data:`MIN_TEST_IMAGES` images or
    :data:`MIN_TEST_PER_CLASS` per class, a single seed, rows whose AUROC 95% interval (:func:`auroc_ci`)
    covers chance (0.5) — above all the high-resolution reference, without which the other rows compare with
    nothing."""
    out = []
    test = result.counts.get("test", {})
    n, smallest = sum(test.values()), min(test.values(), default=0)
    if n < MIN_TEST_IMAGES or smallest < MIN_TEST_PER_CLASS:
        split = ", ".join(f"{c}={k}" for c, k in test.items())
        out.append(f"{result.task}: the test split has {n} image(s) ({split}); an AUROC from fewer than "
                   f"{MIN_TEST_IMAGES} test images or {MIN_TEST_PER_CLASS} per class moves a lot with one image "
                   "and says little; use more")
    if len(result.config.get("seeds", ())) == 1:
        out.append(f"{result.task}: one seed, so the sd over seeds is n/a (1 seed); use --seeds 0,1,2")
    for row in result.rows:
        lo, hi = auroc_ci(row.mean, test)
        if not lo <= 0.5 <= hi:
            continue
        where = f"AUROC {row.mean:.2f}, 95% CI {lo:.2f}–{hi:.2f} covers 0.5"
        if row.kind == "image":
            out.append(f"{result.task}: the high-resolution reference is at chance ({where}): the classifier did "
                       "not learn the task from full-resolution images, so the latent and interpolation rows have "
                       "nothing to be compared with (more images or epochs; for finefeature, a larger --contrast)")
        else:
            out.append(f"{result.task}: {row.label} is indistinguishable from chance ({where})")
    return out


def run_cad(csv_path: str | Path, methods: Sequence[Method], *, config: CADConfig | None = None,
            cache_dir: str | Path | None = None, task: str | None = None,
            spatial_dims: int | None = None) -> CADResult:
    """Train and test the classifier on each method's inputs, once per seed (paper §4.1, Table 1).

    Args:
        csv_path: CAD manifest (``path,label,split[,patient]``).
        methods: rows to compare, e.g. :func:`default_methods` of one or more MedVAE models.
        config: training and input settings.
        cache_dir: where prepared inputs are kept between runs (default: a temporary folder for this run).
        task: the task name (column of the table; default: the CSV's file stem).
        spatial_dims: 2 or 3; default: the models' (or 2 when only ``image`` is run and the first file is 2D).

    Returns:
        The results; write them with :func:`write_cad_table`.
    """
    config = config or CADConfig()
    if not methods:
        raise ValueError("give at least one method")
    data = read_cad_csv(csv_path)
    dims = _task_dims(data, methods, spatial_dims)
    if dims != 3 and any(m.kind == "stitched" for m in methods):
        raise ValueError(f"{csv_path}: stitched 2D latents (--stitched-2d) are rows of 3D tasks; this task is "
                         f"{dims}D, where the 2D model is a plain --model")
    labels = torch.tensor([e.label for e in data.entries], dtype=torch.long)
    splits = {s: data.indices(s) for s in SPLITS if data.indices(s)}
    classifier = config.classifier_for(dims)
    # before any input is prepared: a missing timm or offline weights fail now, in one line
    weights = check_classifier(classifier, dims, config.pretrained, config.pretrained_weights)
    if weights is not None:
        config = dataclasses.replace(config, pretrained_weights=str(weights))
    with tempfile.TemporaryDirectory(prefix="medlatent-cad-") as tmp:
        builder = InputBuilder(data, dims, config, Path(cache_dir) if cache_dir is not None else Path(tmp))
        rows = []
        for method in methods:
            inputs = builder.build(method)
            row = MethodResult(method.label, method.kind, method.f(dims), method.C, list(inputs.shape),
                               latent_channels=method.latent_channels if method.kind in LATENT_KINDS else "",
                               batch_size=config.batch_size_for(dims, method.kind))
            for seed in config.seeds:
                run = train_classifier(inputs, labels, splits, num_classes=data.num_classes, spatial_dims=dims,
                                       config=config, seed=seed, kind=method.kind)
                logger.info("%s seed %d: test AUROC %.4f (epoch %d)", method.label, seed, run.test_auroc, run.epoch)
                row.runs.append(run)
            rows.append(row)
    metric = "AUROC" if data.num_classes == 2 else "macro AUROC (one-vs-rest)"
    return CADResult(task or Path(csv_path).stem, metric, data.class_names, data.counts(), classifier,
                     _resolved(config, dims), rows)


def _resolved(config: CADConfig, dims: int) -> dict[str, Any]:
    """The settings a run used, defaults resolved (size, sampling) and how the classifier started."""
    return {**config.to_dict(), "size": list(config.size_for(dims)), "balanced": config.balanced_for(dims),
            "classifier_init": config.initialisation}


def _task_dims(data: CADTask, methods: Sequence[Method], spatial_dims: int | None) -> int:
    dims = {m.model.spatial_dims for m in methods if m.kind == "latent"}
    if len(dims) > 1:
        raise ValueError("the latent methods mix 2D and 3D models; run one dimensionality per task")
    if spatial_dims is not None:
        if dims and dims != {spatial_dims}:
            raise ValueError(f"spatial_dims={spatial_dims} but the models are {dims.pop()}D")
        return spatial_dims
    if dims:
        return dims.pop()
    from medlatent.io.image import ImageReadError
    from medlatent.io.readers import read_image

    first = data.entries[0]
    try:
        return read_image(first.path).spatial_dims
    except ImageReadError as e:
        raise CADDataError(f"{data.csv_path}, line {first.line}: {e}") from e


# ------------------------------------------------------------------------------------------ tables
def cad_table_rows(results: CADResult | Sequence[CADResult]) -> list[dict[str, str]]:
    """Table 1's rows: ``Method``, ``f``, ``C``, ``input ch`` (the classifier's input channels: ``1 (mean of
    C=4)`` for a channel-averaged latent), one column per task (AUROC ×100 as ``mean±sd``) and, for several
    tasks, ``Average`` (of the means)."""
    results = [results] if isinstance(results, CADResult) else list(results)
    keys: list[tuple[str, int, int, str]] = []
    cells: dict[tuple[str, int, int, str], dict[str, MethodResult]] = {}
    for res in results:
        for row in res.rows:
            k = (row.label, row.f, row.C, row.input_description)
            if k not in cells:
                keys.append(k)
                cells[k] = {}
            cells[k][res.task] = row
    tasks = [r.task for r in results]
    rows = []
    for k in keys:
        row = {"Method": k[0], "f": str(k[1]), "C": str(k[2]), "input ch": k[3]}
        for t in tasks:
            m = cells[k].get(t)
            row[t] = m.cell() if m else "–"
        if len(tasks) > 1:
            vals = [cells[k][t].mean for t in tasks if t in cells[k]]
            row["Average"] = f"{100 * float(np.mean(vals)):.1f}" if len(vals) == len(tasks) else "–"
        rows.append(row)
    return rows


def _protocol_note(res: CADResult) -> str:
    """Which epoch was tested and how the classifier started (App. B.1: the final epoch, a pretrained HRNet)."""
    cfg = res.config
    epochs = cfg.get("epochs")
    kept = sorted({r.epoch + 1 for row in res.rows for r in row.runs})
    if cfg.get("select") == "best" and all(r.val_auroc is None for row in res.rows for r in row.runs):
        rule = f"the last epoch ({epochs} of {epochs}: --select best, but the CSV has no val split with every class)"
    elif cfg.get("select") == "best":
        rule = (f"the epoch of the best validation AUROC (--select best; the paper tests the last): epochs "
                f"{', '.join(map(str, kept))} of {epochs}")
    else:
        rule = f"the last epoch ({epochs} of {epochs}, the paper's rule)"
    init = cfg.get("classifier_init", "")
    if res.classifier == "hrnet_w64" and init == "from scratch":
        init += " (the paper starts HRNet-w64 from ImageNet weights: --pretrained or --pretrained-weights PATH)"
    sampling = "class-balanced" if cfg.get("balanced") else "uniform"
    return f"- {res.task}: tested {rule}; classifier {res.classifier}, {init}; {sampling} sampling."


def _notes(results: Sequence[CADResult]) -> list[str]:
    seeds = ", ".join(str(s) for s in results[0].config["seeds"])
    notes = [f"AUROC ×100 (binary; macro one-vs-rest for multi-class), mean ± sd over seeds {seeds}; "
             f"classifier {results[0].classifier}."]
    notes += [_protocol_note(res) for res in results if "select" in res.config]
    for res in results:
        counts = "; ".join(f"{s}: " + ", ".join(f"{c}={n}" for c, n in cs.items()) for s, cs in res.counts.items())
        notes.append(f"- {res.task}: {res.metric}; classes {', '.join(res.class_names)}; rows per split {counts}.")
    seen = set()
    for res in results:
        for row in res.rows:
            if row.kind not in LATENT_KINDS or row.C < 2 or (row.label, row.latent_channels) in seen:
                continue
            seen.add((row.label, row.latent_channels))
            if row.latent_channels == "mean":
                notes.append(f"- {row.label}: the classifier saw 1 input channel, the mean of the {row.C} latent "
                             f"channels (the paper's App. B.1); `--latent-channels all` gives it all {row.C}.")
            else:
                notes.append(f"- {row.label}: the classifier saw all {row.C} latent channels as {row.input_channels} "
                             "input channels (`--latent-channels all`; the paper averages them).")
    return notes


def _warnings(results: Sequence[CADResult]) -> list[str]:
    return [w for res in results for w in cad_warnings(res)]


def cad_markdown(results: CADResult | Sequence[CADResult], title: str = "CAD tasks") -> str:
    """A Table-1-style Markdown table: Method | f | C | one column per task (AUROC ×100, mean±sd) | Average."""
    results = [results] if isinstance(results, CADResult) else list(results)
    rows = cad_table_rows(results)
    head = list(rows[0])
    notes = _notes(results)
    lines = [f"# {title}", "", notes[0], "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r[c] for c in head) + " |" for r in rows]
    warnings = _warnings(results)
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- **{w}**" for w in warnings]
    return "\n".join(lines + [""] + notes[1:]) + "\n"


def write_cad_table(results: CADResult | Sequence[CADResult], out_dir: str | Path, stem: str = "cad",
                    title: str = "CAD tasks") -> dict[str, Path]:
    """Write ``<stem>.md`` (Table-1 style), ``<stem>.csv`` (one line per task × method), ``<stem>.json`` and
    ``report.md`` (with an AUROC bar chart per task, ``<stem>_auroc_<i>.png``, when matplotlib is installed)."""
    from medlatent.io.atomic import atomic_write

    results = [results] if isinstance(results, CADResult) else list(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    with atomic_write(paths["markdown"]) as tmp:
        tmp.write_text(cad_markdown(results, title), encoding="utf-8")
    with atomic_write(paths["csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "method", "kind", "f", "C", "input_channels", "latent_channels", "input_shape",
                    "auroc_mean", "auroc_sd", "auroc_ci95_low", "auroc_ci95_high", "seeds", "auroc_per_seed"])
        for res in results:
            for row in res.rows:
                lo, hi = auroc_ci(row.mean, res.counts.get("test", {}))
                w.writerow([res.task, row.label, row.kind, row.f, row.C, row.input_channels, row.latent_channels,
                            "x".join(map(str, row.input_shape)), f"{row.mean:.6f}",
                            "" if row.sd is None else f"{row.sd:.6f}", f"{lo:.6f}", f"{hi:.6f}",
                            ";".join(str(r.seed) for r in row.runs), ";".join(f"{a:.6f}" for a in row.aurocs)])
    with atomic_write(paths["json"]) as tmp:
        tmp.write_text(json.dumps([r.to_dict() for r in results], indent=2), encoding="utf-8")
    paths["report"] = _report(results, out, stem, title)
    return paths


def _report(results: Sequence[CADResult], out: Path, stem: str, title: str) -> Path:
    """``report.md`` (the table, notes and one AUROC bar chart per task when matplotlib is installed)."""
    from medlatent.evaluation.report import bar_chart, write_report

    figures = []
    for i, res in enumerate(results):
        summary = {r.label: {"AUROC": (r.mean, r.sd)} for r in res.rows}
        try:
            png = bar_chart(summary, "AUROC", out / f"{stem}_auroc_{i}.png", title=res.task, ylabel=res.metric)
        except ImportError as e:  # matplotlib is optional: the tables are the result
            logger.info("no AUROC chart (%s)", e)
            break
        figures.append((f"{res.task}: test {res.metric}, mean ± sd over seeds", png))
    return write_report(out, title, [("Test AUROC ×100", cad_table_rows(results))], figures, _notes(results),
                        warnings=_warnings(results))
