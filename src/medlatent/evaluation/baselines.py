"""Reconstruction baselines at the model's downsizing factor (paper §4.3, Tables 5–7).

Every method here is a :data:`Method`: a callable that takes one preprocessed image ``1×C×H×W`` (2D) or volume
``1×C×X×Y×Z`` (3D) in [-1, 1] — exactly what :func:`medlatent.preprocessing.preprocess` returns, so spatial sizes
are multiples of the model's per-axis reduction ``s`` — and returns its reconstruction with the same shape.

* **Interpolation** (:func:`shrink`, :func:`roundtrip`, :func:`interpolation_methods`): shrink by ``s`` per axis
  to the model's latent spatial size and enlarge back with the same method. 2D: ``nearest``, ``bilinear``,
  ``bicubic`` (antialiased when shrinking, as PIL/torchvision resize do). 3D: ``nearest``, ``trilinear`` (torch
  has no antialiasing in 3D, so this one aliases), ``area`` (block mean to shrink, trilinear to enlarge: the
  antialiased 3D baseline) and ``slice-bicubic`` (2D bicubic on every slice along Z, block means / linear along Z:
  the paper's 3D "Bicubic" rows, a 2D method applied per slice and stitched to the 3D latent's size) and
  ``cubic-spline`` (block/area means to shrink, cubic B-spline interpolation to enlarge: :func:`cubic_spline_resize`).
* **The model itself** (:func:`model_method`): posterior mean ``z``, optionally rounded through float16 as
  ``medlatent encode`` stores it, decoded; large images go through the tiled engine.
* **A 2D model on 3D volumes** (:func:`slicewise_2d_model_for_3d`): the paper's "2D Med-VAE-Decoder" comparison
  (Appendix, Table 7) without its decoder fine-tuning — see the function.
* **A natural-image autoencoder** (:func:`natural_image_autoencoder`): a diffusers ``AutoencoderKL`` (KL-VAE) or
  ``VQModel`` (VQ-GAN) from a local folder, or a KL-VAE checkpoint file (LDM/CompVis ``.ckpt``, or a state dict
  in either layout), the paper's KL-VAE / VQ-GAN rows; applied slice by slice to volumes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from medlatent.engine.tiled import TileSettings
    from medlatent.model.autoencoder import MedVAE

logger = logging.getLogger(__name__)

#: 3D baseline: 2D bicubic per slice (along Z), block means to shrink / linear to enlarge along Z
SLICE_BICUBIC = "slice-bicubic"

#: 3D baseline: area means to shrink (antialiased), cubic B-spline interpolation to enlarge
CUBIC_SPLINE = "cubic-spline"

#: A reconstruction method: preprocessed ``1×C×…`` tensor in [-1, 1] → reconstruction of the same shape.
Method = Callable[[torch.Tensor], torch.Tensor]

#: Interpolation baselines per spatial dimensionality.
INTERPOLATION: dict[int, tuple[str, ...]] = {2: ("nearest", "bilinear", "bicubic"),
                                              3: ("nearest", "trilinear", "area", SLICE_BICUBIC, CUBIC_SPLINE)}

_LATENT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


# ===================================================================================== the model
def round_latent(z: torch.Tensor, latent_dtype: str | None) -> torch.Tensor:
    """``z`` as stored: rounded through ``latent_dtype`` (``float16`` by default in latent files), back in float32."""
    if latent_dtype is None:
        return z
    if latent_dtype not in _LATENT_DTYPES:
        raise BaselineError(f"latent dtype must be one of {', '.join(_LATENT_DTYPES)}, got {latent_dtype!r}")
    return z.to(_LATENT_DTYPES[latent_dtype]).float()


def model_method(model: "MedVAE", *, latent_dtype: str | None = "float16", tiles: "TileSettings | None" = None,
                 precision: str = "fp32") -> Method:
    """The model as a :data:`Method`: posterior mean, rounded as stored, decoded (``medlatent encode``/``decode``).

    The tiled engine runs an image whole when it fits one tile (the memory budget of ``tiles``) and in blended
    tiles otherwise. One-channel input decodes to one channel (3-channel models average their output).
    """
    from medlatent.engine.tiled import TiledAutoencoder
    from medlatent.pipeline import PRECISIONS

    if precision not in PRECISIONS:
        raise BaselineError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    round_latent(torch.zeros(1), latent_dtype)  # validate early
    engine = TiledAutoencoder(model, tiles)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        dev = model.device
        dtype = PRECISIONS[precision]
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            z = round_latent(engine.encode(x.to(dev)).float(), latent_dtype)
            y = engine.decode(z, grayscale=x.shape[1] == 1)
        return y.float().cpu()

    return run


# ===================================================================================== 2D model on volumes
class SlicewiseResult(NamedTuple):
    """Latent ``B×C×x×y×z`` at the 3D model's latent size and the reconstructed volume ``B×1×X×Y×Z``."""

    z: torch.Tensor
    recon: torch.Tensor


def _resize(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize ``B×C×…`` to ``size``: block means along shrinking axes, then linear along enlarging axes."""
    size = tuple(int(n) for n in size)
    if tuple(t.shape[2:]) == size:
        return t
    mid = tuple(min(a, b) for a, b in zip(t.shape[2:], size))
    if mid != tuple(t.shape[2:]):
        t = F.interpolate(t, size=mid, mode="area")
    if mid != size:
        t = F.interpolate(t, size=size, mode="trilinear" if t.ndim == 5 else "bilinear", align_corners=False)
    return t


def _pad_to(x: torch.Tensor, multiple: int, axes: int) -> torch.Tensor:
    """Edge-pad the last ``axes`` axes on the high side up to a multiple (as medlatent's preprocessing does)."""
    pad: list[int] = []
    for n in reversed(x.shape[-axes:]):
        pad += [0, (-n) % multiple]
    if not any(pad):
        return x
    # replicate padding of a 4-D tensor pads the last two axes
    return F.pad(x, pad, mode="replicate")


def _check_slicewise(model2d, volume: torch.Tensor) -> int:
    if getattr(model2d, "spatial_dims", 2) != 2:
        raise BaselineError(f"slice-wise coding needs a 2D model, got a {model2d.spatial_dims}D one")
    if volume.ndim != 5:
        raise BaselineError(f"expected a B×C×X×Y×Z volume, got shape {tuple(volume.shape)}")
    return model2d.downsample_per_axis


@torch.inference_mode()
def slicewise_encode(model2d, volume: torch.Tensor, target_latent_shape: tuple[int, int, int] | None = None,
                     *, batch_size: int = 16, latent_dtype: str | None = None) -> torch.Tensor:
    """Encode each slice along the last (slice, S) axis with a 2D model and stack the latents.

    Args:
        model2d: a 2D :class:`MedVAE` (or anything with ``encode(x).mean`` / ``downsample_per_axis``).
        volume: ``B×1×X×Y×Z`` in [-1, 1] (RAS; slices along Z, as medlatent's 3D preprocessing gives them).
        target_latent_shape: spatial size ``(x, y, z)`` to resize the stacked ``B×C×X/s×Y/s×Z`` latent to
            (block means along shrinking axes, linear along enlarging ones); ``None`` keeps it.
        batch_size: slices per forward pass.
        latent_dtype: round the per-slice latents as stored (``float16``) or not (``None``).
    """
    s = _check_slicewise(model2d, volume)
    b, c, nx, ny, nz = volume.shape
    slices = _pad_to(volume.permute(0, 4, 1, 2, 3).reshape(b * nz, c, nx, ny), s, 2)
    dev = getattr(model2d, "device", volume.device)  # a MedVAE says where its weights are
    z = torch.cat([model2d.encode(chunk.to(dev)).mean.float().cpu() for chunk in slices.split(batch_size)])
    z = round_latent(z, latent_dtype)
    z = z.reshape(b, nz, *z.shape[1:]).permute(0, 2, 3, 4, 1)  # B×C×X/s×Y/s×Z
    return z if target_latent_shape is None else _resize(z, tuple(target_latent_shape))


@torch.inference_mode()
def slicewise_decode(model2d, z: torch.Tensor, volume_shape: tuple[int, int, int], *,
                     batch_size: int = 16) -> torch.Tensor:
    """Decode a latent made by :func:`slicewise_encode` back to a ``B×1×X×Y×Z`` volume.

    The latent is first resized (linear along enlarging axes) to the per-slice 2D latent grid
    ``X/s×Y/s×Z`` of the volume, then each slice is decoded with the 2D decoder and the slices are stacked.
    """
    s = _check_slicewise(model2d, z)
    nx, ny, nz = (int(n) for n in volume_shape)
    px, py = math.ceil(nx / s) * s, math.ceil(ny / s) * s
    z = _resize(z.float(), (px // s, py // s, nz))
    b, c = z.shape[:2]
    flat = z.permute(0, 4, 1, 2, 3).reshape(b * nz, c, px // s, py // s)
    dev = getattr(model2d, "device", z.device)
    y = torch.cat([model2d.decode(chunk.to(dev), grayscale=True).float().cpu() for chunk in flat.split(batch_size)])
    y = y.reshape(b, nz, 1, px, py).permute(0, 2, 3, 4, 1)
    return y[:, :, :nx, :ny, :].contiguous()


def slicewise_2d_model_for_3d(model2d, volume: torch.Tensor, target_latent_shape: tuple[int, int, int], *,
                              batch_size: int = 16, latent_dtype: str | None = None) -> SlicewiseResult:
    """A 2D model used on a volume at a 3D model's latent size (paper Appendix, Table 7, "2D Med-VAE-Decoder").

    Encode: every slice along Z goes through the 2D encoder (``X×Y → X/s×Y/s``), the slice latents are stacked
    into ``C×X/s×Y/s×Z`` and resized to ``target_latent_shape`` (for a 3D model with the same ``s``: block means
    of ``s`` slices along Z). Decode: the latent is resized back to ``X/s×Y/s×Z`` (linear along Z) and each slice
    is decoded by the 2D decoder. The paper fine-tuned the 2D decoder on volumes after this step; here the
    decoder is used as it is, so this is a lower bound on what that approach reaches.

    Args:
        model2d: a 2D model (``spatial_dims == 2``).
        volume: ``B×1×X×Y×Z`` in [-1, 1].
        target_latent_shape: the 3D model's latent spatial size, e.g. ``(X/s3, Y/s3, Z/s3)``.

    Returns:
        :class:`SlicewiseResult` ``(z, recon)`` with ``z`` ``B×C×x×y×z`` and ``recon`` the shape of ``volume``.
    """
    z = slicewise_encode(model2d, volume, target_latent_shape, batch_size=batch_size, latent_dtype=latent_dtype)
    return SlicewiseResult(z, slicewise_decode(model2d, z, tuple(volume.shape[2:]), batch_size=batch_size))


def slicewise_method(model2d, s3: int, *, latent_dtype: str | None = "float16", batch_size: int = 16) -> Method:
    """:func:`slicewise_2d_model_for_3d` as a :data:`Method` for volumes, at the latent size of reduction ``s3``."""

    def run(x: torch.Tensor) -> torch.Tensor:
        target = tuple(max(1, n // s3) for n in x.shape[2:])
        return slicewise_2d_model_for_3d(model2d, x, target, batch_size=batch_size, latent_dtype=latent_dtype).recon

    return run


# ===================================================================================== natural-image VAEs
class NaturalModelError(ValueError):
    """A natural-image autoencoder folder cannot be loaded; the message names the folder."""


@dataclass
class NaturalImageAutoencoder:
    """A diffusers ``AutoencoderKL`` / ``VQModel`` behind medlatent's encode/decode interface.

    Natural-image autoencoders take RGB in [-1, 1]; medical images (one channel, [-1, 1] after medlatent's
    preprocessing) are replicated to three channels and the three output channels averaged back. Sizes are
    edge-padded to the autoencoder's reduction and cropped after decoding.

    Attributes:
        vae: the diffusers model (eval mode).
        kind: ``"kl"`` (AutoencoderKL: posterior mean) or ``"vq"`` (VQModel: decoding quantises).
        source: the folder it came from.
    """

    vae: torch.nn.Module
    kind: str
    source: str = ""

    spatial_dims = 2

    @property
    def downsample_per_axis(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def C(self) -> int:  # noqa: N802 - the paper's name
        return int(self.vae.config.latent_channels)

    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``B×1|3×H×W`` in [-1, 1], sizes multiples of :attr:`downsample_per_axis` → latent ``B×C×H/s×W/s``."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise BaselineError(f"{self.source}: expected B×1×H×W or B×3×H×W, got shape {tuple(x.shape)}")
        x = x.expand(-1, 3, -1, -1).to(self._device(), torch.float32)
        if self.kind == "kl":
            return self.vae.encode(x).latent_dist.mean
        return self.vae.encode(x).latents

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, grayscale: bool = True) -> torch.Tensor:
        """Latent → ``B×3×H×W`` (or ``B×1×H×W`` averaged when ``grayscale``) in about [-1, 1]."""
        y = self.vae.decode(z.to(self._device(), torch.float32)).sample
        return y.mean(dim=1, keepdim=True) if grayscale else y

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Encode and decode ``B×C×H×W`` of any size; returns as many channels as ``x`` has."""
        h, w = x.shape[2:]
        z = self.encode(_pad_to(x, self.downsample_per_axis, 2))
        return self.decode(z, grayscale=x.shape[1] == 1)[:, :, :h, :w].float().cpu()

    def method(self, *, batch_size: int = 16) -> Method:
        """A :data:`Method`: images whole, volumes slice by slice along Z (its ``f`` is per slice, ``s**2``)."""

        def run(x: torch.Tensor) -> torch.Tensor:
            if x.ndim == 4:
                return self.reconstruct(x)
            b, c, nx, ny, nz = x.shape
            slices = x.permute(0, 4, 1, 2, 3).reshape(b * nz, c, nx, ny)
            y = torch.cat([self.reconstruct(chunk) for chunk in slices.split(batch_size)])
            return y.reshape(b, nz, c, nx, ny).permute(0, 2, 3, 4, 1).contiguous()

        return run


class CheckpointAutoencoder(NaturalImageAutoencoder):
    """A natural-image KL-VAE from a checkpoint file (LDM/CompVis ``.ckpt``, or a ``.safetensors``/``.bin`` state
    dict in either layout), imported as a 3-channel MedVAE by :func:`medlatent.training.natural.load_natural_vae`
    (no diffusers needed); the interface of :class:`NaturalImageAutoencoder`."""

    @property
    def downsample_per_axis(self) -> int:
        return self.vae.downsample_per_axis

    @property
    def C(self) -> int:  # noqa: N802 - the paper's name
        return self.vae.C

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise BaselineError(f"{self.source}: expected B×1×H×W or B×3×H×W, got shape {tuple(x.shape)}")
        return self.vae.encode(x.to(self._device(), torch.float32)).mean  # 1 channel: replicated to RGB

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, grayscale: bool = True) -> torch.Tensor:
        return self.vae.decode(z.to(self._device(), torch.float32), grayscale=grayscale)


def _checkpoint_autoencoder(path: Path, device: str | torch.device) -> CheckpointAutoencoder:
    from medlatent.checkpoints import CheckpointError
    from medlatent.training.natural import load_natural_vae

    try:
        model, _ = load_natural_vae(path, lora_rank=None, stage2_head=False)
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        raise NaturalModelError(f"not a natural-image KL-VAE checkpoint: {e}") from e  # e names the file
    model.requires_grad_(False)
    logger.info("loaded a KL-VAE checkpoint from %s", path)
    return CheckpointAutoencoder(model.eval().to(device), "kl", str(path))


_DIFFUSERS_CLASSES = {"AutoencoderKL": "kl", "VQModel": "vq"}


def natural_image_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> NaturalImageAutoencoder:
    """Load a diffusers ``AutoencoderKL`` or ``VQModel`` from a local folder, or a KL-VAE checkpoint file
    (:class:`CheckpointAutoencoder`); never from the network.

    Args:
        path: a folder with the autoencoder's ``config.json`` and weights (what ``save_pretrained`` writes), or a
            pipeline folder with a ``vae/`` (or ``vqvae/``) subfolder; or an LDM ``.ckpt`` / a state-dict file.
        device: where to run it.
    """
    path = Path(path)
    if path.is_file():
        return _checkpoint_autoencoder(path, device)
    if not path.is_dir():
        raise NaturalModelError(f"{path}: no such folder or file; give a local diffusers AutoencoderKL/VQModel "
                                "folder or a KL-VAE checkpoint file (.ckpt, .safetensors)")
    folder = next((p for p in (path, path / "vae", path / "vqvae") if (p / "config.json").is_file()), None)
    if folder is None:
        raise NaturalModelError(f"{path}: not a diffusers model folder (no config.json here or in vae/); "
                                "save one with AutoencoderKL.save_pretrained(folder)")
    try:
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise NaturalModelError(f"{folder / 'config.json'}: unreadable config ({e})") from e
    if class_name not in _DIFFUSERS_CLASSES:
        raise NaturalModelError(f"{folder}: config.json describes {class_name!r}, not one of "
                                f"{', '.join(_DIFFUSERS_CLASSES)}")
    try:
        import diffusers
    except ImportError as e:
        raise NaturalModelError(f"{path}: natural-image autoencoders need diffusers: pip install diffusers") from e
    try:
        vae = getattr(diffusers, class_name).from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # diffusers raises many types (OSError, EnvironmentError, ValueError, …)
        raise NaturalModelError(f"{folder}: cannot load the {class_name} ({type(e).__name__}: {e})") from e
    logger.info("loaded %s from %s", class_name, folder)
    return NaturalImageAutoencoder(vae.eval().to(device), _DIFFUSERS_CLASSES[class_name], str(folder))
