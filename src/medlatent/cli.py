"""Command-line interface: ``medlatent --help``. A thin layer over the library; heavy imports inside commands."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MedVAE medical-image autoencoders.")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


def _load(model: str, checkpoint: Optional[Path], random_weights: bool = False):
    from medlatent import MedVAE
    from medlatent.checkpoints import CheckpointError
    from medlatent.hub import ConfigMismatchError, WeightsNotFoundError

    try:
        if random_weights:
            return MedVAE.from_config(model).eval()
        return MedVAE.from_pretrained(model, checkpoint=checkpoint)
    except (KeyError, FileNotFoundError, CheckpointError, ConfigMismatchError, WeightsNotFoundError) as e:
        _fail(e.args[0] if isinstance(e, KeyError) else str(e))


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


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
        cached = try_to_load_from_cache(info.repo_id, info.hub_checkpoint) if try_to_load_from_cache else None
        table.add_row(name, f"{info.spatial_dims}D", str(info.f), str(info.C), f"{shape} ×{info.C}",
                      "yes" if isinstance(cached, str) else "no", info.description)
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
    typer.echo(f"wrote {output} (f={net.f}, C={net.C}, {net.spatial_dims}D, source sha256 {net.weights_info['sha256'][:12]})")


@app.command()
def profile(
    model: str = typer.Argument("medvae_4_1_2d", help="Registry name, model directory or checkpoint file."),
    size: str = typer.Option("512x512", "--size", "-s", help="Input spatial size: HxW (2D) or XxYxZ (3D)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Official checkpoint file."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Skip weights: build from the registry."),
    batch: int = typer.Option(1, "--batch", "-b", min=1),
    device: str = typer.Option("cpu", "--device", "-d"),
) -> None:
    """Encode and decode one random batch: latent shape, time and peak memory for your image size."""
    import resource
    import time

    import torch

    try:
        dims = [int(n) for n in size.lower().split("x")]
    except ValueError:
        _fail(f"--size must look like 512x512 or 128x128x128, got {size!r}")
    net = _load(model, checkpoint, random_weights).to(device)
    if len(dims) != net.spatial_dims:
        _fail(f"--size needs {net.spatial_dims} numbers for this {net.spatial_dims}D model, got {size!r}")
    x = torch.rand(batch, net.config.in_channels, *dims, device=device) * 2 - 1
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            z = net.encode(x).mean
            t1 = time.perf_counter()
            y = net.decode(z)
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

