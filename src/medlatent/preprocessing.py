"""Invertible preprocessing: intensity mapping to [-1, 1], reorientation to RAS, padding to the model stride.

Every step is recorded in a :class:`Preprocessing` record (plain data, JSON-serialisable) so that a decoded
image is put back on the original grid, in the original orientation and intensity units (HU for CT).

Defaults follow what the released weights were trained with (official loaders):
  * 2D: per-image min–max to [0, 1], then to [-1, 1]; RGB averaged to one channel for 1-channel models;
  * 3D CT: HU clipped to [-1000, 1000] and mapped to [-1, 1];
  * 3D MRI: per-volume min–max to [-1, 1] (``mri_percentiles`` clips outliers first, an option);
  * 3D volumes reoriented to RAS (so the slice axis, S, is last).
Unlike the official loaders, nothing is cropped: inputs are padded (edge values) on the high side of each axis
up to a multiple of the model's per-axis reduction, and the padding is removed after decoding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from medlatent.io.image import ImageData

Modality = Literal["ct", "mri", "xray", "other"]
CT_WINDOW = (-1000.0, 1000.0)


class PreprocessingError(ValueError):
    """The image cannot be prepared for the model (wrong dimensionality, empty, non-finite, …)."""


@dataclass(frozen=True)
class IntensityMap:
    """Linear map of ``[lo, hi]`` (original units) onto ``[-1, 1]``; values outside are clipped when ``clip``."""

    kind: str
    lo: float
    hi: float
    clip: bool

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        if self.clip:
            x = np.clip(x, self.lo, self.hi)
        return ((x - self.lo) * (2.0 / (self.hi - self.lo)) - 1.0).astype(np.float32)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return ((y.astype(np.float64) + 1.0) * ((self.hi - self.lo) / 2.0) + self.lo).astype(np.float32)


@dataclass
class Preprocessing:
    """Everything needed to map model space back to the original image (no patient identifiers).

    Attributes:
        spatial_dims: 2 or 3.
        original_shape: array shape as read (``C×H×W`` or ``X×Y×Z``).
        original_affine: the reader's affine (list of lists).
        original_dtype: numpy dtype name of the pixels as read.
        modality: modality used to choose the intensity mapping.
        intensity: the :class:`IntensityMap` as a dict.
        channel_mean: RGB averaged to one channel before encoding.
        orientation: nibabel orientation transform applied (3D; ``None`` if already RAS or 2D).
        pad: ``[(before, after)]`` per spatial axis, in model (reoriented) order.
        model_shape: spatial shape fed to the model (after reorientation and padding).
        file_geometry: the file's own ``shape`` and ``affine`` where they differ from the array's (a NIfTI
            ``X×Y×1`` read as a 2D image), so that decoding writes the file back as it was; else ``None``.
    """

    spatial_dims: int
    original_shape: list[int]
    original_affine: list[list[float]]
    original_dtype: str
    modality: str
    intensity: dict[str, Any]
    channel_mean: bool = False
    orientation: list[list[float]] | None = None
    pad: list[list[int]] = field(default_factory=list)
    model_shape: list[int] = field(default_factory=list)
    file_geometry: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["file_geometry"] is None:  # absent unless needed, so records stay readable by older versions
            del d["file_geometry"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(**d)

    @property
    def intensity_map(self) -> IntensityMap:
        return IntensityMap(**self.intensity)

    def latent_affine(self, downsample: int) -> np.ndarray:
        """World affine of the latent grid: the model-space affine scaled by the per-axis reduction.

        A latent voxel covers ``downsample`` input voxels per axis; its centre sits half a block in.
        """
        a = np.array(self.model_affine(), dtype=np.float64)
        d = self.spatial_dims
        scale = np.eye(d + 1)
        scale[:d, :d] *= downsample
        scale[:d, d] = (downsample - 1) / 2.0
        return a @ scale

    def model_affine(self) -> np.ndarray:
        """Affine of the array fed to the model (after reorientation; padding is on the high side)."""
        a = np.array(self.original_affine, dtype=np.float64)
        if self.orientation is not None:
            import nibabel.orientations as nio

            shape = self.original_shape[-self.spatial_dims:]
            a = a @ nio.inv_ornt_aff(np.array(self.orientation), shape)
        return a


def guess_modality(img: ImageData) -> Modality:
    """Modality from the file when it says so; otherwise a 3D volume reaching -900 or below is taken as CT."""
    if img.modality in ("ct", "mri", "xray"):
        return img.modality  # type: ignore[return-value]
    if img.spatial_dims == 3:
        return "ct" if float(np.nanmin(img.array)) <= -900 else "mri"
    return "xray"


def intensity_map_for(arr: np.ndarray, spatial_dims: int, modality: str,
                      mri_percentiles: tuple[float, float] | None = None) -> IntensityMap:
    if spatial_dims == 3 and modality == "ct":
        return IntensityMap("ct_window", *CT_WINDOW, clip=True)
    if spatial_dims == 3 and modality == "mri" and mri_percentiles is not None:
        lo, hi = np.percentile(arr, mri_percentiles)
        return IntensityMap("percentile", float(lo), float(max(hi, lo + 1e-6)), clip=True)
    lo, hi = float(arr.min()), float(arr.max())
    # a constant image maps to -1 and back exactly
    return IntensityMap("minmax", lo, hi if hi > lo else lo + 1.0, clip=False)


def preprocess(img: ImageData, *, spatial_dims: int, in_channels: int, downsample: int,
               modality: str = "auto", mri_percentiles: tuple[float, float] | None = None
               ) -> tuple[np.ndarray, Preprocessing]:
    """Image → model input ``C×…`` float32 in [-1, 1], padded to a multiple of ``downsample``, plus the record."""
    where = img.source or "image"
    if img.spatial_dims != spatial_dims:
        raise PreprocessingError(
            f"{where}: a {img.spatial_dims}D image (shape {img.array.shape}) was given to a {spatial_dims}D model; "
            f"use a {img.spatial_dims}D model (see `medlatent models`)"
        )
    arr = np.asarray(img.array)
    if arr.size == 0 or min(img.spatial_shape) < 2:
        raise PreprocessingError(f"{where}: image of shape {arr.shape} is too small to encode (needs ≥2 per axis)")
    if not np.isfinite(arr).all():
        raise PreprocessingError(f"{where}: image contains NaN or infinite values")
    mod = guess_modality(img) if modality == "auto" else modality
    if mod not in ("ct", "mri", "xray", "other"):
        raise PreprocessingError(f"{where}: unknown modality {modality!r}; use ct, mri, xray, other or auto")

    rec = Preprocessing(spatial_dims=spatial_dims, original_shape=list(arr.shape),
                        original_affine=np.asarray(img.affine, dtype=np.float64).tolist(),
                        original_dtype=str(arr.dtype), modality=mod, intensity={},
                        file_geometry=img.meta.get("file_geometry"))
    x = arr.astype(np.float32, copy=False)
    if spatial_dims == 2:
        if x.shape[0] == 3 and in_channels == 1:
            x, rec.channel_mean = x.mean(axis=0, keepdims=True), True
    else:
        x, rec.orientation = _to_ras(x, img.affine)
        x = x[None]
    imap = intensity_map_for(x, spatial_dims, mod, mri_percentiles)
    rec.intensity = asdict(imap)
    x = imap.forward(x)
    pad = [(0, (-n) % downsample) for n in x.shape[1:]]
    rec.pad = [list(p) for p in pad]
    if any(p[1] for p in pad):
        x = np.pad(x, [(0, 0), *pad], mode="edge")
    rec.model_shape = list(x.shape[1:])
    return np.ascontiguousarray(x, dtype=np.float32), rec


def restore(y: np.ndarray, rec: Preprocessing, out_dtype: str | None = None) -> np.ndarray:
    """Model output ``C×…`` in [-1, 1] → array on the original grid, in original units and (by default) dtype.

    Outputs beyond [-1, 1] (decoder overshoot) are clipped first: the range maps onto the intensities the encoder
    saw, and nothing outside it is meaningful (an integer dtype would clip them anyway).
    """
    crop = tuple(slice(0, n - p[1]) for n, p in zip(y.shape[1:], rec.pad))
    y = rec.intensity_map.inverse(np.clip(y[(slice(None), *crop)], -1.0, 1.0))
    if rec.channel_mean:  # an RGB file encoded as gray: give back the file's three (equal) channels
        y = np.repeat(y, 3, axis=0)
    if rec.spatial_dims == 3:
        y = y[0]
        if rec.orientation is not None:
            import nibabel.orientations as nio

            y = nio.apply_orientation(y, _inverse_ornt(np.array(rec.orientation)))
    return _cast(np.ascontiguousarray(y), out_dtype or rec.original_dtype)


def _to_ras(x: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, list[list[float]] | None]:
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.asarray(affine))
    tf = nio.ornt_transform(ornt, nio.axcodes2ornt("RAS"))
    if np.array_equal(tf, np.array([[0, 1], [1, 1], [2, 1]])):
        return x, None
    return nio.apply_orientation(x, tf), tf.tolist()


def _inverse_ornt(tf: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``tf``."""
    inv = np.zeros_like(tf)
    for src_axis, (dst_axis, flip) in enumerate(tf):
        inv[int(dst_axis)] = (src_axis, flip)
    return inv


def _cast(y: np.ndarray, dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return np.clip(np.rint(y), info.min, info.max).astype(dt)
    return y.astype(dt)
