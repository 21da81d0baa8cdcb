"""Training data: image sources (folders, CSV manifests), random crops/patches/slices, and resumable sampling.

The public entry: every name below is re-exported from the one-job module that holds it.

* :mod:`~medlatent.training.data_config` — the ``data`` section (:class:`DataConfig`, :class:`DataError`).
* :mod:`~medlatent.training.sources` — folders and CSV manifests read into :class:`Entry` items.
* :mod:`~medlatent.training.splits` — which images train and which validate (``data.val``, the seeded hold-out).
* :mod:`~medlatent.training.crops` — one sample cut from a preprocessed image: 2D crops (``random_crop``,
  ``resize``, ``random_resized_crop``, ``multiscale``), 3D random cubic patches, slices of volumes, flips and
  inversion.
* :mod:`~medlatent.training.dataset` — :class:`ImageDataset`: reads, preprocesses (the intensity maps inference
  uses) and caches images, and cuts a sample per key ``(index, item_seed)``.
* :mod:`~medlatent.training.sampler` — :class:`EpochSampler`: the keys of an epoch, a function of
  ``(seed, epoch)``, so a run resumes exactly mid-epoch and gives the same batches with any number of workers.
* :mod:`~medlatent.training.loaders` — :func:`build_datasets` and :func:`make_loader`.

Unlike the official loaders, an unreadable file is an error naming the file — never a blank image.
"""

from __future__ import annotations

from medlatent.training.crops import (
    SLICE_MIN_STD,
    SLICE_TRIES,
    augment,
    crop,
    crop_starts,
    cut_sample,
    pad_to,
    patch3d,
    pick_slice,
    resize2d,
    view2d,
)
from medlatent.training.data_config import (
    MODALITIES,
    MODES,
    RESIZED_CROP_SIDE,
    DataConfig,
    DataError,
    Modality,
    Mode,
    normalise_val,
)
from medlatent.training.dataset import DEFAULT_ITEM_SEED, ImageDataset
from medlatent.training.loaders import build_datasets, make_loader
from medlatent.training.sampler import EpochSampler
from medlatent.training.sources import SPLITS, Entry, is_manifest, manifest_has_split, read_source
from medlatent.training.splits import hold_out, split_sources

__all__ = [
    "DEFAULT_ITEM_SEED", "MODALITIES", "MODES", "RESIZED_CROP_SIDE", "SLICE_MIN_STD", "SLICE_TRIES", "SPLITS",
    "DataConfig", "DataError", "Entry", "EpochSampler", "ImageDataset", "Modality", "Mode", "augment",
    "build_datasets", "crop", "crop_starts", "cut_sample", "hold_out", "is_manifest", "make_loader",
    "manifest_has_split", "normalise_val", "pad_to", "patch3d", "pick_slice", "read_source", "resize2d",
    "split_sources", "view2d",
]
