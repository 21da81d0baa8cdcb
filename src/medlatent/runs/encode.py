"""Encode a set of image files and folders into latent files, one per input or DICOM series."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medlatent.batch import ItemResult, Job
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

if TYPE_CHECKING:
    from medlatent.data.store import ItemLabels, LatentStore

LATENT_DTYPES = ("float16", "float32")
IN_STORE = "held by the store"  # reason of an input not encoded because its latent is in the store already


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


def start_run(inputs: list[Path], output: Path, *, model: Any, checkpoint: Any, device: str, compile: bool,
              provide: Any, listener: RunListener | None, shard: Shard | None, backend: str, precision: str,
              tiles: TileSettings | None, batch: int | None
              ) -> tuple[RunListener, Shard, str, Any, ModelChoice, int]:
    """What an image run (encode, roundtrip) sets up before its first item: the listener, the shard, the device,
    the options checked, the inputs found (the output checked first), the model choice and the batch size."""
    listener = listener or RunListener()
    part = shard or Shard()
    dev = device_for(device)
    check_run_options(backend, precision, dev, compile, tiles.norm if tiles else "tile")
    found = find_inputs(inputs, output)
    models = ModelChoice(model, checkpoint, device=dev, compile=compile, provide=provide,
                         on_load=listener.model_loaded, backend=backend, precision=precision)
    return listener, part, dev, found, models, batch or default_batch(dev)


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
                 backend: str = "torch", skip_names: Collection[str] = ()) -> RunResult:
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
        skip_names: item names not to encode (those a latent store holds already, :func:`encode_to_store`).

    Raises:
        RunError: the output is unusable, the inputs hold nothing to encode (:class:`NothingToDo`), the model cannot
            load, or the output stops taking writes. Failures of single inputs are in the result instead.
    """
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be float16 or float32, got {latent_dtype!r}")
    listener, part, dev, found, models, batch = start_run(
        inputs, output, model=model, checkpoint=checkpoint, device=device, compile=compile, provide=provide,
        listener=listener, shard=shard, backend=backend, precision=precision, tiles=tiles, batch=batch)
    opts = EncodeOptions(modality=modality, stage2=stage2, precision=precision, tiles=tiles, batch=batch)
    taken = part.take(found.items)
    items = [it for it in taken if it.name not in skip_names]
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
    report.results += [ItemResult(it.name, "skipped", reason=IN_STORE) for it in taken if it.name in skip_names]
    record_skipped(output, skipped_inputs, part.manifest_name, ignored)
    failed_all = finish(part, output, len(report.failed) + len(skipped_inputs))
    return RunResult(output, report, skipped_inputs, ignored, failed_all)


#: where ``encode_to_store`` writes latent files before packing them: a dot folder inside the store, which readers
#: of the store and ``pack``'s "not a store" check ignore
STAGING = ".encode"


@dataclass
class StoreRunResult(RunResult):
    """An :func:`encode_to_store` run: the encode of the inputs the store lacked, and what was packed.

    Attributes:
        store: the store folder.
        in_store: inputs of this process's shard the store held already (not encoded again).
        packed: latents added to the store by this process (0 on ranks other than 0, which do not pack).
        shards: shard files this process wrote.
    """

    store: Path | None = None
    in_store: int = 0
    packed: int = 0
    shards: list[str] | None = None


def encode_to_store(inputs: list[Path], store: Path, *, shard_size: int | None = None, resume: bool = True,
                    nifti: bool = False, shard: Shard | None = None, labels: str | Path | None = None,
                    **encode_kw: Any) -> StoreRunResult:
    """Encode images straight into a latent store (:mod:`medlatent.data.store`), new or existing.

    The latents are written as files into ``store/.encode`` (one per input, as :func:`encode_files` writes them,
    so an interrupted run resumes per input), then packed into new shards and the packed files removed. Inputs
    whose item name the store already holds are not encoded again, so running the same command again after an
    interruption, or with more inputs, only adds what is missing.

    With ``labels``, a CSV as ``medlatent pack --labels`` takes, whose rows name inputs by ``name`` (the item name:
    the input's path in its folder, without suffix) or by ``path`` (the image file or DICOM series folder, relative
    to the CSV), the labels are packed with the latents (:func:`~medlatent.data.store.pack`), and
    ``LatentDataset(store)`` and ``LatentStream(store)`` read them from the store. They are checked before anything
    is encoded: every input the store lacks needs a row, the store's label columns must be the CSV's, and items it
    holds must have the labels it has. Without ``labels`` the store has none (give them at training time,
    ``LatentDataset(store, labels=CSV)``), and a store with label columns is refused.

    Under torchrun every rank encodes its part into the staging folder and rank 0 packs after all have finished;
    with ``--shard R/N`` runs outside torchrun, each run packs at its end only on rank 0, so run the command once
    more after all shards have finished (it encodes nothing and packs what the other shards staged).

    Args:
        shard_size: items per new shard (default :data:`~medlatent.data.store.DEFAULT_SHARD_SIZE`).
        labels: a label CSV (see above).
        encode_kw: as :func:`encode_files` (model, device, latent_dtype, ...).

    Raises:
        RunError: the store is unusable (not a store, damaged, being written by another pack), the labels do not
            fit the inputs or the store, ``--overwrite`` or ``--nifti`` were asked for, or as :func:`encode_files`.
    """
    from medlatent.data.store import DEFAULT_SHARD_SIZE, LatentStore, StoreError, check_target, is_store, pack
    from medlatent.io.discover import find_latents
    from medlatent.latentfile import LatentFileError
    from medlatent.runs.models import RunError

    if not resume:
        raise RunError(f"{store}: a store's items are never replaced (its shards do not change once written); "
                       "encode into a new store instead of --overwrite")
    if nifti:
        raise RunError(f"{store}: --nifti writes files next to latent files; a store holds latent files only")
    part = shard or Shard()
    staging = store / STAGING
    try:
        check_target(store)
        opened = LatentStore(store) if is_store(store) else None
        held = set(opened.names) if opened is not None else set()
        item_labels = _store_labels(inputs, store, staging, labels, opened, held)
    except StoreError as e:
        raise RunError(str(e)) from e
    result = encode_files(inputs, staging, resume=True, shard=part, skip_names=held, **encode_kw)
    out = StoreRunResult(**vars(result), store=store, shards=[])
    out.in_store = sum(r.reason == IN_STORE for r in result.report.results)
    if part.rank != 0 or not find_latents([staging]).items:
        return out
    try:
        rep = pack(staging, store, item_labels, shard_size=shard_size or DEFAULT_SHARD_SIZE)
        packed = set(LatentStore(store).names)
    except (StoreError, LatentFileError, OSError) as e:
        raise RunError(f"{e} (the encoded latents stay in {staging}; run the command again to pack them)") from e
    for it in find_latents([staging]).items:  # staged latents now in the store; a later shard's stay for the next run
        if it.name in packed:
            it.paths[0].unlink()
    for d in sorted((p for p in staging.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):  # the mirrored input tree, emptied
            d.rmdir()
    out.packed, out.shards = rep.added, rep.shards
    return out


def _store_labels(inputs: list[Path], store: Path, staging: Path, labels: str | Path | None,
                  opened: LatentStore | None, held: set[str]) -> ItemLabels | None:
    """The labels :func:`encode_to_store` packs, checked against the inputs and the store (``opened``: ``None``
    while it does not exist yet; ``held``: its item names) before any encoding
    (:class:`~medlatent.data.store.StoreError` naming what does not fit)."""
    from medlatent.data.store import StoreError, check_label_columns, read_item_labels

    if labels is None:
        check_label_columns(store, [], f"{store} (encode --store without --labels)")
        return None
    found = find_inputs(inputs, staging)
    folders = Counter(it.source for it in found.items if it.kind == "dicom-series")
    sources = {it.name: [*it.paths, *([it.source] if folders[it.source] == 1 else [])] for it in found.items}
    lab = read_item_labels(labels, sources)  # a series folder names its series where it holds only one
    check_label_columns(store, lab.columns, labels)
    unlabelled = [it.source for it in found.items if it.name not in lab.rows and it.name not in held]
    if unlabelled:
        raise StoreError(f"{labels}: {len(unlabelled)} input(s) have no label row (first: {unlabelled[0]}); every "
                         "item of the store needs its labels")
    if opened is not None and held & lab.rows.keys():
        for j, name in enumerate(opened.names):
            have = {c: opened.labels[c][j] for c in lab.columns}
            if name in lab.rows and lab.rows[name] != have:
                raise StoreError(f"{labels}: the store already holds {name!r} with other labels ({have}); a store's "
                                 "labels do not change")
    return lab
