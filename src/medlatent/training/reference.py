"""The training configuration reference (``docs/training-config.md``), generated from the config dataclasses.

Every key's default and meaning come from the fields' help texts (:func:`medlatent.training.options.option`),
and what it accepts from its annotation, the rule pydantic checks (:func:`medlatent.training.options.describe`);
the run folder's files and ``log.csv`` columns are described here, next to the code that writes them.
``medlatent train --reference`` prints the document; a test checks the committed copy is up to date.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from medlatent.training.config import TrainConfig
from medlatent.training.options import describe, help_of
from medlatent.training.validation import PROTOCOL

#: what each ``log.csv`` column holds (a column appears once some step produced it)
LOG_COLUMNS = {
    "step": "optimiser step of the row (1-based; one row every `train.log_every` steps, and at the last step)",
    "epoch": "passes over the training images completed before this step",
    "seconds": "training seconds since the run started, continued across resumes",
    "lr": "learning rate (warm-up, then `optim.schedule`), mean over the interval",
    "total": "the loss the autoencoder minimises: nll + kl_weight × kl + d_weight × g (+ clip term)",
    "nll": "reconstruction negative log-likelihood: sum of `rec` per pixel / exp(logvar) + logvar, per image",
    "rec": "mean per-pixel |x − x̂| + perceptual_weight × perceptual, in model units ([-1, 1] images)",
    "perceptual": "the perceptual term per image (LPIPS or 1 − MS-SSIM; 0 with `loss.perceptual: none`)",
    "kl": "KL divergence of the posterior from N(0, I), summed over the latent, per image",
    "g": "generator's adversarial loss (−mean discriminator logit of reconstructions); 0 before `loss.disc_start`",
    "d_weight": "adaptive (or fixed) weight of `g`; 0 before `loss.disc_start`",
    "logvar": "the log-variance that scales the reconstruction loss (trained with `loss.learn_logvar`)",
    "clip": "stage 2: BiomedCLIP embedding distance; stage 1 with `loss.clip_weight` > 0: the consistency term",
    "disc": "discriminator hinge loss (from `loss.disc_start` on)",
    "logits_real": "mean discriminator logit of the training images",
    "logits_fake": "mean discriminator logit of their reconstructions",
}

VAL_KEYS = {
    "step": "the step validated (every `train.val_every` steps and at the last step)",
    "val_psnr": "mean PSNR (dB) over the validation images",
    "val_ms_ssim": "mean MS-SSIM (images too small for two scales left out)",
    "val_images": "validation images used (at most `train.val_max_images`)",
}

RUN_FILES = {
    "config.yaml": "the resolved configuration of the run",
    "log.csv": "training values, one row per `train.log_every` steps, each the mean over those steps "
               "(columns below; LF line endings)",
    "val.jsonl": "one JSON line per validation (keys below)",
    "val_split.txt": "how the validation images were chosen, then their paths",
    "previews/step_*.png": "validation images: input | reconstruction | 4 × |difference|, one row per image",
    "curves.png": "training loss and validation PSNR against the step (needs matplotlib; skipped with a "
                  "warning otherwise)",
    "tensorboard/": "TensorBoard event files with `train.log_with: [tensorboard]` "
                    "(`tensorboard --logdir RUN_DIR/tensorboard`)",
    "checkpoints/step_*/": "resumable checkpoints: weights, optimisers, EMA, counters, RNG states; the newest "
                           "`train.keep_checkpoints` are kept; each also loads as a model folder",
    "final/": "the trained model (`config.json` with its name + `model.safetensors`): `--model RUN_DIR/final`",
}

_SECTION_TITLES = {
    "model": "the network and its starting weights",
    "data": "training and validation images",
    "loss": "stage-1 objective",
    "optim": "optimiser",
    "train": "the loop, checkpoints and logging",
}


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def config_reference() -> str:
    """The Markdown reference of every training option, the run folder and its logs."""
    lines = [
        "# Training configuration reference",
        "",
        "<!-- Generated by `medlatent train --reference` from src/medlatent/training/ (the config dataclasses'",
        "     help texts and annotations, and training/reference.py); tests/test_training_journey.py checks it is",
        "     up to date. -->",
        "",
        "A run is one YAML file (or a preset: `medlatent train --presets`) plus `section.key=value` overrides on "
        "the command line, e.g. `medlatent train my.yaml train.max_steps=500 data.val=none`. "
        "`medlatent train CONFIG --show` prints the resolved configuration. A preset may carry a top-level "
        "`description`.",
        "",
    ]
    for section in dataclasses.fields(TrainConfig):
        cls = type(section.default_factory())  # type: ignore[misc]
        lines += [f"## `{section.name}` — {_SECTION_TITLES[section.name]}", ""]
        hints = typing.get_type_hints(cls, include_extras=True)
        rows = [(f"`{section.name}.{f.name}`", _default(f), describe(hints[f.name]), help_of(f))
                for f in dataclasses.fields(cls)]
        lines += _table(("key", "default", "accepts", "meaning"), rows) + [""]
    lines += ["## The run folder (`train.output_dir`)", ""]
    lines += _table(("file", "what it holds"), [(f"`{k}`", v) for k, v in RUN_FILES.items()]) + [""]
    lines += ["### `log.csv` columns", "",
              "Each row averages the values of the steps since the previous row (a term that is off in some of "
              "them, such as `disc` before `loss.disc_start`, over the steps that had it).", ""]
    lines += _table(("column", "meaning"), [(f"`{k}`", v) for k, v in LOG_COLUMNS.items()]) + [""]
    lines += ["### `val.jsonl` keys", "",
              f"Validation protocol: {PROTOCOL} (details: `medlatent/training/validation.py`). "
              "In a 2D run, a 3D validation file is measured on its middle axial slice.", ""]
    lines += _table(("key", "meaning"), [(f"`{k}`", v) for k, v in VAL_KEYS.items()]) + [""]
    lines += ["## Interrupting and resuming", "",
              "SIGINT (Ctrl-C) or SIGTERM finishes the current step, saves a checkpoint and exits with 130 or 143, "
              "printing where it saved; a second signal stops at once. Running the same command again resumes "
              "from the newest checkpoint (`train.resume: auto`) and takes the same steps an uninterrupted run "
              "would.", ""]
    return "\n".join(lines)
