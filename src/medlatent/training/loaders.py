"""The datasets and loaders of a run: :func:`build_datasets` (training and validation sets from the ``data``
section) and :func:`make_loader` (a DataLoader over an :class:`~medlatent.training.sampler.EpochSampler`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from medlatent.training.data_config import DataConfig, DataError
from medlatent.training.dataset import ImageDataset
from medlatent.training.sampler import EpochSampler
from medlatent.training.splits import split_sources

logger = logging.getLogger("medlatent.training.data")  # the public module's name: log lines read as before


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
