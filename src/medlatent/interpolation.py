"""Interpolation baselines: shrink an image by any factor and enlarge it back (what a latent has to beat).

Every method here is a :data:`Method`: a callable that takes one preprocessed image ``1×C×H×W`` (2D) or volume
``1×C×X×Y×Z`` (3D) in [-1, 1] — what :func:`medlatent.preprocessing.preprocess` returns — and returns its
reconstruction with the same shape. 2D: ``nearest``, ``bilinear``, ``bicubic`` (antialiased when shrinking, as
PIL/torchvision resize do). 3D: ``nearest``, ``trilinear`` (torch has no antialiasing in 3D, so this one aliases),
``area`` (block mean to shrink, trilinear to enlarge), ``slice-bicubic`` (2D bicubic on every slice along Z, block
means / linear along Z: the paper's 3D "Bicubic" rows) and ``cubic-spline`` (area means to shrink, cubic B-spline
interpolation to enlarge: :func:`cubic_spline_resize`).

**Equal values** (:func:`equal_values_factor`, :func:`equal_values_baseline`): a latent of ``C`` channels at ÷``s``
per axis keeps ``C·N/s^d`` values of an ``N``-pixel one-channel image; an interpolation at ÷``r`` keeps ``N/r^d``;
equal when ``r = s / C^(1/d)`` (``f/C`` as a downsizing factor). With ``C = 1`` that is the model's own ``f``.

This module sits below the runs layer (``medlatent roundtrip`` reports these baselines) and the evaluation suite
(:mod:`medlatent.evaluation.baselines` re-exports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from medlatent.io.image import ImageData

#: 3D baseline: 2D bicubic per slice (along Z), block means to shrink / linear to enlarge along Z
SLICE_BICUBIC = "slice-bicubic"

#: 3D baseline: area means to shrink (antialiased), cubic B-spline interpolation to enlarge
CUBIC_SPLINE = "cubic-spline"

#: A reconstruction method: preprocessed ``1×C×…`` tensor in [-1, 1] → reconstruction of the same shape.
Method = Callable[[torch.Tensor], torch.Tensor]

#: Interpolation baselines per spatial dimensionality.
INTERPOLATION: dict[int, tuple[str, ...]] = {2: ("nearest", "bilinear", "bicubic"),
                                              3: ("nearest", "trilinear", "area", SLICE_BICUBIC, CUBIC_SPLINE)}



class BaselineError(ValueError):
    """A baseline cannot be built or run; the message says why and what to do."""


# ===================================================================================== interpolation
def _check_mode(x: torch.Tensor, mode: str) -> int:
    dims = x.ndim - 2
    if dims not in INTERPOLATION:
        raise BaselineError(f"expected a B×C×H×W image or B×C×X×Y×Z volume, got shape {tuple(x.shape)}")
    if mode not in INTERPOLATION[dims]:
        raise BaselineError(f"unknown {dims}D interpolation {mode!r}; choose one of {', '.join(INTERPOLATION[dims])}")
    return dims


def shrink(x: torch.Tensor, s: int, mode: str) -> torch.Tensor:
    """Downsize ``x`` by ``s`` per axis: the size of the model's latent for the same (padded) input.

    Args:
        x: ``B×C×H×W`` or ``B×C×X×Y×Z``; every spatial size a positive multiple of ``s``.
        s: per-axis reduction (``model.downsample_per_axis``; the paper's ``f`` is ``s**2`` in 2D, ``s**3`` in 3D).
        mode: see :data:`INTERPOLATION`.

    Returns:
        ``B×C×H/s×W/s`` or ``B×C×X/s×Y/s×Z/s``.
    """
    _check_mode(x, mode)
    if s < 1 or any(n % s or n < s for n in x.shape[2:]):
        raise BaselineError(f"spatial sizes {tuple(x.shape[2:])} must be positive multiples of s={s}; "
                            "pad first (medlatent's preprocessing pads to the model's reduction)")
    size = tuple(n // s for n in x.shape[2:])
    if mode == SLICE_BICUBIC:
        return slice_bicubic_resize(x, size)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    if mode in ("area", CUBIC_SPLINE):
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=mode in ("bilinear", "bicubic"))


def enlarge(small: torch.Tensor, size: tuple[int, ...], mode: str) -> torch.Tensor:
    """Upsize a shrunk image back to ``size`` with the same method (``area`` enlarges trilinearly)."""
    _check_mode(small, mode)
    if mode == SLICE_BICUBIC:
        return slice_bicubic_resize(small, size)
    if mode == "nearest":
        return F.interpolate(small, size=size, mode="nearest")
    if mode == CUBIC_SPLINE:
        return cubic_spline_resize(small, size)
    up = "trilinear" if mode == "area" else mode
    return F.interpolate(small, size=size, mode=up, align_corners=False)


def slice_bicubic_resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize a volume ``B×C×X×Y×Z`` to ``size`` as 2D images: bicubic on every slice along Z (antialiased when
    shrinking), then along Z block means when shrinking, linear when enlarging. The two steps act on different
    axes, so their order does not matter."""
    b, c, nx, ny, nz = x.shape
    sx, sy, sz = (int(n) for n in size)
    t = x.permute(0, 1, 4, 2, 3).reshape(b * c * nz, 1, nx, ny)
    t = F.interpolate(t, size=(sx, sy), mode="bicubic", align_corners=False, antialias=sx < nx or sy < ny)
    t = t.reshape(b, c, nz, sx, sy).permute(0, 1, 3, 4, 2)
    if sz < nz:
        return F.interpolate(t, size=(sx, sy, sz), mode="area")
    if sz > nz:
        return F.interpolate(t, size=(sx, sy, sz), mode="trilinear", align_corners=False)
    return t.contiguous()


def _mirror(k: np.ndarray, n: int) -> np.ndarray:
    """Indices ``k`` folded into ``0 … n-1`` by half-sample symmetric extension (``-1 → 0``, ``n → n-1``)."""
    k = np.mod(k, 2 * n)
    return np.where(k >= n, 2 * n - 1 - k, k)


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    """The cubic B-spline β³ at offsets ``t``."""
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def cubic_spline_matrix(n: int, m: int) -> np.ndarray:
    """The ``m×n`` linear map of cubic B-spline interpolation from ``n`` samples to ``m`` (pixel-centre grids, as
    ``align_corners=False``; half-sample symmetric boundary): prefilter (solve for the spline coefficients whose
    spline passes through the samples) then evaluate β³ at the new centres. ``n == m`` is the identity."""
    band = np.zeros((n, n))
    for i in range(n):
        for off, w in ((-1, 1 / 6), (0, 4 / 6), (1, 1 / 6)):
            band[i, _mirror(np.array(i + off), n)] += w
    u = (np.arange(m) + 0.5) * n / m - 0.5
    evaluate = np.zeros((m, n))
    first = np.floor(u).astype(int) - 1
    for j in range(4):
        k = first + j
        np.add.at(evaluate, (np.arange(m), _mirror(k, n)), _cubic_bspline(u - k))
    return evaluate @ np.linalg.inv(band)


def cubic_spline_resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Cubic B-spline interpolation of ``B×C×…`` to ``size``, one axis at a time. Meant for enlarging: it does
    not antialias, so shrink with area means first (as the ``cubic-spline`` baseline does)."""
    out = x
    for axis, m in enumerate(size, start=2):
        n = out.shape[axis]
        if n == m:
            continue
        mat = torch.from_numpy(cubic_spline_matrix(n, int(m))).to(out.dtype)
        out = torch.movedim(torch.movedim(out, axis, -1) @ mat.T, -1, axis)
    return out.contiguous()


def roundtrip(x: torch.Tensor, s: int, mode: str) -> torch.Tensor:
    """:func:`shrink` then :func:`enlarge` back to ``x``'s size: the interpolation baseline's reconstruction."""
    return enlarge(shrink(x, s, mode), tuple(x.shape[2:]), mode)


def interpolation_methods(spatial_dims: int, s: int, names: tuple[str, ...] | list[str] | None = None
                          ) -> dict[str, Method]:
    """``{name: Method}`` for the interpolation baselines of ``spatial_dims`` (all of them by default)."""
    if spatial_dims not in INTERPOLATION:
        raise BaselineError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    chosen = tuple(names) if names is not None else INTERPOLATION[spatial_dims]
    bad = [n for n in chosen if n not in INTERPOLATION[spatial_dims]]
    if bad:
        raise BaselineError(f"unknown {spatial_dims}D baseline(s) {', '.join(map(repr, bad))}; "
                            f"choose from {', '.join(INTERPOLATION[spatial_dims])}")
    return {n: (lambda x, _m=n: roundtrip(x, s, _m)) for n in chosen}


def per_axis_factor(f: float, spatial_dims: int) -> float:
    """The per-axis reduction ``f**(1/d)`` of a downsizing factor ``f`` (area in 2D, volume in 3D); an integer
    when ``f`` is a ``d``-th power (16 → 4 in 2D), else a float (16/3 → 2.31 in 2D)."""
    if not (isinstance(f, (int, float)) and math.isfinite(f) and f > 1):
        raise BaselineError(f"an interpolation factor f must be a number > 1, got {f!r}")
    r = f ** (1 / spatial_dims)
    return float(round(r)) if abs(r - round(r)) < 1e-6 else r


def resized_shape(shape: tuple[int, ...], r: float) -> tuple[int, ...]:
    """Spatial size after shrinking ``shape`` by ``r`` per axis (rounded, at least 1): what an interpolation
    codec at that factor stores."""
    return tuple(max(1, round(n / r)) for n in shape)


def interpolation_at(spatial_dims: int, f: float, mode: str) -> tuple[Method, int]:
    """An interpolation baseline at any downsizing factor ``f`` and the size multiple its input needs.

    An integer per-axis factor ``s`` (``f = s**d``) is :func:`roundtrip` on an input padded to a multiple of
    ``s``; any other factor shrinks to :func:`resized_shape` (rounded per axis) and enlarges back, on the
    unpadded input. E.g. a 2D model with f=16 and C=4 stores as many values as bicubic at f=4 (÷2 per axis).

    Returns:
        ``(method, multiple)``.
    """
    if mode not in INTERPOLATION.get(spatial_dims, ()):
        raise BaselineError(f"unknown {spatial_dims}D interpolation {mode!r}; choose one of "
                            f"{', '.join(INTERPOLATION.get(spatial_dims, ()))}")
    r = per_axis_factor(f, spatial_dims)
    if r.is_integer():
        s = int(r)
        return (lambda x: roundtrip(x, s, mode)), s

    def run(x: torch.Tensor) -> torch.Tensor:
        size = resized_shape(tuple(x.shape[2:]), r)
        if mode == SLICE_BICUBIC:
            small = slice_bicubic_resize(x, size)
        elif mode in ("nearest", "area", CUBIC_SPLINE):
            small = F.interpolate(x, size=size, mode="area" if mode == CUBIC_SPLINE else mode)
        else:
            small = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=mode != "trilinear")
        return enlarge(small, tuple(x.shape[2:]), mode)

    return run, 1


def stored_values(shape: tuple[int, ...], f: float, spatial_dims: int) -> int:
    """Values kept by :func:`interpolation_at` ``(spatial_dims, f, …)`` of a ``B×C×…`` input of ``shape`` (padded
    to the method's multiple): every channel at the shrunk size, sizes rounded per axis for non-integer factors."""
    r = per_axis_factor(f, spatial_dims)
    spatial = tuple(shape[2:])
    small = tuple(n // int(r) for n in spatial) if r.is_integer() else resized_shape(spatial, r)
    return int(shape[1]) * math.prod(small)


# ===================================================================================== at equal values stored
#: the interpolation a model is compared with at equal values: bicubic in 2D, cubic-spline in 3D
EQUAL_VALUES_MODE = {2: "bicubic", 3: CUBIC_SPLINE}


def equal_values_factor(f: float, C: int, spatial_dims: int) -> tuple[float, float] | None:  # noqa: N803
    """``(f / C, per-axis factor)`` of the interpolation that keeps as many values as a ``C``-channel latent at
    downsizing factor ``f`` (``s / C^(1/d)`` per axis for ``f = s^d``); ``None`` when ``f ≤ C`` (the latent
    keeps as many values as the image or more, and no interpolation matches it)."""
    if C < 1 or f <= 0:
        raise ValueError(f"need C ≥ 1 and f > 0, got C={C}, f={f}")
    g = f / C
    if g <= 1:
        return None
    return g, per_axis_factor(g, spatial_dims)


@dataclass
class Baseline:
    """One image's interpolation baseline.

    Attributes:
        mode: the interpolation (:data:`EQUAL_VALUES_MODE`).
        f: its downsizing factor: ``f / C`` of the model, or the model's ``f`` when ``equal_values`` is False.
        values: the numbers it keeps (every channel the model takes, at the shrunk size).
        how: in words, e.g. ``bicubic ÷4 per axis``.
        recon: the reconstruction on the image's own grid, in its units (float32), as ``medlatent decode`` gives
            the model's: compare both through the same intensity map.
        equal_values: False when ``f ≤ C`` (no interpolation keeps as few values as the latent): then the baseline
            is at the model's ``f``.
    """

    mode: str
    f: float
    values: int
    how: str
    recon: np.ndarray
    equal_values: bool


def equal_values_baseline(img: "ImageData", *, spatial_dims: int, f: float, C: int, in_channels: int,  # noqa: N803
                          modality: str = "auto", mri_percentiles: tuple[float, float] | None = None) -> Baseline:
    """Interpolate ``img`` at equal values stored with a model of ``f``, ``C``, ``in_channels``: preprocessed as
    ``medlatent encode`` does (``modality``, ``mri_percentiles``) but padded to the interpolation's own multiple,
    shrunk ÷ ``s / C^(1/d)`` per axis with :data:`EQUAL_VALUES_MODE` and enlarged back, then restored to the
    image's grid and units."""
    from medlatent.preprocessing import preprocess, restore

    mode = EQUAL_VALUES_MODE[spatial_dims]
    eq = equal_values_factor(f, C, spatial_dims)
    g = eq[0] if eq is not None else float(f)
    fn, multiple = interpolation_at(spatial_dims, g, mode)
    x, rec = preprocess(img, spatial_dims=spatial_dims, in_channels=in_channels, downsample=multiple,
                        modality=modality, mri_percentiles=mri_percentiles)
    xt = torch.from_numpy(x)[None]
    with torch.inference_mode():
        y = fn(xt)
    r = per_axis_factor(g, spatial_dims)
    how = f"{mode} ÷{r:.4g} per axis" + ("" if r.is_integer() else " (each axis rounded)")
    return Baseline(mode, g, stored_values(tuple(xt.shape), g, spatial_dims), how,
                    restore(y[0].float().numpy(), rec, "float32"), eq is not None)
