"""``medlatent evaluate recon`` and ``medlatent evaluate storage``: thin commands over
:mod:`medlatent.evaluation.recon` and :mod:`medlatent.evaluation.storage`.

Wire them into a typer app with :func:`register` (``register(evaluate_app)``); heavy imports happen inside the
commands. Failed inputs are listed with their reasons, recorded in ``manifest.jsonl``, and make the exit code 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medlatent.console import fail
from medlatent.registry import DEFAULT_MODEL


def _report_failures(failures: list[tuple[str, str]], out: Path) -> None:
    if failures:
        typer.secho(f"{len(failures)} input(s) failed (see {out / 'manifest.jsonl'}):", err=True,
                    fg=typer.colors.RED)
        for item, why in failures:
            typer.echo(f"  {item}: {why}", err=True)
        raise typer.Exit(code=1)


def _progress(res) -> None:
    """One line per image on stderr: failures with their reason as they happen."""
    if res.status == "failed":
        typer.secho(f"failed  {res.item} — {res.reason}", err=True, fg=typer.colors.RED)
    else:
        typer.echo(f"{res.status:<7} {res.item} ({res.seconds:.1f} s)", err=True)


def _model_config(model: str, checkpoint: Optional[Path]):
    """The architecture of ``model`` without loading weights when the registry or a config.json says it."""
    import json

    from medlatent.model.config import MedVAEConfig
    from medlatent.registry import get_model_info

    p = Path(model)
    if checkpoint is None and p.is_dir() and (p / "config.json").is_file():
        try:
            return MedVAEConfig.from_dict(json.loads((p / "config.json").read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"{p / 'config.json'}: not a medlatent model config ({e})")
    if checkpoint is None and not p.exists():
        try:
            return get_model_info(model).config
        except KeyError as e:
            fail(e.args[0])
    from medlatent.runs import ModelLoadError, load_model

    try:
        return load_model(model, checkpoint).config
    except ModelLoadError as e:
        fail(str(e))


def _parse_list(text: Optional[str]) -> Optional[tuple[str, ...]]:
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _parse_factors(text: str) -> tuple[float, ...]:
    """``--interp-f 4,16`` → ``(4.0, 16.0)``; each a number > 1."""
    try:
        factors = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"--interp-f takes comma-separated numbers such as 4,16; got {text!r}")
    bad = [f for f in factors if not f > 1 or f != f or f == float("inf")]
    if bad:
        fail(f"--interp-f factors must be numbers > 1 (f = pixels per stored value); got {bad[0]:g}")
    return factors


def _parse_percentiles(text: Optional[str]) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        fail(f"--mri-percentiles must look like 0.5,99.5, got {text!r}")
    return lo, hi


MODEL_OPT = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Registry name or model directory.")
CHECKPOINT_OPT = typer.Option(None, "--checkpoint", "-c", help="Official checkpoint file.")
UNEVEN_OPT = typer.Option("refuse", help="DICOM series with uneven slices: refuse or resample.")


def register(app: typer.Typer) -> None:
    """Add the ``recon`` and ``storage`` commands to ``app``."""

    @app.command("recon")
    def recon(
        inputs: list[Path] = typer.Argument(..., help="Image files, folders and/or CSVs (path[,modality])."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for results.csv, summary.json, report.md."),
        model: Optional[list[str]] = typer.Option(
            None, "--model", "-m", help=f"Registry name or model folder (e.g. a run's final/); repeat to compare "
                                        f"several in one report (default: {DEFAULT_MODEL})."),
        checkpoint: Optional[Path] = CHECKPOINT_OPT,
        baselines: Optional[str] = typer.Option(
            None, "--baselines", help="Comma-separated interpolation baselines, or 'none' (default: all; 2D "
                                      "nearest,bilinear,bicubic; 3D nearest,trilinear,area,slice-bicubic)."),
        equal_values: bool = typer.Option(
            True, "--equal-values/--no-equal-values", help="For each model with C > 1, an interpolation row at "
                                                           "f/C: as many values stored as the latent."),
        interp_f: str = typer.Option("", "--interp-f", help="Extra interpolation rows at these factors f, e.g. "
                                                            "4,16 (any number > 1)."),
        interp: Optional[str] = typer.Option(None, "--interp", help="Interpolation of the equal-values and "
                                                                   "--interp-f rows (default: bicubic 2D, area 3D)."),
        natural: Optional[list[Path]] = typer.Option(
            None, "--natural", help="Local diffusers AutoencoderKL/VQModel folder or KL-VAE checkpoint file (LDM "
                                    ".ckpt) to compare (repeatable)."),
        model2d: Optional[str] = typer.Option(
            None, "--stitched-2d", "--model2d", help="3D only: a 2D model applied slice by slice, its latents "
                                                     "stitched to the 3D latent size (the paper's 2D rows)."),
        samples: int = typer.Option(0, "--samples", min=0, help="Images drawn per seed (0: as many as inputs)."),
        seeds: int = typer.Option(3, "--seeds", min=1, help="Number of random draws (seeds 0..K-1)."),
        replace: Optional[bool] = typer.Option(
            None, "--replace/--no-replace", help="Draw with replacement (default: only when samples ≥ inputs)."),
        roi: Optional[Path] = typer.Option(None, "--roi", help="CSV path,x0,y0,x1,y1[,z0,z1] for ROI PSNR."),
        modality: str = typer.Option("auto", help="ct, mri, xray, other, or auto (a CSV modality column wins)."),
        mri_percentiles: Optional[str] = typer.Option(None, help="Clip MRI to these percentiles, e.g. 0.5,99.5."),
        latent_dtype: str = typer.Option("float16", help="Round z through float16 (as stored) or float32."),
        figures: int = typer.Option(2, "--figures", min=0, help="Example figures (original | recon | residual)."),
        title: Optional[str] = typer.Option(None, "--title", help="Report title."),
        device: str = typer.Option("cpu", "--device", "-d"),
        precision: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
        tile: Optional[int] = typer.Option(None, "--tile", help="Tile edge for large images (default: automatic)."),
        max_memory: Optional[float] = typer.Option(None, "--max-memory", help="Activation memory budget in GB."),
        uneven: str = UNEVEN_OPT,
    ) -> None:
        """Reconstruction quality (PSNR, MS-SSIM, ROI PSNR) of one or more models against baselines at the same f
        and at equal values stored, paper-style mean ± sd."""
        from medlatent.engine.tiled import TileSettings
        from medlatent.evaluation.baselines import BaselineError, NaturalModelError, natural_image_autoencoder
        from medlatent.evaluation.recon import (
            EvaluationInputError,
            ReconOptions,
            evaluate_reconstruction,
            format_seed_stat,
            format_values_stored,
            natural_spec,
            slicewise_spec,
        )
        from medlatent.runs import ModelLoadError, load_model

        if latent_dtype not in ("float16", "float32"):
            fail(f"--latent-dtype must be float16 or float32, got {latent_dtype!r}")
        names = model or [DEFAULT_MODEL]
        if checkpoint is not None and len(names) > 1:
            fail("--checkpoint goes with a single --model; give each further model as a folder or checkpoint path")
        nets = []
        for name in names:
            try:
                nets.append(load_model(name, checkpoint).to(device).eval())
            except ModelLoadError as e:
                fail(str(e))
        if len({n.spatial_dims for n in nets}) > 1:
            fail("the --model list mixes 2D and 3D models; compare one dimensionality per run")
        extra = {}
        for folder in natural or []:
            try:
                ae = natural_image_autoencoder(folder, device=device)
            except NaturalModelError as e:
                fail(str(e))
            extra[f"{ae.family}:{folder.name}"] = natural_spec(ae)
        if model2d is not None:
            if nets[0].spatial_dims != 3:
                fail("--stitched-2d compares a 2D model slice by slice with a 3D --model; this model is 2D")
            try:
                net2 = load_model(model2d, None).to(device).eval()
            except ModelLoadError as e:
                fail(str(e))
            if net2.spatial_dims != 2:
                fail(f"--stitched-2d {model2d!r} is a {net2.spatial_dims}D model; give a 2D one")
            label = f"2D:{net2.weights_info.get('model') or model2d} slice-wise"
            reductions = {n.downsample_per_axis: n for n in nets}
            for n3 in reductions.values():
                extra[label + (f" (f={n3.f})" if len(reductions) > 1 else "")] = slicewise_spec(net2, n3)
        opts = ReconOptions(baselines=_parse_list(baselines), modality=modality,
                            mri_percentiles=_parse_percentiles(mri_percentiles), latent_dtype=latent_dtype,
                            precision=precision, tiles=TileSettings(tile=tile, max_memory_gb=max_memory),
                            samples=samples, seeds=seeds, replace=replace, roi_csv=roi, figures=figures,
                            title=title, uneven=uneven, equal_values=equal_values,
                            interp_f=_parse_factors(interp_f), interp=interp)
        try:
            res = evaluate_reconstruction(inputs, nets, output, opts, extra_methods=extra, progress=_progress)
        except (EvaluationInputError, BaselineError, ValueError) as e:
            fail(str(e))
        k = len(res.summary["protocol"]["seeds"])
        for name, m in res.summary["methods"].items():
            typer.echo(f"{name:>28}  values {format_values_stored(m['values_stored']):>7}   "
                       f"PSNR {format_seed_stat(m['psnr'], k, 2):>16} dB   "
                       f"MS-SSIM {format_seed_stat(m['ms_ssim'], k, 4):>16}"
                       + (f"   ROI PSNR {format_seed_stat(m['roi_psnr'], k, 2)} dB" if "roi_psnr" in m else ""))
        for m in res.summary["models"]:
            typer.echo(f"model {m['name']}: weights SHA-256 {m['weights_sha256'][:12]}")
        for w in res.summary["warnings"]:
            typer.secho(f"warning: {w}", err=True, fg=typer.colors.YELLOW)
        typer.echo(f"report: {res.files['report']}")
        _report_failures(res.failures, output)

    @app.command("storage")
    def storage(
        inputs: list[Path] = typer.Argument(..., help="Image files, folders and/or CSVs."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for storage.csv, storage.json, report.md."),
        model: str = MODEL_OPT,
        checkpoint: Optional[Path] = CHECKPOINT_OPT,
        compress: bool = typer.Option(True, "--compress/--no-compress", help="Measure zlib-compressed raw size."),
        uneven: str = UNEVEN_OPT,
    ) -> None:
        """Storage per image: raw, file and losslessly compressed bytes against the latent in float16/float32."""
        from medlatent.evaluation.recon import EvaluationInputError
        from medlatent.evaluation.storage import storage_report

        cfg = _model_config(model, checkpoint)
        try:
            res = storage_report(inputs, output, spatial_dims=cfg.spatial_dims, downsample=cfg.downsample_per_axis,
                                 C=cfg.embed_dim, model_name=Path(model).name if Path(model).exists() else model,
                                 compress=compress, uneven=uneven)
        except EvaluationInputError as e:
            fail(str(e))
        t = res.totals
        if t:
            typer.echo(f"{t['images']} image(s): {t['elements']} values, raw {t['raw_bytes']} B → latent "
                       f"{t['latent_elements']} values, {t['latent_f16_bytes']} B float16 "
                       f"(values ÷{t['element_ratio']:.1f}, raw bytes ÷{t['raw_to_f16']:.1f})")
        typer.echo(f"report: {res.files['report']}")
        _report_failures(res.failures, output)
