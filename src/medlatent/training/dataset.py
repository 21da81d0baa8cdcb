"""The training and validation samples of a list of images: :class:`ImageDataset`.

Every image is normalised by :func:`medlatent.preprocessing.preprocess` — the same intensity maps inference
uses (2D: per-image min–max; 3D CT: HU window [-1000, 1000]; 3D MRI: min–max or percentiles; 3D volumes
reoriented to RAS) — so a model sees the same value range in training and at encode time; then
:func:`medlatent.training.crops.cut_sample` cuts the sample.

Randomness is never global: a sample is a pure function of its key ``(index, item_seed)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medlatent.io.image import ImageReadError
from medlatent.preprocessing import PreprocessingError, preprocess
from medlatent.training.crops import cut_sample
from medlatent.training.data_config import MODALITIES, DataConfig, DataError
from medlatent.training.sources import Entry

DEFAULT_ITEM_SEED = 0  # the seed an int key uses


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
        out = cut_sample(x, self.data, rng)
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
