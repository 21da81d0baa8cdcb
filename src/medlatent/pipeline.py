"""Image ⇄ latent for one item: read → preprocess → encode → latent file, and latent file → decode → image."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medlatent.engine.tiled import TiledAutoencoder, TileSettings
from medlatent.io.image import ImageData
from medlatent.latentfile import LatentFile, LatentFileError
from medlatent.model.autoencoder import MedVAE
from medlatent.preprocessing import Preprocessing, preprocess, restore

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EncodeOptions:
    """How to encode. ``stage2=None`` stores stage-2 features for 2D models only (what the paper used)."""

    modality: str = "auto"
    stage2: bool | None = None
    precision: str = "fp32"
    mri_percentiles: tuple[float, float] | None = None
    tiles: TileSettings | None = None
    batch: int = 1  # equal-shaped images per forward pass (when each fits one tile and the memory budget)


def model_record(model: MedVAE) -> dict:
    """What a latent file says about the model that made it."""
    return {
        "name": model.weights_info.get("model", "unknown"),
        "weights_sha256": model.weights_info.get("sha256", model.weights_info.get("weights", "")),
        "f": model.f,
        "C": model.C,
        "spatial_dims": model.spatial_dims,
        "downsample_per_axis": model.downsample_per_axis,
        "config": model.config.to_dict(),
    }


def inference_record(model: MedVAE, precision: str) -> dict[str, str]:
    """How a latent was computed: the backend (``torch``, or the runtime of the exported graphs of a
    :class:`medlatent.deploy.GraphModel`) and the precision."""
    return {"backend": getattr(model, "backend", "torch"), "precision": precision}


def _autocast(model: MedVAE, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    dev = model.device.type
    return torch.autocast(dev, dtype=dtype, enabled=dtype is not None)


@dataclass
class Prepared:
    """An image ready for the model: ``x`` (``C×…`` float32 in [-1, 1], padded to a multiple of the model's
    reduction) and the record that maps a decoding back onto the original grid and units."""

    x: np.ndarray
    preprocessing: Preprocessing


def prepare(model: MedVAE, img: ImageData, opts: EncodeOptions | None = None) -> Prepared:
    """Preprocess ``img`` for ``model`` (no model call: safe to run in a loader thread)."""
    opts = opts or EncodeOptions()
    x, rec = preprocess(img, spatial_dims=model.spatial_dims, in_channels=model.config.in_channels,
                        downsample=model.downsample_per_axis, modality=opts.modality,
                        mri_percentiles=opts.mri_percentiles)
    return Prepared(x, rec)


def _to_device(x: np.ndarray, dev: torch.device) -> torch.Tensor:
    xt = torch.from_numpy(x)
    if dev.type == "cuda":  # pinned host memory lets the copy overlap with compute already queued
        return xt.pin_memory().to(dev, non_blocking=True)
    return xt.to(dev)


def _passes(engine: TiledAutoencoder, items: list[Prepared], batch: int) -> list[list[int]]:
    """Indices of ``items`` grouped into forward passes: equal-shaped images that each fit one tile share a
    pass, as many as the memory budget and ``batch`` allow; any other image has a pass of its own."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, it in enumerate(items):
        by_shape.setdefault(tuple(it.x.shape), []).append(i)
    passes = []
    for shape, idx in by_shape.items():
        n = min(batch, engine.images_per_pass(shape[1:], "encode")) if batch > 1 else 1
        n = max(1, n)
        passes += [idx[k : k + n] for k in range(0, len(idx), n)]
    return sorted(passes)


@torch.inference_mode()
def encode_prepared(model: MedVAE, items: list[Prepared], opts: EncodeOptions | None = None) -> list[LatentFile]:
    """Encode prepared images, several per forward pass where they share a shape (see ``EncodeOptions.batch``).

    The latent of record is the posterior mean ``z``; results come back in the order of ``items``. Batching
    changes no result beyond float rounding: GroupNorm and attention work per image.
    """
    opts = opts or EncodeOptions()
    dev = model.device
    engine = TiledAutoencoder(model, opts.tiles)
    want_stage2 = (opts.stage2 if opts.stage2 is not None else model.spatial_dims == 2) and model.config.stage2_head
    out: list[LatentFile | None] = [None] * len(items)
    for idx in _passes(engine, items, opts.batch):
        xt = _to_device(np.stack([items[i].x for i in idx]), dev)
        with _autocast(model, opts.precision):
            z = (model.encode(xt).mean if len(idx) > 1 else engine.encode(xt)).to(xt.dtype)
            feats = model.stage2_features(z, check_finite=False) if want_stage2 else None  # the model's own z
        for j, i in enumerate(idx):
            out[i] = LatentFile(z=z[j].float().cpu(), stage2=None if feats is None else feats[j].float().cpu(),
                                preprocessing=items[i].preprocessing, model=model_record(model),
                                inference=inference_record(model, opts.precision))
    return out  # type: ignore[return-value]


def encode_image(model: MedVAE, img: ImageData, opts: EncodeOptions | None = None) -> LatentFile:
    """Encode one image; the latent of record is the posterior mean ``z``."""
    return encode_prepared(model, [prepare(model, img, opts)], opts)[0]


def check_compatible(model: MedVAE, lf: LatentFile, source: str | Path, strict_weights: bool = True) -> None:
    """Refuse to decode a latent with a model other than the one that made it."""
    m = lf.model
    mine = model_record(model)
    for key in ("spatial_dims", "downsample_per_axis", "C"):
        if int(m.get(key, -1)) != int(mine[key]):
            raise LatentFileError(source, f"was made by model {m.get('name')!r} ({key}={m.get(key)}), which does "
                                          f"not fit model {mine['name']!r} ({key}={mine[key]})")
    if strict_weights and m.get("weights_sha256") and mine["weights_sha256"] and \
            m["weights_sha256"] != mine["weights_sha256"]:
        raise LatentFileError(source, f"was made with other weights of {m.get('name')!r} "
                                      f"(sha256 {str(m['weights_sha256'])[:12]}… vs {mine['weights_sha256'][:12]}…); "
                                      "decode with the same weights, or pass --ignore-weights to override")


@torch.inference_mode()
def decode_latent(model: MedVAE, lf: LatentFile, *, source: str | Path = "latent", precision: str = "fp32",
                  strict_weights: bool = True, out_dtype: str | None = None,
                  tiles: TileSettings | None = None) -> ImageData:
    """Decode a latent file's ``z`` back onto the original grid, orientation and intensity units."""
    check_compatible(model, lf, source, strict_weights)
    z = lf.z.float()[None].to(model.device)
    rec = lf.preprocessing
    with _autocast(model, precision):
        gray = rec.channel_mean or (rec.spatial_dims == 2 and rec.original_shape[0] == 1)
        y = TiledAutoencoder(model, tiles).decode(z, grayscale=gray)
    arr = restore(y[0].float().cpu().numpy(), rec, out_dtype)
    if arr.shape != tuple(rec.original_shape):  # e.g. a 3-channel original recorded for a 1-channel decoder
        raise LatentFileError(source, f"decodes to shape {arr.shape}, but records an original of shape "
                                      f"{tuple(rec.original_shape)}")
    meta: dict = {"format": "decoded"}
    if rec.file_geometry:  # e.g. a NIfTI X×Y×1 encoded as 2D: written back with its shape and affine
        meta["file_geometry"] = rec.file_geometry
    return ImageData(arr, np.array(rec.original_affine), modality=rec.modality, source=str(source), meta=meta)
