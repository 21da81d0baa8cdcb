"""Reconstruction baselines at the model's downsizing factor (paper §4.3, Tables 5–7).

Every method here is a :data:`Method`: a callable that takes one preprocessed image ``1×C×H×W`` (2D) or volume
``1×C×X×Y×Z`` (3D) in [-1, 1] — exactly what :func:`medlatent.preprocessing.preprocess` returns, so spatial sizes
are multiples of the model's per-axis reduction ``s`` — and returns its reconstruction with the same shape.

* **Interpolation** (:func:`shrink`, :func:`roundtrip`, :func:`interpolation_methods`, :func:`interpolation_at`):
  shrink by ``s`` per axis (or any factor) and enlarge back with the same method. They live in
  :mod:`medlatent.interpolation`, below the runs layer (``medlatent roundtrip`` reports them too), and are
  re-exported here unchanged.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from medlatent.interpolation import (  # noqa: F401 - re-exported: the evaluation suite's names for them
    CUBIC_SPLINE,
    INTERPOLATION,
    SLICE_BICUBIC,
    BaselineError,
    Method,
    cubic_spline_matrix,
    cubic_spline_resize,
    enlarge,
    interpolation_at,
    interpolation_methods,
    per_axis_factor,
    resized_shape,
    roundtrip,
    shrink,
    slice_bicubic_resize,
)

if TYPE_CHECKING:
    from medlatent.engine.tiled import TileSettings
    from medlatent.model.autoencoder import MedVAE

logger = logging.getLogger(__name__)

_LATENT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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
    def family(self) -> str:
        """The paper's name of its kind, as rows are labelled: ``KL-VAE`` or ``VQ-GAN``."""
        return "KL-VAE" if self.kind == "kl" else "VQ-GAN"

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
