"""The statistics protocol of the reconstruction evaluation (paper Tables 5–6): the images each seed draws, and
the mean ± sd across seeds of each seed's mean (see :mod:`medlatent.evaluation.recon`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


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




def over_images(values: Sequence[float]) -> dict[str, Any]:
    """Mean ± sd (ddof=1) over all images' values (NaN left out), and how many counted."""
    v = np.array([x for x in values if not math.isnan(x)], dtype=np.float64)
    if not v.size:
        return {"mean": float("nan"), "sd": None, "n": 0}
    sd = float(np.std(v, ddof=1)) if v.size > 1 and np.isfinite(v).all() else None
    return {"mean": float(np.mean(v)), "sd": sd, "n": int(v.size)}
