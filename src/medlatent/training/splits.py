"""Which images train and which validate (``data.train``, ``data.val``, ``data.val_fraction``).

``data.val: auto`` takes a CSV's ``val`` rows when it has a split column, else holds out a seeded fraction of
the training files — by file, and a function of the seed and the sorted paths only, so a resumed run holds out
the same files.
"""

from __future__ import annotations

import logging

import numpy as np

from medlatent.training.data_config import DataConfig
from medlatent.training.sources import Entry, manifest_has_split, read_source

logger = logging.getLogger("medlatent.training.data")  # the public module's name: log lines read as before


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
