"""Training configuration: plain dataclasses, read from YAML, overridden by ``section.key=value`` pairs.

One file describes a run (``medlatent train CONFIG.yaml data.train=/my/csv train.max_steps=2000``). The
presets under ``medlatent/training/presets`` are complete, commented examples for every member and stage.

Each field's annotation is its rule, and pydantic checks every section when it is built
(:mod:`medlatent.training.options`); :meth:`TrainConfig.validate` adds only what spans sections or what a run
needs that ``--show`` does not (``data.train``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from annotated_types import Interval
from pydantic import AfterValidator, BeforeValidator, NonNegativeInt, PositiveFloat, PositiveInt

from medlatent.training.data_config import DataConfig, DataError
from medlatent.training.losses import LossConfig
from medlatent.training.options import ConfigError, check_fields, check_keys, option
from medlatent.training.schedule import SCHEDULES

#: model.inflate_resample values (see medlatent.training.build.inflate)
InflateResample = Literal["centre", "linear"]
INFLATE_RESAMPLE: tuple[str, ...] = get_args(InflateResample)
Stage = Literal["stage1", "stage2", "stage2_3d"]
STAGES: tuple[str, ...] = get_args(Stage)
Schedule = Literal[SCHEDULES]  # type: ignore[valid-type]  # the names medlatent.training.schedule implements
#: ``train.log_with`` values and the module each needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value  # train.log_with=tensorboard, without brackets


def _known_trackers(names: list[str]) -> list[str]:
    unknown = [x for x in names if x not in TRACKERS]
    if unknown:
        raise ValueError(f"has an unknown tracker {unknown[0]!r} (supported: {', '.join(TRACKERS)})")
    return names


@dataclass
class ModelSection:
    """Which network is trained, where its weights start, and the name it is exported under."""

    name: str | None = option(
        "medvae_4_1_2d", "Registry member whose architecture is used (`medlatent models`), or null with `arch`.")
    arch: dict[str, Any] = option(
        help="Architecture overrides on top of `name` (or a full MedVAEConfig dict when `name` is null), "
             "e.g. `{ch: 64}` for a narrower member.", factory=dict)
    init: str = option(
        "random", "Starting weights: `random`; `codec` (an interpolation codec fitted to the training images, which "
                  "training refines); `pretrained` (the released or bundled weights of `name`); a path to a "
                  "medlatent model folder (e.g. a run's `final/`) or a checkpoint file; or `natural:PATH`, a "
                  "natural-image KL-VAE (LDM or diffusers) adapted with LoRA.")
    lora_rank: NonNegativeInt = option(
        0, "> 0 trains only rank-r LoRA adapters on the ResnetBlock/attention convs (official: 4).")
    lora_train_quant: bool = option(
        True, "With LoRA (`lora_rank > 0` or `init: natural:PATH`), also train the 1×1 `quant_conv` and "
              "`post_quant_conv` in full, as the official fine-tuning does; false freezes them with the rest.")
    inflate_from: str | None = option(
        None, "stage2_3d only: the 2D model (name or path) whose kernels are inflated to 3D.")
    inflate_resample: InflateResample = option(
        "centre", "stage2_3d: how the 2D down/upsampling kernels are inflated. `centre`: in the centre slice, as "
                  "every other kernel (the paper; the new axis starts as keep-every-other-slice and repeat); "
                  "`linear`: spread along the new axis (the downsampling averages each pair of planes, the upsampling "
                  "interpolates linearly), so the new axis starts as a linear codec.")
    zero_init_residual: bool = option(
        False, "With `init: random`, start every ResnetBlock and attention block as the identity (last conv of each "
               "residual branch zeroed): faster convergence from scratch.")
    export_name: str | None = option(
        None, "Name of the trained model, written to `final/config.json` and shown in latent files and reports. "
              "null: the name of `train.output_dir`.")

    def __post_init__(self) -> None:
        check_fields(self, "model", ConfigError)


@dataclass
class OptimSection:
    """Adam settings. The official recipe scales ``base_lr`` by batch size × gradient accumulation."""

    base_lr: PositiveFloat = option(4.5e-6, "Learning rate per sample; multiplied by batch_size × grad_accum when "
                                            "`scale_lr` is true (the official rule).")
    scale_lr: bool = option(True, "Scale `base_lr` by batch_size × grad_accum.")
    betas: tuple[float, float] = option((0.5, 0.9), "Adam betas (official: [0.5, 0.9]).")
    warmup_steps: NonNegativeInt = option(
        0, "Linear learning-rate warm-up over the first steps (0: none, as the official recipe). Worth it when "
           "fine-tuning a good starting point: Adam's first steps move every weight by the full learning rate.")
    schedule: Schedule = option(
        "constant", "Learning rate after the warm-up: `constant`, or `cosine`, half a cosine from the peak at the "
                    "end of the warm-up to `min_lr_ratio` × the peak at `train.max_steps`.")
    min_lr_ratio: Annotated[float, Interval(ge=0.0, le=1.0)] = option(
        0.0, "`schedule: cosine`: the final learning rate as a fraction of the peak (0 decays to zero).")
    weight_decay: float = option(0.0, "Adam weight decay.")
    grad_clip: float | None = option(None, "Clip the gradient norm to this value (null: no clipping).")

    def __post_init__(self) -> None:
        check_fields(self, "optim", ConfigError)


@dataclass
class LoopSection:
    """The loop: stage, length, batch, precision, checkpoints and logging."""

    stage: Stage = option("stage1", "`stage1` (autoencoder), `stage2` (2D stage-2 head) or `stage2_3d` "
                                    "(3D autoencoder inflated from 2D).")
    output_dir: str = option("runs/medlatent", "Run folder: config, logs, checkpoints, previews and `final/`. "
                                               "Re-running with the same folder resumes.")
    max_steps: PositiveInt = option(10000, "Optimiser steps to train (a resumed run counts the steps already done).")
    max_minutes: float | None = option(
        None, "Wall-clock budget: the run ends at the first step past it, with a checkpoint and the export, as if "
              "`max_steps` had been reached (null: no budget).")
    batch_size: PositiveInt = option(4, "Samples per process per micro-batch; the effective batch is "
                                        "batch_size × grad_accum × processes.")
    grad_accum: PositiveInt = option(1, "Micro-batches per optimiser step.")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", "`no`, `bf16` or `fp16` (autocast).")
    seed: int = option(0, "Seed of the weights, data order, augmentation and the validation split.")
    sample_posterior: bool = option(True, "Decode a sample of the posterior during training (official); false "
                                          "decodes the mean.")
    ema_decay: Annotated[float, Interval(gt=0.0, lt=1.0)] | None = option(
        None, "Keep an exponential moving average of the weights with this decay (e.g. 0.999); validation and the "
              "export use it (null: off).")
    log_every: PositiveInt = option(20, "Write one `log.csv` row (and tracker values) every this many steps, each "
                                        "value averaged over those steps.")
    val_every: PositiveInt = option(500, "Validate every this many steps (and at the last step).")
    val_max_images: int = option(32, "Validate on at most this many validation images (whole images).")
    previews: int = option(4, "Validation images shown in `previews/step_*.png` (input | reconstruction | "
                              "4×difference).")
    ckpt_every: PositiveInt = option(500, "Save a checkpoint every this many steps (and at the last step, and "
                                          "on SIGINT/SIGTERM).")
    keep_checkpoints: NonNegativeInt = option(
        2, "Checkpoints kept in `checkpoints/` (the newest; each holds the model and the optimiser state). "
           "Raise it to keep more, 0 keeps all.")
    resume: str | None = option(
        "auto", "`auto`: continue from the newest checkpoint in `output_dir` if there is one; a checkpoint "
                "folder; or null to start over.")
    export_merged: bool = option(True, "Fold LoRA adapters into the convs of `final/` (false keeps them in the "
                                       "official adapter layout).")
    log_with: Annotated[list[str], BeforeValidator(_as_list), AfterValidator(_known_trackers)] = option(
        help="Experiment trackers besides `log.csv`: `tensorboard` (writes `tensorboard/` in the run folder; "
             "pip install 'medlatent[tensorboard]') and/or `wandb` (pip install wandb). A tracker that is not "
             "installed stops the run at its start.", factory=list)
    cpu: bool = option(False, "Train on the CPU even when a GPU is present.")

    def __post_init__(self) -> None:
        check_fields(self, "train", ConfigError)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(train=""))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: LoopSection = field(default_factory=LoopSection)

    def validate(self) -> "TrainConfig":
        """Check what a run needs beyond each section's own rules (checked when the sections were built)."""
        t, m = self.train, self.model
        if not self.data.train:
            raise ConfigError(
                "data.train is not set: give a folder of images or a CSV manifest (columns path[, split, modality]), "
                "e.g. `medlatent train CONFIG.yaml data.train=/data/train.csv`"
            )
        if t.stage == "stage2_3d" and not m.inflate_from and m.init == "random":
            raise ConfigError("stage2_3d needs model.inflate_from (the 2D stage-1 model to inflate) or model.init")
        if m.lora_rank and self.loss.adaptive_disc_weight and t.stage != "stage2":
            raise ConfigError("the adaptive GAN weight needs the decoder's last layer to train, which LoRA freezes; "
                              "set loss.adaptive_disc_weight=false (the official LoRA recipe: weight 1.0)")
        if m.init == "pretrained" and not m.name:
            raise ConfigError("model.init=pretrained needs model.name, the registry member whose weights to start "
                              "from (`medlatent models`); or give model.init=PATH to a model folder or checkpoint")
        return self

    def export_name(self) -> str:
        """The trained model's name: ``model.export_name``, else the name of the output folder."""
        return self.model.export_name or Path(self.train.output_dir).resolve().name

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check_trackers(names: list[str]) -> None:
    """Refuse ``train.log_with`` trackers whose package is not installed (accelerate would log nothing)."""
    import importlib.util

    for name in names:
        module = TRACKERS.get(name)
        if module is None:
            raise ConfigError(f"train.log_with: unknown tracker {name!r}; supported: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(module) is None:
            extra = "pip install 'medlatent[tensorboard]'" if name == "tensorboard" else f"pip install {module}"
            raise ConfigError(f"train.log_with={name}: the {module} package is not installed ({extra}); remove "
                              f"{name} from train.log_with to train with log.csv only")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


_SECTIONS = {"model": ModelSection, "data": DataConfig, "loss": LossConfig, "optim": OptimSection,
             "train": LoopSection}
#: fields without a default: empty until :meth:`TrainConfig.validate` requires them (``--show`` prints them so)
_UNSET = {"data": {"train": ""}}


def _section(cls: type, values: Any, where: str) -> Any:
    """One section from plain values: unknown keys refused; the section converts and checks its values itself
    (pydantic, in its ``__post_init__``), raising :class:`ConfigError` that names ``section.key``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys (e.g. {where}: {{...}}), got {values!r}")
    check_keys(cls, values, where, ConfigError)
    try:
        return cls(**{**_UNSET.get(where, {}), **values})
    except DataError as e:
        raise ConfigError(str(e)) from None  # names data.key already


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from nested plain values, each section checked (not :meth:`TrainConfig.validate`)."""
    d = dict(d or {})
    unknown = [k for k in d if k not in _SECTIONS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], _SECTIONS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown section {unknown[0]!r}{hint}; sections: {', '.join(_SECTIONS)}")
    return TrainConfig(**{name: _section(cls, d.get(name) or {}, name) for name, cls in _SECTIONS.items()})


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML: numbers, booleans, lists, null)."""
    d = {k: dict(v or {}) if isinstance(v, dict) else v for k, v in (d or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=500)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"override {item!r}: the key must include its section, e.g. data.{parts[0]}={raw}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        node = d.setdefault(parts[0], {})
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return d


def preset_descriptions() -> dict[str, str]:
    """Each bundled preset's one-line description (its ``description`` key)."""
    out = {}
    for name in preset_names():
        raw, _ = _read_yaml(name)
        out[name] = str(raw.get("description") or "")
    return out


def preset_names() -> list[str]:
    """Names of the bundled presets (``medvae_4_1_2d-stage1`` …)."""
    return sorted(p.name[:-5] for p in resources.files("medlatent.training.presets").iterdir()
                  if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> tuple[dict[str, Any], str]:
    path = Path(source)
    if path.is_file():
        text, where = path.read_text(), str(path)
    elif source in preset_names():
        text = resources.files("medlatent.training.presets").joinpath(f"{source}.yaml").read_text()
        where = f"preset {source}"
    else:
        close = difflib.get_close_matches(source, preset_names(), n=3, cutoff=0.4)
        hint = f" Closest presets: {', '.join(close)}." if close else ""
        raise ConfigError(f"{source}: no such file or preset.{hint} List presets with `medlatent train --presets`.")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a training config is a mapping of sections (model, data, loss, optim, train)")
    return raw, where


def load_config(source: str | None, overrides: list[str] | tuple[str, ...] = (), *, check: bool = True
                ) -> TrainConfig:
    """Read a YAML file or a bundled preset name, apply overrides, validate."""
    raw, where = _read_yaml(source) if source else ({}, "defaults")
    raw.pop("description", None)  # a preset's one-line summary (`medlatent train --presets`)
    try:
        cfg = from_dict(apply_overrides(raw, list(overrides)))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg.validate() if check else cfg
