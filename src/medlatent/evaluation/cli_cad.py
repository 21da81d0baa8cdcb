"""CLI commands of the CAD evaluation: ``cad``, ``finefeature`` and ``efficiency``.

:func:`register` adds them to a Typer app (``medlatent evaluate cad|finefeature|efficiency``). A thin layer over
:mod:`~medlatent.evaluation.cad`, :mod:`~medlatent.evaluation.finefeature` and
:mod:`~medlatent.evaluation.efficiency`; heavy imports happen inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medlatent.console import fail

MODEL_OPT = typer.Option(None, "--model", "-m", help="MedVAE registry name, model folder or checkpoint; repeat for "
                                                     "several (e.g. f=16 and f=64).")
RANDOM_OPT = typer.Option(False, "--random-weights", help="Build the models from the registry without weights "
                                                          "(smoke tests).")
CLASSIFIER_OPT = typer.Option(None, "--classifier", help="hrnet_w64, seresnet152 or tiny (default: the paper's: "
                                                         "HRNet-w64 in 2D, SEResNet-152 in 3D).")
EPOCHS_OPT = typer.Option(100, "--epochs", min=1, help="Training epochs (paper: 100).")
BATCH_OPT = typer.Option(32, "--batch-size", min=1)
LR_OPT = typer.Option(1e-4, "--lr", help="AdamW learning rate (paper: 1e-4).")
WD_OPT = typer.Option(1e-2, "--weight-decay", help="AdamW weight decay.")
SEEDS_OPT = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds; one classifier per seed.")
SELECT_OPT = typer.Option("last", "--select", help="last: test the final epoch (the paper's rule); best: keep the "
                                                   "epoch of the best validation AUROC (needs a val split).")
BALANCED_OPT = typer.Option(None, "--balanced/--no-balanced", help="Class-weighted sampling (default: the paper's: "
                                                                   "on for 3D tasks, off for 2D ones).")
CAD_BATCH_OPT = typer.Option(None, "--batch-size", min=1, help="Classifier batch (default: the paper's: 256 in 2D; "
                                                               "3D 20 for latents, 10 for images).")
INTERP_OPT = typer.Option("bicubic", "--interp", help="Interpolation baseline: nearest, bilinear, bicubic, area.")
INTERP_F_OPT = typer.Option(
    "", "--interp-f", help="Extra interpolation rows at these factors f, e.g. 16,64 (2D) — no model needed.")


def _factors(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"--interp-f takes comma-separated integers such as 16,64; got {text!r}")
        return []
DEVICE_OPT = typer.Option("cpu", "--device", "-d")
LATENT_CHANNELS_OPT = typer.Option("mean", "--latent-channels", help="Latents with C > 1: 'mean' (one input channel, "
                                                                     "the paper's App. B.1) or 'all' (C channels).")
CACHE_OPT = typer.Option(None, "--cache", help="Folder of prepared inputs and latents, reused across runs "
                                               "(default: OUTPUT/cache).")


def _report(result, output: Path) -> None:
    """Write the CAD tables to ``output`` and print the Markdown table, the warnings and the files written."""
    from medlatent.evaluation.cad import write_cad_table

    paths = write_cad_table(result, output)
    typer.echo(paths["markdown"].read_text(encoding="utf-8"))
    _warn(result)
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


def _warn(result) -> None:
    """The report's warnings, on the console too (stderr), so nobody reads a meaningless AUROC unwarned."""
    from medlatent.evaluation.cad import cad_warnings

    for w in cad_warnings(result):
        typer.secho(f"warning: {w}", err=True, fg=typer.colors.YELLOW)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        fail(f"--seeds must be comma-separated integers, got {text!r}")
    if not seeds:
        fail("--seeds is empty")
    return seeds


def _size(text: str) -> int | tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        fail(f"--size must be N or HxW or DxHxW, got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def _models(names: Optional[list[str]], random_weights: bool, device: str) -> dict[str, object]:
    from medlatent.runs import ModelLoadError, load_model

    out = {}
    for name in names or []:
        try:
            model = load_model(name, None, random_weights=random_weights)
        except ModelLoadError as e:
            fail(str(e))
        label = model.weights_info.get("model") or Path(name).name
        out[label if label not in out else name] = model.to(device).eval()
    return out


def _naturals(folders: Optional[list[Path]], device: str) -> dict[str, object]:
    from medlatent.evaluation.baselines import NaturalModelError, natural_image_autoencoder

    out = {}
    for folder in folders or []:
        try:
            out[folder.name if folder.name not in out else str(folder)] = natural_image_autoencoder(folder, device)
        except NaturalModelError as e:
            fail(str(e))
    return out


def register(app: typer.Typer) -> None:
    """Add the ``cad``, ``cad-latents``, ``finefeature`` and ``efficiency`` commands to ``app``."""

    @app.command("cad")
    def cad(
        csv_path: Path = typer.Argument(..., help="CSV with columns path,label,split[,patient]."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for cad.md / cad.csv / cad.json."),
        model: Optional[list[str]] = MODEL_OPT,
        random_weights: bool = RANDOM_OPT,
        method: Optional[list[str]] = typer.Option(None, "--method", help="image, latent, interp; repeat "
                                                   "(default: all three with --model, else image)."),
        classifier: Optional[str] = CLASSIFIER_OPT,
        size: Optional[str] = typer.Option(
            None, "--size", "-s", help="High-resolution input size: N, HxW or DxHxW (default: the paper's: 1024x512 "
                                       "in 2D, 224x224x160 in 3D)."),
        epochs: int = EPOCHS_OPT,
        batch_size: Optional[int] = CAD_BATCH_OPT,
        lr: float = LR_OPT,
        weight_decay: float = WD_OPT,
        seeds: str = SEEDS_OPT,
        select: str = SELECT_OPT,
        balanced: Optional[bool] = BALANCED_OPT,
        interp: str = INTERP_OPT,
        modality: str = typer.Option("auto", help="ct, mri, xray, other or auto."),
        device: str = DEVICE_OPT,
        pretrained: bool = typer.Option(False, "--pretrained", help="ImageNet weights for hrnet_w64, as the paper "
                                                                    "(from the Hugging Face cache, or downloaded); "
                                                                    "without it the classifier trains from scratch."),
        pretrained_weights: Optional[Path] = typer.Option(
            None, "--pretrained-weights", help="Local file of those weights (timm/hrnet_w64.ms_in1k "
                                               "model.safetensors); implies --pretrained."),
        latent_channels: str = LATENT_CHANNELS_OPT,
        cache: Optional[Path] = CACHE_OPT,
        task: Optional[str] = typer.Option(None, "--task", help="Task name in the table (default: CSV name)."),
        stitched_2d: Optional[list[str]] = typer.Option(
            None, "--stitched-2d", help="3D tasks: a 2D model (name, folder or checkpoint) whose slice latents are "
                                        "stitched to the 3D latent size, as the paper's 2D rows; repeatable."),
        natural: Optional[list[Path]] = typer.Option(
            None, "--natural", help="Local diffusers AutoencoderKL/VQModel folder or KL-VAE checkpoint file (LDM "
                                    ".ckpt): its latents as a KL-VAE/VQ-GAN row (stitched across slices in 3D); "
                                    "repeatable."),
    ) -> None:
        """Train a classifier on images, MedVAE latents and interpolated images; report test AUROC (Table 1)."""
        from medlatent.evaluation.cad import CADConfig, CADDataError, default_methods, run_cad

        models = _models(model, random_weights, device)
        two_d = _models(stitched_2d, random_weights, device)
        flat = [n for n, m in two_d.items() if m.spatial_dims != 2]
        if flat:
            fail(f"--stitched-2d {flat[0]} is a 3D model; give a 2D one (its slice latents are stitched)")
        naturals = _naturals(natural, device)
        try:
            weights = str(pretrained_weights) if pretrained_weights else None
            config = CADConfig(classifier=classifier, size=_size(size) if size else None, epochs=epochs,
                               batch_size=batch_size, lr=lr, weight_decay=weight_decay, seeds=_seeds(seeds),
                               balanced=balanced, select=select,
                               modality=modality, device=device, pretrained=pretrained or weights is not None,
                               pretrained_weights=weights)
            kinds = method or (["image", "latent", "interp"] if models or two_d or naturals else ["image"])
            methods = default_methods(models or None, kinds=kinds, interp=interp, latent_channels=latent_channels,
                                      stitched=two_d, natural=naturals)
            result = run_cad(csv_path, methods, config=config, cache_dir=cache or output / "cache", task=task)
        except (CADDataError, ValueError, ImportError) as e:
            fail(str(e))
        _report(result, output)

    @app.command("cad-latents")
    def cad_latents(
        latents: list[Path] = typer.Argument(..., help="A latent store and/or folders of latent files."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for cad.md / cad.csv / cad.json."),
        labels: Optional[Path] = typer.Option(None, "--labels", help="CSV with a name (or path) column and label, "
                                                                     "split[, patient] (default: the store's)."),
        classifier: Optional[str] = CLASSIFIER_OPT,
        epochs: int = EPOCHS_OPT,
        batch_size: Optional[int] = CAD_BATCH_OPT,
        lr: float = LR_OPT,
        weight_decay: float = WD_OPT,
        seeds: str = SEEDS_OPT,
        select: str = SELECT_OPT,
        balanced: Optional[bool] = BALANCED_OPT,
        device: str = DEVICE_OPT,
        tensor: str = typer.Option("z", "--tensor", help="z, or stage2 (2D latents encoded with stage-2 features)."),
        latent_channels: str = LATENT_CHANNELS_OPT,
        task: Optional[str] = typer.Option(None, "--task", help="Task name in the table."),
    ) -> None:
        """Train a classifier on latents already encoded (a store from encode --store or pack, or latent files);
        report test AUROC. Labels: label, split and optionally patient per latent.

        Example: medlatent cad-latents latents.store -o cad-out --seeds 0,1,2
        """
        from medlatent.evaluation.cad import CADConfig, CADDataError
        from medlatent.evaluation.cad_latents import run_cad_latents

        try:
            config = CADConfig(classifier=classifier, epochs=epochs, batch_size=batch_size, lr=lr,
                               weight_decay=weight_decay, seeds=_seeds(seeds), balanced=balanced, select=select,
                               device=device)
            result = run_cad_latents(latents, labels, config=config, task=task, tensor=tensor,
                                     latent_channels=latent_channels)
        except (CADDataError, ValueError, ImportError) as e:
            fail(str(e))
        _report(result, output)

    @app.command("finefeature")
    def finefeature(
        sources: list[Path] = typer.Argument(..., help="Real images/volumes (files or folders) to cut patches from."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for data/ and finefeature.md/csv/json."),
        model: Optional[list[str]] = MODEL_OPT,
        random_weights: bool = RANDOM_OPT,
        dims: int = typer.Option(2, "--dims", help="2: image patches (volumes give slices); 3: sub-volumes."),
        patch_size: int = typer.Option(64, "--patch-size", min=4),
        n: int = typer.Option(200, "--n", min=6, help="Number of patches (half get a finding)."),
        finding: str = typer.Option("calcification", "--finding", help="calcification, nodule or mixed."),
        contrast: float = typer.Option(0.1, "--contrast", help="Peak intensity added, fraction of the patch range."),
        finding_size: float = typer.Option(2.0, "--finding-size", help="Nodule σ / cluster radius in pixels."),
        cluster_count: int = typer.Option(5, "--cluster-count", min=1, help="Bright pixels per calcification cluster."),
        seed: int = typer.Option(0, "--seed", help="Seed of the generated task."),
        classifier: Optional[str] = CLASSIFIER_OPT,
        epochs: int = EPOCHS_OPT,
        batch_size: int = BATCH_OPT,
        lr: float = LR_OPT,
        weight_decay: float = WD_OPT,
        seeds: str = SEEDS_OPT,
        select: str = SELECT_OPT,
        interp: str = INTERP_OPT,
        interp_f: str = INTERP_F_OPT,
        latent_channels: str = LATENT_CHANNELS_OPT,
        device: str = DEVICE_OPT,
        cache: Optional[Path] = CACHE_OPT,
    ) -> None:
        """Generate a fine-feature detection task from real images and compare image / latent / interpolation."""
        from medlatent.evaluation.cad import CADConfig, CADDataError
        from medlatent.evaluation.finefeature import FineFeatureSpec, run_finefeature

        models = _models(model, random_weights, device)
        try:
            spec = FineFeatureSpec(spatial_dims=dims, patch_size=patch_size, n_patches=n, finding=finding,
                                   contrast=contrast, size=finding_size, cluster_count=cluster_count, seed=seed)
            config = CADConfig(classifier=classifier, size=patch_size, epochs=epochs, batch_size=batch_size, lr=lr,
                               weight_decay=weight_decay, seeds=_seeds(seeds), select=select, device=device)
            factors = _factors(interp_f)
            kinds = ("image", "latent", "interp") if models else (("image", "interp") if factors else ("image",))
            res = run_finefeature(sources, output, models or None, spec=spec, config=config, kinds=kinds,
                                  interp=interp, interp_f=factors, cache_dir=cache or output / "cache",
                                  latent_channels=latent_channels)
        except (CADDataError, ValueError, ImportError) as e:
            fail(str(e))
        typer.echo(res.files["markdown"].read_text(encoding="utf-8"))
        _warn(res.cad)
        typer.echo(f"wrote {res.dataset.csv_path} and {', '.join(str(p) for p in res.files.values())}")

    @app.command("efficiency")
    def efficiency(
        output: Path = typer.Option(..., "--output", "-o", help="Folder for efficiency.md/csv/json."),
        classifier: Optional[str] = CLASSIFIER_OPT,
        dims: int = typer.Option(2, "--dims", help="2 or 3."),
        size: Optional[int] = typer.Option(None, "--size", "-s", help="Image size per axis (paper: 1024 2D, 256 3D)."),
        factor: Optional[list[int]] = typer.Option(None, "--factor", "-f", help="Latent downsizing factor f; repeat "
                                                   "(paper: 16 and 64 in 2D, 64 and 512 in 3D)."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Batch of the latency measurement."),
        repeats: int = typer.Option(5, "--repeats", min=3),
        warmup: int = typer.Option(2, "--warmup", min=0),
        limit: int = typer.Option(1024, "--limit", min=1, help="Largest batch size the search tries."),
        max_memory: Optional[float] = typer.Option(None, "--max-memory", help="Memory cap in GB (default: CPU half "
                                                   "of the free memory; CUDA the real OOM)."),
        backward: bool = typer.Option(False, "--backward", help="Measure training steps (forward + backward)."),
        device: str = DEVICE_OPT,
    ) -> None:
        """Latency, throughput and maximum batch size of a classifier on images vs latents (Figure 2)."""
        from medlatent.evaluation.classifiers import PAPER_CLASSIFIER
        from medlatent.evaluation.efficiency import compare_efficiency, write_efficiency

        if dims not in (2, 3):
            fail(f"--dims must be 2 or 3, got {dims}")
        name = classifier or PAPER_CLASSIFIER[dims]
        try:
            rows = compare_efficiency(name, dims, size, factor or None, batch_size=batch_size, device=device,
                                      repeats=repeats, warmup=warmup, limit=limit, max_memory_gb=max_memory,
                                      backward=backward)
        except (ValueError, ImportError) as e:
            fail(str(e))
        meta = {"classifier": name, "spatial_dims": dims, "device": device, "backward": backward,
                "repeats": repeats, "warmup": warmup, "limit": limit, "max_memory_gb": max_memory}
        paths = write_efficiency(rows, output, meta=meta)
        typer.echo(paths["markdown"].read_text(encoding="utf-8"))
        typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")
