"""Training configuration: plain dataclasses, read from YAML, overridden by ``section.key=value`` pairs.

One file describes a run (``medlatent train CONFIG.yaml data.train=/my/csv train.max_steps=2000``). The
presets under ``medlatent/training/presets`` are complete, commented examples for every member and stage.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medlatent.training.data import DataConfig
from medlatent.training.losses import LossConfig

STAGES = ("stage1", "stage2", "stage2_3d")


class ConfigError(ValueError):
    """A training configuration that cannot run; the message names the key and what to do."""


@dataclass
class ModelSection:
    """Which network is trained and where its weights start.

    Attributes:
        name: registry member whose architecture is used (``medlatent models``), or None with ``arch``.
        arch: architecture overrides on top of ``name`` (or a full ``MedVAEConfig`` dict when name is None),
            e.g. ``{ch: 64}`` for a small member.
        init: ``random``; ``codec`` (an interpolation codec fitted to the training images, which training then
            refines: :mod:`medlatent.training.codec_init`); ``pretrained`` (the member's released weights); a path
            to a medlatent directory or
            checkpoint; or ``natural:PATH`` — a natural-image KL-VAE (LDM or diffusers) to adapt with LoRA.
        lora_rank: >0 trains only rank-r LoRA adapters on the ResnetBlock/attention convs (official: 4).
        inflate_from: stage 2-3D only: the 2D model (name or path) whose kernels are inflated to 3D.
        zero_init_residual: with ``init: random``, start every ResnetBlock and attention block as the identity
            (last conv of each residual branch zeroed), which makes training from scratch converge faster.
    """

    name: str | None = "medvae_4_1_2d"
    arch: dict[str, Any] = field(default_factory=dict)
    init: str = "random"
    lora_rank: int = 0
    inflate_from: str | None = None
    zero_init_residual: bool = False


@dataclass
class OptimSection:
    """Adam settings. The official recipe scales ``base_lr`` by batch size × gradient accumulation."""

    base_lr: float = 4.5e-6
    scale_lr: bool = True
    betas: tuple[float, float] = (0.5, 0.9)
    #: linear learning-rate warm-up over the first steps (0: none, as the official recipe). Worth it when
    #: fine-tuning a good starting point: Adam's first steps move every weight by the full learning rate.
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = None


@dataclass
class LoopSection:
    """The loop: stage, length, batch, precision, checkpoints and logging.

    ``batch_size`` is per process; the effective batch is ``batch_size × grad_accum × processes``.
    ``max_minutes`` (optional) ends the run at the first step past a wall-clock budget, with a checkpoint
    and the export, as if ``max_steps`` had been reached.
    """

    stage: str = "stage1"
    output_dir: str = "runs/medlatent"
    max_steps: int = 10000
    max_minutes: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    sample_posterior: bool = True
    ema_decay: float | None = None
    log_every: int = 20
    val_every: int = 500
    val_max_images: int = 32
    previews: int = 4
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = "auto"
    export_merged: bool = True
    log_with: list[str] = field(default_factory=list)
    cpu: bool = False


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(train=""))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: LoopSection = field(default_factory=LoopSection)

    def validate(self) -> "TrainConfig":
        t = self.train
        if t.stage not in STAGES:
            raise ConfigError(f"train.stage must be one of {', '.join(STAGES)}, got {t.stage!r}")
        if not self.data.train:
            raise ConfigError(
                "data.train is not set: give a folder of images or a CSV manifest (columns path[, split, modality]), "
                "e.g. `medlatent train CONFIG.yaml data.train=/data/train.csv`"
            )
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "val_every", "ckpt_every"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be ≥ 1, got {getattr(t, key)}")
        if t.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16, got {t.mixed_precision!r}")
        if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1) or null, got {t.ema_decay}")
        if t.stage == "stage2_3d" and not self.model.inflate_from and self.model.init == "random":
            raise ConfigError("stage2_3d needs model.inflate_from (the 2D stage-1 model to inflate) or model.init")
        if self.model.lora_rank < 0:
            raise ConfigError(f"model.lora_rank must be ≥ 0, got {self.model.lora_rank}")
        if self.model.lora_rank and self.loss.adaptive_disc_weight and t.stage != "stage2":
            raise ConfigError("the adaptive GAN weight needs the decoder's last layer to train, which LoRA freezes; "
                              "set loss.adaptive_disc_weight=false (the official LoRA recipe: weight 1.0)")
        if self.optim.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be ≥ 0, got {self.optim.warmup_steps}")
        if self.optim.base_lr <= 0:
            raise ConfigError(f"optim.base_lr must be > 0, got {self.optim.base_lr}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


_SECTIONS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _as_float(v: Any, key: str) -> Any:
    """YAML 1.1 reads ``2e-4`` (no dot) as a string: accept it as the number it means."""
    if not isinstance(v, str):
        return v
    try:
        return float(v)
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {v!r}") from None


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, known, n=2)
        hint = f" (did you mean {' or '.join(f'{where}.{c}' for c in close)}?)" if close else ""
        raise ConfigError(f"unknown key {where}.{k}{hint}; known: {', '.join(known)}")
    kwargs = {}
    for k, v in values.items():
        kind = str(known[k].type)
        if kind.startswith("tuple[float") and v is not None and not isinstance(v, str):
            v = tuple(_as_float(x, f"{where}.{k}") for x in v)
        elif kind.startswith("float") and isinstance(v, str):
            v = _as_float(v, f"{where}.{k}")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from nested plain values."""
    d = dict(d or {})
    unknown = [k for k in d if k not in _SECTIONS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], _SECTIONS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown section {unknown[0]!r}{hint}; sections: {', '.join(_SECTIONS)}")
    defaults = TrainConfig().to_dict()
    sections = {}
    for name in _SECTIONS:
        merged = {**defaults[name], **(d.get(name) or {})}
        cls = {"model": ModelSection, "data": DataConfig, "loss": LossConfig,
               "optim": OptimSection, "train": LoopSection}[name]
        if name == "data" and not merged.get("train"):
            merged["train"] = ""
        sections[name] = _build(cls, merged, name)
    return TrainConfig(**sections)


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
        return yaml.safe_load(text) or {}, where
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from e


def load_config(source: str | None, overrides: list[str] | tuple[str, ...] = (), *, check: bool = True
                ) -> TrainConfig:
    """Read a YAML file or a bundled preset name, apply overrides, validate."""
    raw, where = _read_yaml(source) if source else ({}, "defaults")
    try:
        cfg = from_dict(apply_overrides(raw, list(overrides)))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg.validate() if check else cfg
