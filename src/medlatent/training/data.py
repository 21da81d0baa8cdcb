"""Training data: image sources (folders, CSV manifests), random crops/patches/slices, and resumable sampling.

Every training image is normalised by :func:`medlatent.preprocessing.preprocess` — the same intensity maps
inference uses (2D: per-image min–max; 3D CT: HU window [-1000, 1000]; 3D MRI: min–max or percentiles; 3D
volumes reoriented to RAS) — so a model sees the same value range in training and at encode time. Then
(Paper, App. A, "Stage 2" for 3D; official ``load_*_finetune`` loaders):

* 3D: random cubic patches (64³ in the paper); a volume smaller than the patch along an axis is padded
  with ``pad_value`` (-1, i.e. -1000 HU for CT, as the official loaders do), centred, before cropping.
* 2D: ``random_crop`` (native resolution, padded with ``pad_value`` when smaller than the crop — the same
  rule as 3D, so small images are never rescaled), ``resize`` (the whole image to ``size×size``, bilinear with
  antialiasing — as the official 2D fine-tuning loader, which resized to 384²), or ``random_resized_crop``
  (a random square of 50–100 % of the short side, resized to ``size×size``), or ``multiscale`` (a random square
  whose side is log-uniform between ``size`` and the short side, shrunk to ``size×size``: every scale from the
  native resolution to the whole (short side of the) image, never enlarged). 3D volumes in a 2D set give
  random axial/coronal/sagittal slices, normalised with the volume's intensity map (CT keeps its HU window).

Randomness is never global: a sample is a pure function of its key ``(index, item_seed)``, and the keys come
from :class:`EpochSampler`, a function of ``(seed, epoch)``. So a run resumes exactly mid-epoch
(``set_epoch(epoch, start_batch)``) and gives the same batches with any number of loader workers.

Unlike the official loaders, an unreadable file is an error naming the file — never a blank image.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np
import torch
from annotated_types import Ge, Interval
from pydantic import AfterValidator, BeforeValidator, NonNegativeInt
from torch.utils.data import DataLoader, Dataset, Sampler

from medlatent.io.image import ImageReadError
from medlatent.io.tables import read_csv_rows
from medlatent.preprocessing import PreprocessingError, preprocess
from medlatent.training.options import check_fields, check_keys, option

logger = logging.getLogger(__name__)

Mode = Literal["random_crop", "resize", "random_resized_crop", "multiscale"]
Modality = Literal["auto", "ct", "mri", "xray", "other"]
MODES: tuple[str, ...] = get_args(Mode)
MODALITIES: tuple[str, ...] = get_args(Modality)
SPLITS = ("train", "val", "test")
# random_resized_crop: the default range of the square crop's side, as a fraction of the image's short side
RESIZED_CROP_SIDE = (0.5, 1.0)
# slices from volumes: tries for a slice with some content (std in [-1, 1] units above SLICE_MIN_STD);
# background-only slices (air, padding) would teach the model nothing
SLICE_TRIES = 10
SLICE_MIN_STD = 0.05
DEFAULT_ITEM_SEED = 0  # the seed an int key uses


class DataError(ValueError):
    """Training data that cannot be used; the message names the CSV, row or file and what to do."""


# ------------------------------------------------------------------------------------------ config
def normalise_val(value: Any) -> str | None:
    """``data.val`` as ``"auto"``, a source path, or None for no validation (``none``, null or empty)."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() in ("", "none", "null", "false"):
        return None
    return "auto" if text.lower() == "auto" else text


def _source(value: Any) -> str:
    return "" if value is None else str(value)  # a Path, or unset (build_datasets refuses an empty one)


def _fraction_pair(pair: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 < pair[0] <= pair[1] <= 1.0:
        raise ValueError("must satisfy 0 < low ≤ high ≤ 1 (fractions of the short side)")
    return pair


def _percentile_pair(pair: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 <= pair[0] < pair[1] <= 100.0:
        raise ValueError("must be (low, high) with 0 ≤ low < high ≤ 100")
    return pair


@dataclass
class DataConfig:
    """Where the training images are and how they are cut into training samples (the ``data`` section).

    The annotations are the rules (checked by pydantic when the section is built, :func:`check_fields`);
    an :class:`ImageDataset` cuts its samples by the same object.
    """

    train: Annotated[str, BeforeValidator(_source)] = option(
        help="REQUIRED. A folder (walked recursively; DICOM series become volumes) or a CSV manifest with columns "
             "`path` (relative to the CSV's folder), optional `split` (train/val/test) and `modality` "
             "(ct/mri/xray/other). A CSV with a `split` column trains on its `train` rows.")
    val: Annotated[str | None, BeforeValidator(normalise_val)] = option(
        "auto", "Validation images: `auto` (a CSV's `val` rows when it has a split column, else a seeded "
                "`val_fraction` of the training files, held out from training and listed in `val_split.txt`); a "
                "folder or CSV (its `val` rows when it has a split column); or `none` (also null) for no "
                "validation.")
    val_fraction: Annotated[float, Interval(ge=0.0, lt=1.0)] = option(
        0.1, "With `val: auto` and no split column: the fraction of training files held out for validation (at "
             "least one file when there are two or more; 0 holds none out).")
    spatial_dims: Literal[2, 3] = option(2, "2 or 3 (the model's).")
    in_channels: Literal[1, 3] = option(1, "The model's input channels (1 or 3); RGB files are averaged for 1, "
                                           "gray repeated for 3.")
    size: Annotated[int, Ge(2)] = option(256, "Crop side (2D) or cubic patch side (3D; 64 in the paper); a multiple "
                                              "of the model's reduction.")
    mode: Mode = option("random_crop", "2D only: `random_crop` (native resolution), `resize` (whole image to "
                                       "size×size, as the official 2D fine-tuning), `random_resized_crop` or "
                                       "`multiscale` (native-resolution crops to the downscaled whole image). 3D "
                                       "always uses random patches.")
    crop_side: Annotated[tuple[float, float], AfterValidator(_fraction_pair)] = option(
        RESIZED_CROP_SIDE, "`random_resized_crop` only: range of the crop's side as a fraction of the image's "
                           "short side (uniform).")
    flips: bool = option(True, "Random flips (2D: horizontal and vertical; 3D: each axis), training only.")
    invert: Annotated[float, Interval(ge=0.0, le=1.0)] = option(
        0.0, "Probability of inverting a training sample's intensities (x → −x).")
    modality: Modality = option("auto", "`auto` (from the file) or ct/mri/xray/other for every image without a "
                                        "CSV modality.")
    mri_percentiles: Annotated[tuple[float, float], AfterValidator(_percentile_pair)] | None = option(
        None, "Clip 3D MRI to these percentiles before min–max, as at inference (null: plain min–max).")
    slices_from_volumes: bool = option(True, "2D only: 3D files give random 2D slices (else a 3D file is an "
                                             "error).")
    cache: bool = option(True, "Keep each preprocessed image in memory (per loader worker); 4 bytes per "
                               "pixel/voxel per worker.")
    num_workers: NonNegativeInt = option(2, "Data loader processes (0: load in the training process).")
    pad_value: Annotated[float, Interval(ge=-1.0, le=1.0)] = option(
        -1.0, "Value of the padding around images smaller than the crop (-1: the bottom of the range).")

    def __post_init__(self) -> None:
        check_fields(self, "data", DataError)
        if self.spatial_dims == 3 and self.mode != "random_crop":
            raise DataError(f"data.mode {self.mode!r} is for 2D data; 3D training always uses random cubic patches "
                            "(leave it at random_crop)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from plain values (JSON/YAML); an unknown key is an error that names the closest valid key."""
        check_keys(cls, d, "", DataError)
        return cls(**d)


# ------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class Entry:
    """One training image: a file, or a DICOM series folder (``files`` = its slices, when known)."""

    path: Path
    modality: str = "auto"
    files: tuple[Path, ...] | None = None


def is_manifest(source: str | Path) -> bool:
    return Path(source).suffix.lower() == ".csv"


def read_source(source: str | Path, *, split: str | None = None, modality: str = "auto",
                required: bool = True) -> list[Entry]:
    """The images of a folder or CSV manifest.

    Args:
        source: a folder (walked recursively with :func:`medlatent.io.discover.discover`), a single image
            file, or a ``.csv`` manifest (columns ``path``, optional ``split`` and ``modality``).
        split: with a CSV that has a ``split`` column, keep only rows of this split (ignored otherwise).
        modality: the modality of entries the CSV gives none for.
        required: an empty selection is an error (else an empty list).

    Raises:
        DataError: missing source, CSV without ``path`` column, a row naming a missing file, a bad
            ``split``/``modality`` value, or (``required``) nothing selected.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder (give a folder of images or a CSV manifest)")
    if is_manifest(source):
        return _read_manifest(source, split=split, modality=modality, required=required)
    from medlatent.io.discover import discover

    items, skipped = discover([source])
    if skipped:
        logger.warning("%s: skipped %d files that are not readable images (first: %s: %s)",
                       source, len(skipped), skipped[0][0], skipped[0][1])
    if not items:
        raise DataError(f"{source}: no readable images found (medlatent reads PNG/JPEG/TIFF/BMP, DICOM, NIfTI, "
                        "NRRD and MHA/MHD)")
    return [Entry(it.source, modality, tuple(it.paths) if it.kind == "dicom-series" else None) for it in items]


def manifest_has_split(source: str | Path) -> bool:
    return is_manifest(source) and "split" in _manifest_rows(Path(source))[0]


def _manifest_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(lower-cased column names, [(line number, row)])."""
    try:
        return read_csv_rows(csv_path, lower=True)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot be read as a CSV manifest ({type(e).__name__}: {e})") from e


def _read_manifest(csv_path: Path, *, split: str | None, modality: str, required: bool) -> list[Entry]:
    columns, rows = _manifest_rows(csv_path)
    if "path" not in columns:
        raise DataError(f"{csv_path}: the manifest needs a 'path' column (found columns: "
                        f"{', '.join(columns) or 'none'}); optional columns: split, modality")
    has_split = "split" in columns
    entries: list[Entry] = []
    for line, row in rows:
        where = f"{csv_path}, line {line}"
        if not any(row.values()):
            continue  # blank line
        if has_split:
            row_split = row.get("split", "").lower()
            if row_split not in SPLITS:
                raise DataError(f"{where}: split must be one of {', '.join(SPLITS)}, got {row.get('split')!r}")
            if split is not None and row_split != split:
                continue
        raw = row.get("path", "")
        if not raw:
            raise DataError(f"{where}: empty path")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = csv_path.parent / path
        if not path.exists():
            raise DataError(f"{where}: file {path} does not exist (relative paths are relative to the CSV's "
                            "folder)")
        mod = row.get("modality", "").lower() or modality
        if mod not in MODALITIES:
            raise DataError(f"{where}: modality must be one of {', '.join(MODALITIES)}, got {row['modality']!r}")
        entries.append(Entry(path, mod))
    if not entries and required:
        what = f" with split {split!r}" if has_split and split is not None else ""
        raise DataError(f"{csv_path}: no rows{what} — nothing to train or validate on")
    return entries


# ------------------------------------------------------------------------------------------ sample geometry
def pad_to(x: np.ndarray, size: int, value: float) -> np.ndarray:
    """Pad every spatial axis of ``x`` (``C×…``) shorter than ``size`` up to ``size``, centred, with ``value``."""
    pad = [(0, 0)] + [((size - n) // 2, size - n - (size - n) // 2) if n < size else (0, 0) for n in x.shape[1:]]
    if not any(p[0] or p[1] for p in pad):
        return x
    return np.pad(x, pad, mode="constant", constant_values=value)


def crop_starts(shape: tuple[int, ...], size: int, rng: np.random.Generator | None) -> tuple[int, ...]:
    """Start of a ``size``-cube inside ``shape`` (each axis ≥ size): random with ``rng``, else centred."""
    if rng is None:
        return tuple((n - size) // 2 for n in shape)
    return tuple(int(rng.integers(0, n - size + 1)) for n in shape)


def crop(x: np.ndarray, starts: tuple[int, ...], size: int) -> np.ndarray:
    return x[(slice(None), *(slice(s, s + size) for s in starts))]


def resize2d(x: np.ndarray, size: int) -> np.ndarray:
    """``C×H×W`` → ``C×size×size``: bilinear, antialiased when shrinking, clamped to [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    y = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y[0].clamp_(-1.0, 1.0).numpy()


def pick_slice(vol: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """A 2D slice ``1×A×B`` of a volume ``1×X×Y×Z`` (RAS).

    With ``rng``: a random axis and position, retried up to :data:`SLICE_TRIES` times for a slice whose std
    exceeds :data:`SLICE_MIN_STD` (else the most varied one tried). Without: the middle axial slice.
    """
    if rng is None:
        return vol[..., vol.shape[-1] // 2]
    best, best_std = None, -1.0
    for _ in range(SLICE_TRIES):
        axis = int(rng.integers(0, 3))
        k = int(rng.integers(0, vol.shape[1 + axis]))
        s = np.take(vol, k, axis=1 + axis)
        std = float(s.std())
        if std > SLICE_MIN_STD:
            return s
        if std > best_std:
            best, best_std = s, std
    return best


# ------------------------------------------------------------------------------------------ dataset
def _split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"a dataset key is an index or (index, item_seed), got {key!r}")
        return int(key[0]), int(key[1])
    return int(key), DEFAULT_ITEM_SEED


class ImageDataset(Dataset):
    """Training or validation samples cut from a list of images.

    ``ds[key]`` with ``key = (index, item_seed)`` (what :class:`EpochSampler` yields) or an ``int`` index
    (item_seed 0). A sample is a pure function of the key: every random choice (crop position, flips,
    slice, crop scale) comes from ``numpy.random.default_rng([index, item_seed])``. With ``train=False`` no
    choice is random (centre crop/patch, middle axial slice, no flips or inversion) and the seed is ignored.

    Returns ``{"image": x, "index": index}`` where ``x`` is a float32 tensor in [-1, 1]: ``C×S×S`` (2D,
    ``C = data.in_channels``) or ``1×S×S×S`` (3D; ``C = data.in_channels``), ``S = data.size``. The loader
    stacks these into ``B×C×S×S`` / ``B×C×S×S×S`` batches and ``index`` into a ``B`` int64 tensor.

    Raises (from ``ds[key]``): :class:`medlatent.io.image.ImageReadError` or :class:`DataError` naming the
    file when it cannot be read or does not fit the model (e.g. a 2D image in a 3D set).
    """

    def __init__(self, entries: list[Entry] | list[tuple[str | Path, str]], data: DataConfig | None = None, *,
                 train: bool = True, **options: Any) -> None:
        """
        Args:
            entries: the images (:class:`Entry`, or ``(path, modality)`` pairs).
            data: how samples are cut (``size``, ``mode``, ``flips``, ``invert``, ...): the ``data`` section
                of a training config, whose image sources (``train``, ``val``) are not used here. Default:
                :class:`DataConfig`'s defaults.
            train: random samples and augmentation (else deterministic validation samples).
            **options: :class:`DataConfig` fields that replace those of ``data`` (``size=32, mode="resize"``).
        """
        if data is None:
            data = DataConfig(train="", **options)
        elif options:
            data = dataclasses.replace(data, **options)  # checked again, as any DataConfig
        self.data = data
        self.entries = [e if isinstance(e, Entry) else Entry(Path(e[0]), e[1]) for e in entries]
        if not self.entries:
            raise DataError("an ImageDataset needs at least one image")
        for e in self.entries:
            if e.modality not in MODALITIES:
                raise DataError(f"{e.path}: modality must be one of {', '.join(MODALITIES)}, got {e.modality!r}")
        self.train = train
        self._cache: dict[int, np.ndarray] = {}
        #: how the images were chosen (validation sets: from the data config; shown in val_split.txt)
        self.selection = ""

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, item_seed = _split_key(key)
        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.entries)} images")
        x = self.array(index)
        rng = np.random.default_rng([index, item_seed]) if self.train else None
        if self.data.spatial_dims == 3:
            out = self._patch3d(x, rng)
        else:
            if x.ndim == 4:  # a volume in a 2D set: one slice (1×A×B)
                x = pick_slice(x, rng)
            out = self._view2d(x, rng)
        if out.shape[0] != self.data.in_channels:  # gray file for an RGB model (RGB→gray is done by preprocess)
            out = np.repeat(out, self.data.in_channels, axis=0)
        # always a copy: a crop can be a view of the cached image, which must not be changed through the batch
        return {"image": torch.from_numpy(np.array(out, dtype=np.float32, copy=True)), "index": index}

    def array(self, index: int) -> np.ndarray:
        """The whole preprocessed image in [-1, 1]: ``C×H×W`` (2D file) or ``1×X×Y×Z`` (3D file, RAS)."""
        if index in self._cache:
            return self._cache[index]
        x = self._load(self.entries[index])
        if self.data.cache:
            self._cache[index] = x
        return x

    def _load(self, entry: Entry) -> np.ndarray:
        from medlatent.io.dicom import read_dicom_series
        from medlatent.io.readers import read_image

        path = entry.path
        try:
            # uneven DICOM slice spacing is resampled: patches care little, and one such series should not
            # stop a long run
            if entry.files is not None:
                img = read_dicom_series(path, uneven="resample", files=list(entry.files))
            else:
                img = read_image(path, uneven="resample")
            dims = img.spatial_dims
            if dims != self.data.spatial_dims:
                if self.data.spatial_dims == 3:
                    raise DataError(f"{path}: a 2D image (shape {img.array.shape}) in a 3D training set; "
                                    "train a 2D model on it, or remove it from the set")
                if not self.data.slices_from_volumes:
                    raise DataError(f"{path}: a 3D volume (shape {img.array.shape}) in a 2D training set; set "
                                    "slices_from_volumes=true to train on its slices, or remove it")
            x, _ = preprocess(img, spatial_dims=dims, in_channels=self.data.in_channels, downsample=1,
                              modality=entry.modality, mri_percentiles=self.data.mri_percentiles)
        except (ImageReadError, PreprocessingError, DataError):
            raise  # these name the file already
        except Exception as e:
            raise DataError(f"{path}: cannot be prepared for training ({type(e).__name__}: {e})") from e
        return x

    def _view2d(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """``C×H×W`` → ``C×S×S`` per ``data.mode``; then random flips (training)."""
        s = self.data.size
        if self.data.mode == "resize":
            y = resize2d(x, s)
        elif self.data.mode == "random_resized_crop" and rng is not None:
            h, w = x.shape[1:]
            side = max(2, min(h, w, round(min(h, w) * rng.uniform(*self.data.crop_side))))
            y = resize2d(crop(x, crop_starts((h, w), side, rng), side), s)
        elif self.data.mode == "multiscale" and rng is not None:
            h, w = x.shape[1:]
            short = min(h, w)
            side = s if short <= s else round(math.exp(rng.uniform(math.log(s), math.log(short))))
            if side <= s:  # native resolution (padded when the image is smaller)
                x = pad_to(x, s, self.data.pad_value)
                y = crop(x, crop_starts(x.shape[1:], s, rng), s)
            else:
                y = resize2d(crop(x, crop_starts((h, w), side, rng), side), s)
        else:  # random_crop, and validation of random_resized_crop / multiscale: native resolution
            x = pad_to(x, s, self.data.pad_value)
            y = crop(x, crop_starts(x.shape[1:], s, rng), s)
        return self._flip(y, rng)

    def _patch3d(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        x = pad_to(x, self.data.size, self.data.pad_value)
        return self._flip(crop(x, crop_starts(x.shape[1:], self.data.size, rng), self.data.size), rng)

    def _flip(self, y: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """Training augmentation: random flips, then (with probability ``invert``) an intensity inversion."""
        if rng is None:
            return y
        if self.data.flips:
            axes = tuple(ax for ax in range(1, y.ndim) if rng.random() < 0.5)
            y = np.flip(y, axes) if axes else y
        if self.data.invert and rng.random() < self.data.invert:  # no draw when off: samples stay as before
            y = -y
        return y


# ------------------------------------------------------------------------------------------ sampling
class EpochSampler(Sampler):
    """Deterministic, shardable, resumable keys ``(index, item_seed)`` for an :class:`ImageDataset`.

    Epoch ``e`` is one global stream of positions ``p = 0, 1, …``: position ``p`` holds dataset index
    ``order[p]`` (permutations of the dataset drawn from ``(seed, e)``, concatenated) and
    ``item_seed[p]`` (a 63-bit number drawn from ``(seed, e)``). Both depend only on ``(seed, e, p)`` — not
    on the batch size, the number of ranks or loader workers — so a sample is the same wherever it lands.

    The stream is cut into global batches of ``batch_size × world_size`` positions; rank ``r`` takes
    positions ``r, r + world_size, …`` of each (a disjoint strided share; together the ranks cover the
    global batch). Every batch is full: with ``drop_last`` the leftover ``len % global_batch`` positions
    are dropped, without it the last batch is filled from the next permutation (some images twice). A
    dataset smaller than one global batch fills it by repeating permutations (sampling with replacement
    across, never within, a permutation).

    Resuming mid-epoch: ``set_epoch(epoch, start_batch=k)`` skips the first ``k`` batches; the rest is
    identical to an uninterrupted epoch (same ``batch_size × world_size`` required).

    Args:
        length: dataset size (≥ 1).
        batch_size: per-rank batch size (what the DataLoader is given).
        seed: run seed (≥ 0).
        rank, world_size: this process and the number of processes.
        drop_last: see above.
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True) -> None:
        if length < 1:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got length {length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size ≥ 1, got rank {rank} of {world_size}")
        self.length = int(length)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start_batch = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (each rank yields this many, before any ``start_batch`` skip)."""
        n, g = self.length, self.global_batch
        return n // g if self.drop_last and n >= g else -(-n // g)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; skip its first ``start_batch`` batches (resume after that many finished)."""
        if epoch < 0:
            raise ValueError(f"epoch must be ≥ 0, got {epoch}")
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}] (batches per epoch), "
                             f"got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def global_keys(self, epoch: int | None = None) -> list[tuple[int, int]]:
        """All keys of the epoch's global stream, in order (every rank's share, interleaved)."""
        order, seeds = self._stream(self.epoch if epoch is None else epoch)
        return [(int(i), int(s)) for i, s in zip(order, seeds)]

    def _stream(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        total = self.batches_per_epoch * self.global_batch
        rng = np.random.default_rng([self.seed, epoch])
        perms = [rng.permutation(self.length) for _ in range(math.ceil(total / self.length))]
        order = np.concatenate(perms)[:total]
        # a separate stream for the item seeds: raw 64-bit draws, so position p's seed does not depend on total
        raw = np.random.PCG64(np.random.SeedSequence([self.seed, epoch, 1])).random_raw(total)
        return order, (raw >> np.uint64(1)).astype(np.int64)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self._stream(self.epoch)
        g, w = self.global_batch, self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            for p in range(b * g + self.rank, (b + 1) * g, w):
                yield int(order[p]), int(seeds[p])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


# ------------------------------------------------------------------------------------------ building
def hold_out(entries: list[Entry], fraction: float, seed: int) -> tuple[list[Entry], list[Entry]]:
    """Split ``entries`` by file into (train, validation): a seeded random ``fraction`` held out.

    At least one file is held out when there are two or more and ``fraction > 0``; at least one stays for
    training. The choice depends only on ``seed`` and the sorted paths, so a resumed run holds out the same files.
    """
    n = len(entries)
    if fraction <= 0 or n < 2:
        return list(entries), []
    k = min(n - 1, max(1, round(fraction * n)))
    order = sorted(range(n), key=lambda i: str(entries[i].path))
    picked = set(np.random.default_rng([seed, 7919]).choice(order, size=k, replace=False).tolist())
    return [e for i, e in enumerate(entries) if i not in picked], [e for i, e in enumerate(entries) if i in picked]


def split_sources(cfg: DataConfig, seed: int = 0) -> tuple[list[Entry], list[Entry] | None, str]:
    """The training and validation images ``cfg`` selects, and how the validation set was chosen.

    Returns:
        ``(train, val, how)``: ``val`` is None without validation; ``how`` is a short phrase for logs and
        ``val_split.txt`` (``"held out 10% of the training files (seed 0)"``, ``"val rows of x.csv"``, …).
    """
    train_entries = read_source(cfg.train, split="train", modality=cfg.modality)
    if cfg.val is None:
        return train_entries, None, "no validation (data.val: none)"
    if cfg.val != "auto":
        return train_entries, read_source(cfg.val, split="val", modality=cfg.modality), f"data.val={cfg.val}"
    if manifest_has_split(cfg.train):
        val = read_source(cfg.train, split="val", modality=cfg.modality, required=False) or None
        return train_entries, val, f"the 'val' rows of {cfg.train}" if val else f"none: {cfg.train} has no val rows"
    train_entries, val = hold_out(train_entries, cfg.val_fraction, seed)
    if not val:
        why = "data.val_fraction is 0" if cfg.val_fraction <= 0 else "only one training file"
        logger.warning("no validation: %s (give data.val=FOLDER|CSV to validate on other images)", why)
        return train_entries, None, f"none: {why}"
    return train_entries, val, (f"held out {len(val)} of {len(train_entries) + len(val)} training files "
                                f"(data.val_fraction {cfg.val_fraction:g}, seed {seed})")


def build_datasets(cfg: DataConfig, *, downsample: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset | None]:
    """The training set (random samples) and the validation set (deterministic samples, or None).

    Args:
        cfg: the data section of the training configuration.
        downsample: the model's per-axis reduction (4 or 8); ``cfg.size`` must be a multiple of it so that
            latents tile the crop exactly.
        seed: seed of the automatic validation split (``data.val: auto`` on a folder).
    """
    if not cfg.train:
        raise DataError("data.train is not set: give a folder of images or a CSV manifest "
                        "(columns path[, split, modality])")
    if downsample < 1 or cfg.size % downsample:
        raise DataError(f"data.size {cfg.size} must be a multiple of the model's reduction per axis ({downsample}), "
                        f"e.g. {max(downsample, cfg.size // downsample * downsample)}")
    train_entries, val_entries, how = split_sources(cfg, seed)

    train = ImageDataset(train_entries, cfg, train=True)
    val = ImageDataset(val_entries, cfg, train=False) if val_entries else None  # no augmentation: no invert
    if val is not None:
        val.selection = how
    logger.info("training images: %d from %s; validation: %s", len(train), cfg.train, how)
    return train, val


def _worker_init(worker_id: int) -> None:
    # samples take their randomness from their keys; seeding the global generators only guards against
    # third-party code (readers, plugins) that draws from them
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(ds: ImageDataset, sampler: Sampler | None, batch_size: int, num_workers: int) -> DataLoader:
    """A DataLoader giving ``{"image": B×C×S×S[×S] float32 in [-1, 1], "index": B int64}`` batches.

    Args:
        ds: the dataset.
        sampler: an :class:`EpochSampler` for training (its ``batch_size`` must equal ``batch_size``); None
            for validation (every image once, in order, deterministic).
        batch_size: per-rank batch size.
        num_workers: loader processes. Workers are not persistent, so a new ``set_epoch`` takes effect at the
            next ``iter(loader)``.
    """
    if isinstance(sampler, EpochSampler) and sampler.batch_size != batch_size:
        raise ValueError(f"the sampler's batch_size ({sampler.batch_size}) must equal the loader's ({batch_size}); "
                         "otherwise loader batches straddle the sampler's (and its resume points)")
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=False, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False, worker_init_fn=_worker_init,
        # the loader's own seed draws come from this generator, not the global one the training loop uses
        generator=torch.Generator().manual_seed(0),
    )
