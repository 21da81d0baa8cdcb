"""Command-line interface: ``medlatent --help``. A thin layer over the library; heavy imports inside commands."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from medlatent.console import fail as _fail
from medlatent.registry import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MedVAE medical-image autoencoders.")


# How each command can be given weights when the Hub cannot (only options that command has).
PROVIDE_BY_OPTIONS = "`--checkpoint FILE` (the downloaded file) or `--model DIR` (a folder from `medlatent convert`)"
PROVIDE_FOR_PROFILE = ("`--checkpoint FILE` (the downloaded file), a folder from `medlatent convert` in place of "
                       "the model name, or `--random-weights` (timings only)")


def _load(model: str, checkpoint: Optional[Path], random_weights: bool = False, provide: Optional[str] = None):
    from medlatent.runs import ModelLoadError, load_model

    try:
        return load_model(model, checkpoint, random_weights=random_weights, provide=provide)
    except ModelLoadError as e:
        _fail(str(e))


def _tiles(tile: Optional[int], overlap: Optional[int], max_memory: Optional[float], tile_batch: int,
           norm: str = "tile"):
    from medlatent.engine.tiled import TileSettings, norm_options

    try:
        return TileSettings(tile=tile, overlap=overlap, max_memory_gb=max_memory, batch_size=tile_batch,
                            **norm_options(norm))
    except ValueError as e:
        _fail(f"--norm {norm}: {e} (use tile, image or image:PASSES)")


TILE_OPT = typer.Option(None, "--tile", help="Tile edge in image pixels/voxels (default: from --max-memory).")
OVERLAP_OPT = typer.Option(None, "--overlap",
                           help="Tile overlap in image pixels/voxels (default: from the receptive field).")
MEMORY_OPT = typer.Option(None, "--max-memory", help="Activation memory budget in GB (default: what fits the device).")
TILE_BATCH_OPT = typer.Option(1, "--tile-batch", min=1, help="Tiles per forward pass.")
NORM_OPT = typer.Option("tile", "--norm", help="GroupNorm statistics of tiled images: 'tile' (each tile its own; "
                                               "fastest) or 'image' / 'image:PASSES' (image-wide, from 4 or PASSES "
                                               "statistics passes over the tiles: much closer to untiled output).")
BACKEND_OPT = typer.Option(None, "--backend", help="torch (default), onnxruntime or openvino: the latter two run the "
                                                  "exported ONNX graphs on the CPU (pip install 'medlatent[deploy]'; "
                                                  "exported once per weights into ~/.cache/medlatent or "
                                                  "$MEDLATENT_CACHE).")
PRECISION_OPT = typer.Option(None, "--precision", help="fp32 (default, matches the official outputs), bf16 or fp16 "
                                                       "(GPU). bf16 on CPU only where /proc/cpuinfo lists avx512_bf16 "
                                                       "or amx_bf16; onnxruntime runs fp32 only.")
COMPILE_OPT = typer.Option(False, "--compile", help="torch.compile the encoder and decoder (compiled on first use "
                                                    "and per new tile shape; no gain measured on a 2-core CPU).")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def models() -> None:
    """List the MedVAE family: name, downsizing factor f, latent channels C, and whether weights are cached."""
    from rich.console import Console
    from rich.table import Table

    from medlatent.registry import get_model_info, list_models

    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
        try_to_load_from_cache = None
    table = Table("model", "dims", "f", "C", "latent of H×W(×D)", "cached", "description")
    for name in list_models():
        info = get_model_info(name)
        s = info.config.downsample_per_axis
        shape = "×".join([f"/{s}"] * info.spatial_dims)
        if info.bundled:
            state = "bundled"
        else:
            cached = try_to_load_from_cache(info.repo_id, info.hub_checkpoint) if try_to_load_from_cache else None
            state = "yes" if isinstance(cached, str) else "no"
        table.add_row(name, f"{info.spatial_dims}D", str(info.f), str(info.C), f"{shape} ×{info.C}", state,
                      info.description)
    Console(width=160).print(table)


@app.command()
def convert(
    checkpoint: Path = typer.Argument(..., help="Official .ckpt/.pt/.safetensors file."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write config.json + model.safetensors."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registry name (checked); inferred if omitted."),
) -> None:
    """Convert an official checkpoint (LoRA merged) into medlatent's safetensors format."""
    from medlatent.checkpoints import CheckpointError, load_checkpoint

    try:
        net = load_checkpoint(checkpoint, model)
    except (KeyError, FileNotFoundError, CheckpointError) as e:
        _fail(e.args[0] if isinstance(e, KeyError) else str(e))
    net.save_pretrained(output, name=model or net.weights_info.get("model"))
    sha = net.weights_info["sha256"][:12]
    typer.echo(f"wrote {output} (f={net.f}, C={net.C}, {net.spatial_dims}D, source sha256 {sha})")


@app.command()
def profile(
    model: str = typer.Argument(DEFAULT_MODEL, help="Registry name, model directory or checkpoint file."),
    size: str = typer.Option("512x512", "--size", "-s", help="Input spatial size: HxW (2D) or XxYxZ (3D)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Official checkpoint file."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Skip weights: build from the registry."),
    batch: int = typer.Option(1, "--batch", "-b", min=1),
    device: str = typer.Option("cpu", "--device", "-d"),
    tile: Optional[int] = TILE_OPT,
    overlap: Optional[int] = OVERLAP_OPT,
    max_memory: Optional[float] = MEMORY_OPT,
    tile_batch: int = TILE_BATCH_OPT,
    norm: str = NORM_OPT,
    untiled: bool = typer.Option(False, "--untiled", help="Run the whole image at once (no tiling)."),
) -> None:
    """Encode and decode one random batch: latent shape, time and peak memory for your image size."""
    import resource
    import time

    import torch

    try:
        dims = [int(n) for n in size.lower().split("x")]
    except ValueError:
        _fail(f"--size must look like 512x512 or 128x128x128, got {size!r}")
    if not untiled and batch != 1:
        _fail("tiled profiling takes --batch 1 (add --untiled to time a batch)")
    tiles = _tiles(tile, overlap, max_memory, tile_batch, norm)  # options checked before any weights are fetched
    net = _load(model, checkpoint, random_weights, provide=PROVIDE_FOR_PROFILE).to(device)
    if len(dims) != net.spatial_dims:
        _fail(f"--size needs {net.spatial_dims} numbers for this {net.spatial_dims}D model, got {size!r}")
    x = torch.rand(batch, net.config.in_channels, *dims, device=device) * 2 - 1
    from medlatent.engine.tiled import TiledAutoencoder

    runner = TiledAutoencoder(net, tiles)
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            z = net.encode(x).mean if untiled else runner.encode(x)
            t1 = time.perf_counter()
            y = net.decode(z) if untiled else runner.decode(z)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t2 = time.perf_counter()
    except ValueError as e:
        _fail(str(e))
    if device.startswith("cuda"):
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU, allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"
    src = "random weights" if random_weights else net.weights_info.get("file", "")
    typer.echo(f"model     {net.weights_info.get('model', model)} ({src})")
    typer.echo(f"input     {tuple(x.shape)} → z {tuple(z.shape)} → {tuple(y.shape)}  (f={net.f}, C={net.C})")
    typer.echo(f"encode    {t1 - t0:.3f} s\ndecode    {t2 - t1:.3f} s\npeak mem  {peak}")



# ================================================================================== images ⇄ latents
def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


class _Progress:
    """Shows a run (a ``medlatent.runs.RunListener``): models as they load, a rich progress bar over the items,
    failures as they happen, above the bar."""

    def __init__(self, console, after_load: str | None = None) -> None:
        self.console = console
        self.progress = None
        self.after_load = after_load  # shown once, with the first model (a run that loads none says nothing more)

    def model_loaded(self, name: str, note: str) -> None:
        self.console.print(f"model {name}" + ("" if note == "given" else f" ({note})"), highlight=False,
                           markup=False)
        if self.after_load:
            self.console.print(self.after_load, highlight=False, markup=False)
            self.after_load = None

    def started(self, label: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn(f"{label} [progress.description]{{task.description}}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console)
        self.task = self.progress.add_task("", total=total)
        self.progress.start()

    def item_done(self, res) -> None:
        from rich.markup import escape

        if res.status == "failed":
            self.progress.console.print(f"[red]failed[/red]  {escape(res.item)} — {escape(res.reason)}",
                                        highlight=False)
        self.progress.update(self.task, advance=1, description=escape(res.item))

    def stopped(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _run(console, run, *args, after_load: str | None = None, **kw):
    """A library run (``medlatent.runs``) shown on ``console``; what it cannot do ends the command in one line,
    after the inputs it found nothing in are listed. ``after_load``: a line shown once a model has loaded."""
    from medlatent.runs import NothingToDo, RunError

    try:
        return run(*args, listener=_Progress(console, after_load), provide=PROVIDE_BY_OPTIONS, **kw)
    except NothingToDo as e:
        _list_inputs(console, e.failed, e.ignored)
        _fail(str(e))
    except RunError as e:
        _fail(str(e))


def _backend(backend: Optional[str], precision: Optional[str]) -> tuple[str, str, str]:
    """The backend and precision of a run, and the line saying why they were chosen (shown once a model has
    loaded, so that a run that fails before, e.g. offline, still says one line)."""
    from medlatent.deploy import resolve

    backend, precision, why = resolve(backend, precision)
    return backend, precision, f"backend {backend} {precision} ({why})"


def _list_inputs(console, failures, ignored, limit: int = 10) -> None:
    """Known non-image files (the first ``limit``; all are in the manifest), then failures with reasons."""
    if ignored:
        console.print(f"not images, skipped ({len(ignored)}):", highlight=False)
        for p, why in list(ignored)[:limit]:
            console.print(f"  {p}: {why}", highlight=False, markup=False)
        if len(ignored) > limit:
            console.print(f"  … and {len(ignored) - limit} more (all listed in the manifest)", highlight=False)
    if failures:
        console.print("[red]failures:[/red]")
        for item, why in failures:
            console.print(f"  {item}: {why}", highlight=False, markup=False)


def _finish(console, result) -> None:
    """Summary, skipped non-images and failures listed with reasons, non-zero exit if anything failed (in any
    shard)."""
    from medlatent.batch import MANIFEST

    counts = result.report.counts()
    failures, ignored = result.failures, result.ignored
    not_images = f"{len(ignored)} not images (skipped), " if ignored else ""
    console.print(f"done: {counts.get('ok', 0)} written, {counts.get('skipped', 0)} already complete, "
                  f"{not_images}{len(failures)} failed — manifest {result.output / MANIFEST}", highlight=False)
    _list_inputs(console, failures, ignored)
    if not result.ok:
        raise typer.Exit(code=1)


def _shard(spec: Optional[str]):
    from medlatent.distributed import shard_from

    try:
        return shard_from(spec)
    except ValueError as e:
        _fail(str(e))


MODEL_OPT = typer.Option(None, "--model", "-m", help="Registry name or model directory (default: the bundled model "
                                                     "for the input's dimensionality; 2D only so far).")
PREFETCH_OPT = typer.Option(2, min=1, help="Inputs read ahead while the model runs.")
BATCH_OPT = typer.Option(None, "--batch", "-b", min=1, help="Equal-shaped images per forward pass, within --max-memory "
                                                            "(default: 8 on GPUs; 1 on CPUs, where batching measured "
                                                            "no gain).")
SHARD_OPT = typer.Option(None, help="Process shard R/N of the inputs (default: torchrun's RANK/WORLD_SIZE).")


@app.command()
def encode(
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders (walked recursively)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (mirrors the input tree)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Instead of -o: a latent store (new, or one to add "
                                                               "to; inputs it holds are skipped)."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", min=1, help="--store: items per new shard "
                                                                               "(default 10000)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="--store: CSV with a name (or path: the image, "
                                                                 "relative to the CSV) column and labels, packed "
                                                                 "with the latents as medlatent pack --labels does."),
    model: Optional[str] = MODEL_OPT,
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Official checkpoint file."),
    modality: str = typer.Option("auto", help="ct, mri, xray, other, or auto (from the file; 3D ≤-900 → CT)."),
    device: str = typer.Option("cpu", "--device", "-d"),
    precision: Optional[str] = PRECISION_OPT,
    backend: Optional[str] = BACKEND_OPT,
    latent_dtype: str = typer.Option("float16", help="Storage dtype of z: float16 or float32."),
    stage2: Optional[bool] = typer.Option(None, "--stage2/--no-stage2", help="Store stage-2 features (2D default)."),
    nifti: bool = typer.Option(False, "--nifti", help="Also write z as NIfTI aligned with the source image."),
    uneven: str = typer.Option("refuse", help="DICOM series with uneven slices: refuse or resample."),
    resume: bool = typer.Option(True, "--resume/--overwrite", help="Skip inputs whose outputs are complete."),
    prefetch: int = PREFETCH_OPT,
    batch: Optional[int] = BATCH_OPT,
    compile_model: bool = COMPILE_OPT,
    shard: Optional[str] = SHARD_OPT,
    tile: Optional[int] = TILE_OPT,
    overlap: Optional[int] = OVERLAP_OPT,
    max_memory: Optional[float] = MEMORY_OPT,
    tile_batch: int = TILE_BATCH_OPT,
    norm: str = NORM_OPT,
) -> None:
    """Encode images into latent files (``<name>.latent.safetensors``), one per input or DICOM series; with
    --store, into a sharded latent store (as medlatent pack writes; a second run adds only what is missing)."""
    from medlatent.runs import encode_files, encode_to_store

    if (output is None) == (store is None):
        _fail("give either --output (a folder of latent files) or --store (a latent store)")
    if shard_size is not None and store is None:
        _fail("--shard-size applies to --store")
    if labels is not None and store is None:
        _fail("--labels applies to --store (for latent files, give the CSV to the dataset or to medlatent pack)")
    if latent_dtype not in ("float16", "float32"):
        _fail(f"--latent-dtype must be float16 or float32, got {latent_dtype!r}")
    part = _shard(shard)
    tiles = _tiles(tile, overlap, max_memory, tile_batch, norm)  # options checked before any weights are fetched
    console = _console()
    backend, precision, backend_line = _backend(backend, precision)
    kw = dict(model=model, checkpoint=checkpoint, device=device, modality=modality, precision=precision,
              latent_dtype=latent_dtype, stage2=stage2, nifti=nifti, uneven=uneven, resume=resume, prefetch=prefetch,
              batch=batch, compile=compile_model, shard=part, tiles=tiles, backend=backend)
    if store is None:
        _finish(console, _run(console, encode_files, inputs, output, after_load=backend_line, **kw))
        return
    result = _run(console, encode_to_store, inputs, store, shard_size=shard_size, labels=labels,
                  after_load=backend_line, **kw)
    held = f", {result.in_store} of them were in the store already" if result.in_store else ""
    console.print(f"store {store}: {result.packed} latent(s) added in {len(result.shards)} new shard(s){held}",
                  highlight=False, markup=False)
    _finish(console, result)


@app.command()
def decode(
    latents: list[Path] = typer.Argument(..., help="Latent files or folders of them."),
    output: Path = typer.Option(..., "--output", "-o"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Default: the model named in each latent."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c"),
    fmt: Optional[str] = typer.Option(
        None, "--format", "-f", help="nifti, png, tiff, npy or dicom (default: nifti 3D and NIfTI sources, png 2D); "
                                     "dicom: a derived series, a folder per volume, a file per 2D image."),
    template: Optional[Path] = typer.Option(
        None, help="--format dicom: the source DICOM (a file, or the folder given to encode) to copy patient and "
                   "study attributes from; without it the files hold no identifiers."),
    keep_study: bool = typer.Option(False, help="--format dicom: keep the template's StudyInstanceUID."),
    device: str = typer.Option("cpu", "--device", "-d"),
    precision: Optional[str] = PRECISION_OPT,
    backend: Optional[str] = BACKEND_OPT,
    ignore_weights: bool = typer.Option(False, help="Decode even if the weights differ from the encoder's."),
    resume: bool = typer.Option(True, "--resume/--overwrite"),
    tile: Optional[int] = TILE_OPT,
    overlap: Optional[int] = OVERLAP_OPT,
    max_memory: Optional[float] = MEMORY_OPT,
    tile_batch: int = TILE_BATCH_OPT,
    norm: str = NORM_OPT,
    compile_model: bool = COMPILE_OPT,
) -> None:
    """Decode latent files back to images on the original grid, orientation and intensity units."""
    from medlatent.io.writers import output_suffix
    from medlatent.runs import decode_files

    dicom = fmt == "dicom"
    if fmt is not None and not dicom:
        try:
            output_suffix(fmt)
        except ValueError as e:
            _fail(f"{e}, dicom")
    _check_dicom_options(dicom, template, keep_study)
    tiles = _tiles(tile, overlap, max_memory, tile_batch, norm)
    console = _console()
    backend, precision, backend_line = _backend(backend, precision)
    result = _run(console, decode_files, latents, output, after_load=backend_line, model=model, checkpoint=checkpoint,
                  fmt=fmt,
                  template=template, keep_study=keep_study, device=device, precision=precision,
                  ignore_weights=ignore_weights, resume=resume, tiles=tiles, compile=compile_model, backend=backend)
    _finish(console, result)


def _check_dicom_options(dicom: bool, template: Optional[Path], keep_study: bool) -> None:
    if (template is not None or keep_study) and not dicom:
        _fail("--template and --keep-study apply to --format dicom")
    if keep_study and template is None:
        _fail("--keep-study keeps the study of the source DICOM: give it with --template")
    if template is not None and not template.exists():
        _fail(f"--template {template}: no such file or folder")


@app.command()
def info(file: Path = typer.Argument(..., help="A latent file.")) -> None:
    """Show what a latent file holds."""
    import json

    from medlatent.latentfile import LatentFileError, read_latent

    try:
        lf = read_latent(file)
    except LatentFileError as e:
        _fail(str(e))
    rec = lf.preprocessing
    m = lf.model
    typer.echo(f"file            {file}")
    typer.echo(f"model           {m.get('name')}  (f={m.get('f')}, C={m.get('C')}, {m.get('spatial_dims')}D, "
               f"weights sha256 {str(m.get('weights_sha256', ''))[:12]})")
    typer.echo(f"z               {tuple(lf.z.shape)} {str(lf.z.dtype).replace('torch.', '')}")
    typer.echo(f"stage-2         {'none' if lf.stage2 is None else tuple(lf.stage2.shape)}")
    typer.echo(f"original        shape {tuple(rec.original_shape)}, dtype {rec.original_dtype}, "
               f"modality {rec.modality}")
    typer.echo(f"intensity       {json.dumps(rec.intensity)}")
    typer.echo(f"orientation     {'unchanged' if rec.orientation is None else rec.orientation}")
    typer.echo(f"padding         {rec.pad} → model shape {tuple(rec.model_shape)}")
    typer.echo("original affine " + np_fmt(rec.original_affine))
    typer.echo("latent affine   " + np_fmt(lf.latent_affine.tolist()))
    typer.echo(f"medlatent       {lf.medlatent_version} (file format {lf.format_version})")
    if lf.inference:
        typer.echo(f"computed by     {lf.inference.get('backend')} {lf.inference.get('precision')}")
    typer.echo("checksum        " + ("tensors and metadata verified" if lf.metadata_verified else
                                     "tensors verified; metadata unverified (older format: re-encode to check)"))


def np_fmt(rows) -> str:
    return " | ".join(" ".join(f"{v:9.3f}" for v in r) for r in rows)


@app.command()
def roundtrip(
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    output: Path = typer.Option(..., "--output", "-o"),
    model: Optional[str] = MODEL_OPT,
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c"),
    modality: str = typer.Option("auto"),
    device: str = typer.Option("cpu", "--device", "-d"),
    precision: Optional[str] = PRECISION_OPT,
    backend: Optional[str] = BACKEND_OPT,
    uneven: str = typer.Option("refuse"),
    resume: bool = typer.Option(True, "--resume/--overwrite"),
    prefetch: int = PREFETCH_OPT,
    batch: Optional[int] = BATCH_OPT,
    compile_model: bool = COMPILE_OPT,
    shard: Optional[str] = SHARD_OPT,
    tile: Optional[int] = TILE_OPT,
    overlap: Optional[int] = OVERLAP_OPT,
    max_memory: Optional[float] = MEMORY_OPT,
    tile_batch: int = TILE_BATCH_OPT,
    norm: str = NORM_OPT,
    baselines: bool = typer.Option(
        True, "--baselines/--no-baselines",
        help="Measure interpolation at the latent's number of values (bicubic 2D, cubic-spline 3D) and xz -9e of "
             "the source next to the model; --no-baselines skips both (xz -9e of a large file takes seconds)."),
) -> None:
    """Encode and decode: writes the latent, the reconstruction, a comparison PNG and PSNR / MS-SSIM per file,
    against interpolation at the latent's number of stored values and xz -9e of the source."""
    from medlatent.runs import roundtrip_files

    part = _shard(shard)
    tiles = _tiles(tile, overlap, max_memory, tile_batch, norm)  # options checked before any weights are fetched
    console = _console()
    backend, precision, backend_line = _backend(backend, precision)
    result = _run(console, roundtrip_files, inputs, output, after_load=backend_line, model=model, checkpoint=checkpoint,
                  device=device,
                  modality=modality, precision=precision, uneven=uneven, resume=resume, prefetch=prefetch,
                  batch=batch, compile=compile_model, shard=part, tiles=tiles, backend=backend, baselines=baselines)
    for r in result.rows:
        console.print(f"  {_roundtrip_line(r)}", highlight=False, markup=False)
    _finish(console, result)


def _bytes(n: int) -> str:
    """A byte count to read at a glance: ``812 B``, ``33.1 kB``, ``4.52 MB`` (powers of 1000)."""
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _roundtrip_line(r: dict) -> str:
    """One roundtrip row: the model's PSNR / MS-SSIM with interpolation's at equal values in brackets, values
    and bytes stored, xz -9e of the source, and whether the model was trained on the image."""
    if "interp_psnr" in r:
        what = r["interp"].split(" ")[0] + (" at equal values" if r["interp_equal_values"] else " at the same f")
        quality = (f"PSNR {r['psnr']:.2f} dB ({what} {r['interp_psnr']:.2f}), "
                   f"MS-SSIM {r['ms_ssim']:.4f} ({r['interp_ms_ssim']:.4f})")
    else:
        quality = f"PSNR {r['psnr']:.2f} dB, MS-SSIM {r['ms_ssim']:.4f}"
    file, latent = _bytes(r["source_file_bytes"]), _bytes(r["latent_file_bytes"])
    sizes = f"file {file} → latent {latent} (÷{r['storage_ratio']:.1f}"
    if "source_xz_bytes" in r:
        sizes += f"; xz -9e {_bytes(r['source_xz_bytes'])}, ÷{r['xz_storage_ratio']:.1f}"
    mark = " [training image]" if r.get("in_training_set") else ""
    return f"{r['item']}: {quality}, {r['pixels']} px → {r['latent_values']} values, {sizes}){mark}"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    config: Optional[str] = typer.Argument(None, help="A training YAML file or a preset name (see --presets)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value settings, e.g. data.train=x.csv"),
    presets: bool = typer.Option(False, "--presets", help="List the bundled presets with what each does, and exit."),
    show: bool = typer.Option(False, "--show", help="Print the resolved configuration as YAML and exit."),
    reference: bool = typer.Option(False, "--reference", help="Print every configuration key with its default and "
                                                              "meaning (Markdown; docs/training-config.md), and exit."),
) -> None:
    """Train a model from a preset or YAML file: stage 1, stage 2 (2D) or stage 2-3D. Resumes from
    train.output_dir when it holds checkpoints. To fine-tune a trained model, `medlatent finetune` is shorter.

    Example: medlatent train medvae_4_1_2d-stage1 data.train=/data/train.csv train.output_dir=runs/mmg
    """
    from medlatent.training.config import ConfigError, load_config, preset_descriptions

    if presets:
        for name, description in preset_descriptions().items():
            typer.echo(f"{name}\n    {description}")
        return
    if reference:
        from medlatent.training.reference import config_reference

        typer.echo(config_reference())
        return
    if config is None:
        _fail("give a YAML file or a preset name (medlatent train --presets lists them)")
    try:
        cfg = load_config(config, overrides or [], check=not show)
    except ConfigError as e:
        _fail(str(e))
    _train_or_show(cfg, show)


def _train_or_show(cfg, show: bool) -> None:
    """Print the configuration (``--show``) or run it: exit 0 with the model's folder, 1 with the reason, or
    128 + the signal number after SIGINT/SIGTERM (a checkpoint of the last step saved)."""
    from medlatent.training.config import ConfigError
    from medlatent.training.data import DataError
    from medlatent.training.run import run
    from medlatent.training.trainer import TrainingInterrupted

    if show:
        typer.echo(cfg.to_yaml())
        return
    try:
        summary = run(cfg)
    except TrainingInterrupted as e:
        typer.secho(str(e), err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(code=e.exit_code) from None
    except KeyboardInterrupt:  # before the loop started, or a second Ctrl-C
        typer.secho(f"stopped at once: nothing saved since the last checkpoint in {cfg.train.output_dir}/checkpoints "
                    "(if any); the same command resumes from it", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(code=130) from None
    except (ConfigError, DataError, FileNotFoundError, RuntimeError, ValueError) as e:
        _fail(str(e))
    m = summary["metrics"]
    val = (f"validation PSNR {m['val_psnr']:.2f} dB, MS-SSIM {m['val_ms_ssim']:.4f} on {int(m['val_images'])} "
           "image(s)" if m else "no validation in this run")
    typer.echo(f"done: step {summary['step']}, {val}; model {summary['name']!r} in {summary['exported']} "
               f"(use it with --model {summary['exported']})")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def finetune(
    model: str = typer.Argument(..., help="The model to start from: a registry name (the bundled default, or an "
                                          "official member whose weights are cached or downloadable), a model "
                                          "folder (e.g. RUN_DIR/final, `medlatent convert` output) or a checkpoint."),
    data: Path = typer.Argument(..., help="Training images: a folder (walked recursively) or a CSV with a path "
                                          "column (optional split and modality columns)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value settings applied last, e.g. "
                                                               "data.size=256 (keys: medlatent train --reference)."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder: logs, checkpoints, final/. Re-running "
                                                            "the same command resumes."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimiser steps in total (train.max_steps; "
                                                                      "default 2000)."),
    name: Optional[str] = typer.Option(None, "--name", help="The fine-tuned model's name, recorded in "
                                                            "final/config.json and every latent file it writes "
                                                            "(default: the run folder's name)."),
    show: bool = typer.Option(False, "--show", help="Print the resolved configuration as YAML and exit."),
) -> None:
    """Fine-tune a trained model on your images; the result loads with --model RUN_DIR/final.

    The recipe is the model's preset (medlatent train --presets) with the weights of MODEL as the start, a
    short learning-rate warm-up and a seeded 10% of the files held out for validation (data.val=none: none).

    Example: medlatent finetune medlatent_small_4_4_2d samples/2d -o runs/my_model --steps 50
    """
    from medlatent.training.config import ConfigError
    from medlatent.training.finetune import finetune_config

    try:
        cfg = finetune_config(model, data, output, steps=steps, name=name, overrides=overrides or [],
                              check=not show)
    except ConfigError as e:
        _fail(str(e))
    _train_or_show(cfg, show)


@app.command("export")
def export_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="Registry name or model folder."),
    to: str = typer.Option(..., "--to", help="Target: diffusers (2D), monai (2D/3D) or onnx (2D/3D)."),
    output: Path = typer.Option(..., "--output", "-o", help="A new folder to write."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Official checkpoint file for MODEL."),
    scaling_factor: Optional[float] = typer.Option(
        None, "--scaling-factor", help="diffusers/MONAI latent scale (default: 1/std of z over the sample images)."),
) -> None:
    """Write MODEL for diffusers (AutoencoderKL folder), MONAI (AutoencoderKL state dict + arguments) or ONNX.

    Example: medlatent export medlatent_small_4_4_2d --to diffusers -o vae_diffusers
    """
    from medlatent.export import TARGETS, ExportError, export
    from medlatent.io.atomic import OutputError, check_output_dir
    from medlatent.optional import OptionalDependencyError

    if to not in TARGETS:
        _fail(f"--to {to}: unknown target; use one of {', '.join(TARGETS)}")
    if scaling_factor is not None and to == "onnx":
        _fail("--scaling-factor applies to --to diffusers and --to monai, not onnx")
    try:
        check_output_dir(output)
    except OutputError as e:
        _fail(str(e))
    net = _load(model, checkpoint, provide=PROVIDE_BY_OPTIONS)
    if scaling_factor is None and (to == "monai" or (to == "diffusers" and net.spatial_dims == 2)):
        typer.echo("measuring the scaling factor on the offline sample images (--scaling-factor skips this)")
    try:
        path = export(net, to, output, scaling_factor=scaling_factor)
    except (ExportError, OptionalDependencyError, OSError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path} ({to}, {net.spatial_dims}D, f={net.f}, C={net.C})")


@app.command("export-ckpt")
def export_ckpt(
    model_dir: Path = typer.Argument(..., help="A trained model folder (RUN_DIR/final or a checkpoint folder)."),
    output: Path = typer.Option(..., "--output", "-o", help="The .ckpt file to write."),
) -> None:
    """Write a trained model as an official-format .ckpt ({"state_dict": ...}) that the official MedVAE code loads."""
    from medlatent.checkpoints import CheckpointError
    from medlatent.training.export import ExportError, export_folder_ckpt

    try:
        path, note = export_folder_ckpt(model_dir, output)
    except (CheckpointError, ExportError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path} ({note})")


@app.command()
def samples(
    output: Path = typer.Option(Path("samples"), "--output", "-o"),
    max_size_2d: int = typer.Option(
        1024, help="Block-average 2D images to at most this many pixels on the long side (0: keep)."),
    max_size_3d: int = typer.Option(
        128, help="Block-average volumes to at most this many voxels per axis (0: keep)."),
    full_resolution: bool = typer.Option(
        False, "--full-resolution", help="Keep every image at its source resolution (same as both sizes 0)."),
) -> None:
    """Gather real public sample images from installed packages (pip install 'medlatent[samples]')."""
    from medlatent.io.atomic import OutputError, check_output_dir
    from medlatent.samples import MANIFEST, MAX_SIZE_2D, MAX_SIZE_3D, gather

    if full_resolution and (max_size_2d, max_size_3d) != (MAX_SIZE_2D, MAX_SIZE_3D):
        _fail("--full-resolution keeps every image whole; it cannot be combined with --max-size-2d/--max-size-3d")
    if full_resolution:
        max_size_2d = max_size_3d = 0
    try:
        check_output_dir(output)
    except OutputError as e:
        _fail(str(e))
    got = gather(output, max_size_2d, max_size_3d)
    for s in got.written:
        typer.echo(f"{s.path}  ← {s.note}")
    for s in got.skipped:  # what is missing, and why: the summary below promises only what was written
        typer.secho(f"{'failed' if s.failed else 'skipped'}: {s.name}: {s.reason}", err=True,
                    fg=typer.colors.RED if s.failed else typer.colors.YELLOW)
    if not got.written:
        _fail("no sample could be written (reasons above)")
    per_dims = [f"{n} {d}D in {output / f'{d}d'}" for d in (2, 3) if (n := sum(s.dims == d for s in got.written))]
    skipped = f", {len(got.skipped)} skipped" if got.skipped else ""
    typer.echo(f"{len(got.written)} samples ({', '.join(per_dims)}){skipped} — manifest {output / MANIFEST}")
    if any(s.failed for s in got.skipped):
        raise typer.Exit(code=1)


@app.command("pack")
def pack_cmd(
    latent_dir: Path = typer.Argument(..., help="A folder of latent files (searched recursively)."),
    output: Path = typer.Option(..., "--output", "-o", help="The store: a new folder, or a store to append to."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV with a path or name column and labels."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", min=1, help="Items per shard (default 10000)."),
) -> None:
    """Pack latent files (bytes unchanged) with their labels into a sharded store: tar shards, an index and
    SHA-256 checksums. Into an existing store it appends; run again after an interruption, it resumes.

    Example: medlatent pack latents -o latents.store --labels labels.csv
    """
    from medlatent.data.store import DEFAULT_SHARD_SIZE, StoreError, pack
    from medlatent.latentfile import LatentFileError

    try:
        rep = pack(latent_dir, output, labels, shard_size=shard_size or DEFAULT_SHARD_SIZE)
    except (StoreError, LatentFileError, OSError) as e:
        _fail(str(e))
    if rep.discarded:
        typer.echo(f"resumed: removed {len(rep.discarded)} unfinished file(s) of an interrupted pack")
    held = f", {rep.already} already in the store" if rep.already else ""
    typer.echo(f"packed {rep.added} latent(s) into {len(rep.shards)} new shard(s) of {output}{held}")


@app.command("unpack")
def unpack_cmd(
    store: Path = typer.Argument(..., help="A latent store (from medlatent pack)."),
    output: Path = typer.Option(..., "--output", "-o", help="The folder to write the latent files to."),
) -> None:
    """Write the latent files of a store back to a folder, bit-identical to those packed (verified first).

    Example: medlatent unpack latents.store -o latents
    """
    from medlatent.data.store import StoreError, unpack

    try:
        rep = unpack(store, output)
    except (StoreError, OSError) as e:
        _fail(str(e))
    held = f", {rep.already} identical file(s) already there" if rep.already else ""
    typer.echo(f"unpacked {rep.written} latent file(s) into {output}{held}")


def _add_subcommands() -> None:
    from medlatent.evaluation.cli import app as evaluate_app
    from medlatent.readerstudy.cli import app as reader_study_app

    app.add_typer(evaluate_app, name="evaluate")
    app.add_typer(reader_study_app, name="reader-study")


_add_subcommands()

if __name__ == "__main__":
    app()
