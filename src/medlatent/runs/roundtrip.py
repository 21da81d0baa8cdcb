"""Encode and decode a set of images: the latent, the reconstruction, a comparison PNG and metrics per file."""

from __future__ import annotations

import csv
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from medlatent.batch import Job
from medlatent.distributed import Shard, finish, launched_by_torchrun
from medlatent.engine.tiled import TileSettings
from medlatent.interpolation import equal_values_baseline
from medlatent.io.atomic import OutputError, write_text
from medlatent.io.discover import InputItem
from medlatent.io.image import ImageData
from medlatent.io.writers import output_suffix, write_image
from medlatent.latentfile import SUFFIX, LatentFile, write_latent
from medlatent.lossless import xz_bytes
from medlatent.model.autoencoder import MedVAE
from medlatent.pipeline import EncodeOptions, decode_latent
from medlatent.provenance import TrainingData, in_training_set, model_folder, read_training_data
from medlatent.report import comparison_png, roundtrip_metrics
from medlatent.runs.common import RunListener, RunResult, record_skipped, run_batch
from medlatent.runs.encode import Loaded, encode_loaded, load_item, start_run
from medlatent.runs.models import RunError

METRICS, SUMMARY = "metrics.csv", "summary.json"


@dataclass
class Encoded:
    """One input after the model's encoding pass: its model, the image as read and its latent."""

    net: MedVAE
    img: ImageData
    lf: LatentFile


def _recon_format(dims: int) -> str:
    return "nifti" if dims == 3 else "png"


class _TrainingLists:
    """Each model's ``training_data.json``, read once per model from whichever loader thread needs it first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: dict[int, TrainingData | None] = {}

    def of(self, net: MedVAE) -> TrainingData | None:
        with self._lock:
            if id(net) not in self._read:
                folder = model_folder(net.weights_info)
                self._read[id(net)] = read_training_data(folder) if folder else None
            return self._read[id(net)]


def roundtrip_files(inputs: list[Path], output: Path, *, model: str | Path | MedVAE | None = None,
                    checkpoint: Path | None = None, device: str = "cpu", modality: str = "auto",
                    precision: str = "fp32", uneven: str = "refuse", resume: bool = True, prefetch: int = 2,
                    batch: int | None = None, compile: bool = False, shard: Shard | None = None,
                    tiles: TileSettings | None = None, provide: str | None = None,
                    listener: RunListener | None = None, backend: str = "torch", baselines: bool = True) -> RunResult:
    """Per input: ``<name>.latent.safetensors``, ``<name>.recon.png`` (2D) or ``.recon.nii.gz`` (3D),
    ``<name>.compare.png`` (original | reconstruction | difference); over the run ``metrics.csv`` and
    ``summary.json`` with PSNR, MS-SSIM and sizes of each written item (``metrics.rank<R>.csv`` and
    ``summary.rank<R>.json`` per shard, merged by rank 0 under torchrun).

    Each row: ``psnr``, ``ms_ssim``, ``pixels``, ``latent_values``, ``source_file_bytes``, ``latent_file_bytes``,
    ``storage_ratio`` (source over latent file); with ``baselines`` the interpolation that stores as many values
    as the latent (bicubic in 2D, cubic-spline in 3D, ÷ s / C^(1/d) per axis: :mod:`medlatent.interpolation`)
    measured the same way, ``interp_psnr``, ``interp_ms_ssim``, ``interp`` (how), ``interp_f``, ``interp_values``,
    ``interp_equal_values`` (False only when f ≤ C: then it is at the model's f), and ``source_xz_bytes``
    (``xz -9e`` of the source file(s), gzip unpacked) with ``xz_storage_ratio`` (that over the latent file); and
    ``in_training_set`` (:func:`medlatent.provenance.in_training_set`: true/false from the model's
    ``training_data.json``, null when unknown).

    The options are those of :func:`medlatent.runs.encode.encode_files`; ``result.rows`` holds the metrics.

    Raises:
        RunError: as :func:`medlatent.runs.encode.encode_files`, and when the metric tables cannot be written.
    """
    listener, part, dev, found, models, batch = start_run(
        inputs, output, model=model, checkpoint=checkpoint, device=device, compile=compile, provide=provide,
        listener=listener, shard=shard, backend=backend, precision=precision, tiles=tiles, batch=batch)
    opts = EncodeOptions(modality=modality, precision=precision, tiles=tiles, batch=batch)
    items = part.take(found.items)
    skipped_inputs = part.take(found.failed + found.empty)
    ignored = part.take(found.ignored)
    training = _TrainingLists()

    def make_job(item: InputItem) -> Job:
        base = output / item.name
        latent_path = base.with_name(base.name + SUFFIX)
        compare = base.with_name(base.name + ".compare.png")

        def recon_path(fmt: str) -> Path:
            return base.with_name(base.name + ".recon" + output_suffix(fmt))

        dims = models.spatial_dims
        if dims is None:  # each input's default model: its format is known once read; until then, what is there
            dims = 3 if recon_path("nifti").is_file() else 2
        outs = [latent_path, recon_path(_recon_format(dims)), compare]
        side: dict = {}  # filled by the loader thread: the source's xz size and training mark

        def load() -> Loaded:
            loaded = load_item(models, item, uneven, opts, keep_image=True)
            side["in_training_set"] = in_training_set(item.paths, training.of(loaded.net))
            if baselines:  # lzma lets go of the GIL: this overlaps the model's work on the previous item
                side["source_xz_bytes"] = xz_bytes(item.paths)
            return loaded

        def run(enc: Encoded) -> dict:
            net, img, lf = enc.net, enc.img, enc.lf
            recon = outs[1] = recon_path(_recon_format(net.spatial_dims))  # in place: resume and cleanup see it
            write_latent(latent_path, lf)
            rec_img = decode_latent(net, lf, source=latent_path, precision=precision, out_dtype="float32",
                                    tiles=tiles)
            write_image(rec_img, recon, _recon_format(net.spatial_dims))
            metrics = roundtrip_metrics(img.array, rec_img.array, lf.preprocessing)
            comparison_png(img.array, rec_img.array, lf.preprocessing, compare)
            source_bytes = sum(p.stat().st_size for p in item.paths)
            latent_bytes = latent_path.stat().st_size
            row = {**metrics, "pixels": int(img.array.size), "latent_values": int(lf.z.numel()),
                   "source_file_bytes": source_bytes, "latent_file_bytes": latent_bytes,
                   "storage_ratio": source_bytes / latent_bytes}
            if baselines:
                row.update(_baseline(net, img, lf, opts), source_xz_bytes=side["source_xz_bytes"],
                           xz_storage_ratio=side["source_xz_bytes"] / latent_bytes)
            return {**row, "in_training_set": side["in_training_set"]}

        return Job(item.name, outs, load, run)

    def compute(loaded: list[Loaded]) -> list[Encoded]:
        return [Encoded(it.net, cast(ImageData, it.img), lf)  # load_item(keep_image=True): the image is kept
                for it, lf in zip(loaded, encode_loaded(loaded, opts), strict=True)]

    label = f"roundtrip (shard {part.rank + 1}/{part.world})" if part.active else "roundtrip"
    report = run_batch(listener, label, [make_job(it) for it in items], output, resume=resume, prefetch=prefetch,
                       manifest=part.manifest_name, batch=batch, compute=compute)
    rows = [{"item": r.item, **r.info} for r in report.results if r.status == "ok"]
    if rows:
        _write_tables(output, rows, _shard_suffix(part))
    record_skipped(output, skipped_inputs, part.manifest_name, ignored)
    failed_all = finish(part, output, len(report.failed) + len(skipped_inputs))
    if part.active and part.rank == 0 and launched_by_torchrun():  # every rank's tables are written by now
        merge_tables(output, part.world)
    return RunResult(output, report, skipped_inputs, ignored, failed_all, rows)


def _baseline(net: MedVAE, img: ImageData, lf: LatentFile, opts: EncodeOptions) -> dict:
    """Interpolation at the latent's number of values, preprocessed as the model's input was (its resolved
    modality) and measured as the model is (:func:`medlatent.report.roundtrip_metrics`)."""
    rec = lf.preprocessing
    base = equal_values_baseline(img, spatial_dims=net.spatial_dims, f=net.f, C=net.C,
                                 in_channels=net.config.in_channels, modality=rec.modality,
                                 mri_percentiles=opts.mri_percentiles)
    q = roundtrip_metrics(img.array, base.recon, rec)
    return {"interp": base.how, "interp_f": base.f, "interp_values": base.values,
            "interp_equal_values": base.equal_values, "interp_psnr": q["psnr"], "interp_ms_ssim": q["ms_ssim"]}


def _shard_suffix(part: Shard) -> str:
    return f".rank{part.rank}" if part.active else ""


def _write_tables(output: Path, rows: list[dict], suffix: str = "") -> None:
    """``metrics<suffix>.csv`` (a column per measure, ``item`` first) and ``summary<suffix>.json``."""
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=sorted({k for r in rows for k in r}, key=lambda k: (k != "item", k)))
    w.writeheader()
    w.writerows(rows)
    try:
        write_text(output / METRICS.replace(".csv", f"{suffix}.csv"), table.getvalue())
        write_text(output / SUMMARY.replace(".json", f"{suffix}.json"), json.dumps(rows, indent=2) + "\n")
    except OutputError as e:
        raise RunError(str(e)) from e


def merge_tables(output: Path, world: int) -> list[dict]:
    """Join the per-shard ``summary.rank<R>.json`` tables (rank order) into ``metrics.csv`` and ``summary.json``,
    removing the shard files; returns the joined rows."""
    rows: list[dict] = []
    parts = [output / f"summary.rank{r}.json" for r in range(world)]
    for p in parts:
        if p.is_file():
            rows += json.loads(p.read_text())
    if rows:
        _write_tables(output, rows)
    for r, p in enumerate(parts):
        p.unlink(missing_ok=True)
        (output / f"metrics.rank{r}.csv").unlink(missing_ok=True)
    return rows
