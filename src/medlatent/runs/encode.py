"""Encode a set of image files and folders into latent files, one per input or DICOM series."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medlatent.batch import Job
from medlatent.distributed import Shard, device_for, finish
from medlatent.engine.tiled import TileSettings
from medlatent.io.discover import InputItem, read_item
from medlatent.io.image import ImageData
from medlatent.io.writers import write_image
from medlatent.latentfile import SUFFIX, LatentFile, write_latent
from medlatent.model.autoencoder import MedVAE
from medlatent.pipeline import EncodeOptions, Prepared, encode_prepared, prepare
from medlatent.runs.common import RunListener, RunResult, find_inputs, record_skipped, run_batch
from medlatent.runs.models import ModelChoice, check_run_options

LATENT_DTYPES = ("float16", "float32")


@dataclass
class Loaded:
    """One input read and preprocessed in a loader thread: the model it goes to, the model input, and the image
    itself where the run needs it after encoding (``None`` otherwise, so that it is freed at once)."""

    net: MedVAE
    prepared: Prepared
    img: ImageData | None = None


def default_batch(device: str) -> int:
    """Images per forward pass when not given: 8 on GPUs; 1 on CPUs, where batching measured no gain."""
    return 1 if torch.device(device).type == "cpu" else 8


def load_item(models: ModelChoice, item: InputItem, uneven: str, opts: EncodeOptions,
              keep_image: bool = False) -> Loaded:
    """Read ``item``, choose its model and preprocess for it (no model call: runs in a loader thread)."""
    img = read_item(item, uneven)
    net = models.for_image(img)
    return Loaded(net, prepare(net, img, opts), img if keep_image else None)


def encode_loaded(items: list[Loaded], opts: EncodeOptions) -> list[LatentFile]:
    """Encode loaded inputs, in their order: those of one model together (batched by ``opts.batch``)."""
    out: list[LatentFile | None] = [None] * len(items)
    by_model: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_model.setdefault(id(it.net), []).append(i)
    for idx in by_model.values():
        lfs = encode_prepared(items[idx[0]].net, [items[i].prepared for i in idx], opts)
        for i, lf in zip(idx, lfs, strict=True):
            out[i] = lf
    return out  # type: ignore[return-value]


def encode_files(inputs: list[Path], output: Path, *, model: str | Path | MedVAE | None = None,
                 checkpoint: Path | None = None, device: str = "cpu", modality: str = "auto", precision: str = "fp32",
                 latent_dtype: str = "float16", stage2: bool | None = None, nifti: bool = False,
                 uneven: str = "refuse", resume: bool = True, prefetch: int = 2, batch: int | None = None,
                 compile: bool = False, shard: Shard | None = None, tiles: TileSettings | None = None,
                 provide: str | None = None, listener: RunListener | None = None,
                 backend: str = "torch") -> RunResult:
    """Encode images into ``output/<name>.latent.safetensors`` (the input tree mirrored).

    Args:
        model: registry name, model folder or checkpoint, or a model; ``None``: each input gets the default model
            of its dimensionality (:func:`medlatent.registry.default_model`), loaded once on first use.
        nifti: also write ``z`` as NIfTI (``<name>.latent.nii.gz``) aligned with the source image.
        batch: equal-shaped images per forward pass (default: :func:`default_batch` of the device).
        shard: the part of the inputs this process takes (default: all).
        provide: how the caller can give weights the Hub cannot (ends a missing-download message).
        backend: ``torch``, or ``onnxruntime``/``openvino`` running the exported graphs on the CPU
            (:mod:`medlatent.deploy`); ``precision`` bf16 on CPU only where the CPU has native bf16.

    Raises:
        RunError: the output is unusable, the inputs hold nothing to encode (:class:`NothingToDo`), the model cannot
            load, or the output stops taking writes. Failures of single inputs are in the result instead.
    """
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be float16 or float32, got {latent_dtype!r}")
    listener = listener or RunListener()
    part = shard or Shard()
    dev = device_for(device)
    check_run_options(backend, precision, dev, compile, tiles.norm if tiles else "tile")
    found = find_inputs(inputs, output)
    models = ModelChoice(model, checkpoint, device=dev, compile=compile, provide=provide,
                         on_load=listener.model_loaded, backend=backend, precision=precision)
    batch = batch or default_batch(dev)
    opts = EncodeOptions(modality=modality, stage2=stage2, precision=precision, tiles=tiles, batch=batch)
    items = part.take(found.items)
    skipped_inputs = part.take(found.failed + found.empty)
    ignored = part.take(found.ignored)

    def make_job(item: InputItem) -> Job:
        latent_path = output / (item.name + SUFFIX)
        outs = [latent_path] + ([output / (item.name + ".latent.nii.gz")] if nifti else [])

        def run(lf: LatentFile) -> dict:
            write_latent(latent_path, lf, dtype=getattr(torch, latent_dtype))
            if nifti:
                z = lf.z.float().numpy()
                arr = z[0] if z.shape[0] == 1 else np.moveaxis(z, 0, -1)
                write_image(ImageData(arr[None] if lf.spatial_dims == 2 and arr.ndim == 2 else arr,
                                      lf.latent_affine), outs[1], "nifti")
            return {"shape": list(lf.preprocessing.original_shape), "latent_shape": list(lf.z.shape)}

        # reading and preprocessing run in loader threads, overlapped with the model's passes
        return Job(item.name, outs, lambda: load_item(models, item, uneven, opts), run)

    label = f"encoding (shard {part.rank + 1}/{part.world})" if part.active else "encoding"
    report = run_batch(listener, label, [make_job(it) for it in items], output, resume=resume, prefetch=prefetch,
                       manifest=part.manifest_name, batch=batch, compute=lambda loaded: encode_loaded(loaded, opts))
    record_skipped(output, skipped_inputs, part.manifest_name, ignored)
    failed_all = finish(part, output, len(report.failed) + len(skipped_inputs))
    return RunResult(output, report, skipped_inputs, ignored, failed_all)
