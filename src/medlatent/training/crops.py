"""Cutting one training sample out of a preprocessed image (arrays in [-1, 1], channels first).

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

Every random choice draws from the ``rng`` passed in; ``rng=None`` is the deterministic validation sample
(centre crop/patch, middle axial slice, no flips or inversion).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medlatent.training.data_config import DataConfig

# slices from volumes: tries for a slice with some content (std in [-1, 1] units above SLICE_MIN_STD);
# background-only slices (air, padding) would teach the model nothing
SLICE_TRIES = 10
SLICE_MIN_STD = 0.05


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



def cut_sample(x: np.ndarray, data: DataConfig, rng: np.random.Generator | None) -> np.ndarray:
    """One sample of a whole preprocessed image ``x``: ``C×S×S`` (2D) or ``C×S×S×S`` (3D), ``C = data.in_channels``.

    ``x`` is ``C×H×W`` (2D file) or ``1×X×Y×Z`` (3D file, RAS); in a 2D set a volume gives one slice first.
    """
    if data.spatial_dims == 3:
        out = patch3d(x, data, rng)
    else:
        if x.ndim == 4:  # a volume in a 2D set: one slice (1×A×B)
            x = pick_slice(x, rng)
        out = view2d(x, data, rng)
    if out.shape[0] != data.in_channels:  # gray file for an RGB model (RGB→gray is done by preprocess)
        out = np.repeat(out, data.in_channels, axis=0)
    return out


def view2d(x: np.ndarray, data: DataConfig, rng: np.random.Generator | None) -> np.ndarray:
    """``C×H×W`` → ``C×S×S`` (``S = data.size``) per ``data.mode``; then random flips (training)."""
    s = data.size
    if data.mode == "resize":
        y = resize2d(x, s)
    elif data.mode == "random_resized_crop" and rng is not None:
        h, w = x.shape[1:]
        side = max(2, min(h, w, round(min(h, w) * rng.uniform(*data.crop_side))))
        y = resize2d(crop(x, crop_starts((h, w), side, rng), side), s)
    elif data.mode == "multiscale" and rng is not None:
        h, w = x.shape[1:]
        short = min(h, w)
        side = s if short <= s else round(math.exp(rng.uniform(math.log(s), math.log(short))))
        if side <= s:  # native resolution (padded when the image is smaller)
            x = pad_to(x, s, data.pad_value)
            y = crop(x, crop_starts(x.shape[1:], s, rng), s)
        else:
            y = resize2d(crop(x, crop_starts((h, w), side, rng), side), s)
    else:  # random_crop, and validation of random_resized_crop / multiscale: native resolution
        x = pad_to(x, s, data.pad_value)
        y = crop(x, crop_starts(x.shape[1:], s, rng), s)
    return augment(y, data, rng)


def patch3d(x: np.ndarray, data: DataConfig, rng: np.random.Generator | None) -> np.ndarray:
    """``1×X×Y×Z`` → a cubic patch ``1×S×S×S`` (padded when the volume is smaller); then random flips (training)."""
    x = pad_to(x, data.size, data.pad_value)
    return augment(crop(x, crop_starts(x.shape[1:], data.size, rng), data.size), data, rng)


def augment(y: np.ndarray, data: DataConfig, rng: np.random.Generator | None) -> np.ndarray:
    """Training augmentation: random flips, then (with probability ``invert``) an intensity inversion."""
    if rng is None:
        return y
    if data.flips:
        axes = tuple(ax for ax in range(1, y.ndim) if rng.random() < 0.5)
        y = np.flip(y, axes) if axes else y
    if data.invert and rng.random() < data.invert:  # no draw when off: samples stay as before
        y = -y
    return y
