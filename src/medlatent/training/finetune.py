"""``medlatent finetune MODEL DATA -o RUN_DIR``: the training config that fine-tunes a trained model.

MODEL is a registry name (the bundled default model, or an official member whose released weights are in the
Hugging Face cache or downloadable) or a trained model on disk (a folder such as a run's ``final/``, or a
checkpoint file). The recipe is the preset of the member with that architecture — the bundled model's preset
for the bundled model and for architectures without a preset — with the starting weights set to MODEL, a short
learning-rate warm-up, and the run's name taken from ``RUN_DIR`` (``--name`` to choose it).
"""

from __future__ import annotations

import json
from pathlib import Path

from medlatent.model import MedVAEConfig
from medlatent.registry import DEFAULT_MODEL, get_model_info, list_models
from medlatent.training.config import ConfigError, TrainConfig, load_config, preset_names

DEFAULT_STEPS = 2000
#: warm-up steps: a tenth of the run, at most this many (Adam's first steps would disturb the starting point)
MAX_WARMUP = 100


def _member_with(config: MedVAEConfig) -> str | None:
    """The registry member with exactly this architecture, if any (the bundled model first)."""
    members = [DEFAULT_MODEL, *(n for n in list_models() if n != DEFAULT_MODEL)]
    return next((n for n in members if get_model_info(n).config == config), None)


def _architecture_on_disk(path: Path) -> MedVAEConfig:
    """The architecture of a model folder (its ``config.json``) or checkpoint file (read and inferred)."""
    from medlatent.checkpoints import CONFIG_FILE, CheckpointError, load_pretrained

    if path.is_dir():
        cfg_file = path / CONFIG_FILE
        try:
            return MedVAEConfig.from_dict(json.loads(cfg_file.read_text())["config"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: not a medlatent model folder ({cfg_file.name}: {e}); give a folder "
                              "written by `medlatent train`/`finetune` (RUN_DIR/final) or `medlatent convert`, a "
                              "checkpoint file, or a name from `medlatent models`") from e
    try:
        return load_pretrained(path).config
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: cannot read it as a model checkpoint: {e}") from e


def _q(value: str | Path) -> str:
    """A value for a ``section.key=value`` override that YAML reads back as this exact string."""
    return json.dumps(str(value))


def _preset_for(member: str | None) -> str:
    preset = f"{member}-stage1"
    return preset if member and preset in preset_names() else f"{DEFAULT_MODEL}-stage1"


def finetune_config(model: str, data: str | Path, output_dir: str | Path, *, steps: int | None = None,
                    name: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                    check: bool = True) -> TrainConfig:
    """The resolved configuration of ``medlatent finetune`` (``overrides`` are applied last).

    Raises:
        ConfigError: an unknown model name, an unreadable model folder/file, or a bad override.
    """
    path = Path(model)
    if path.exists():
        arch = _architecture_on_disk(path)
        member = _member_with(arch)
        start = [f"model.init={_q(path)}"]
        start += [f"model.name={member}", "model.arch={}"] if member else \
            ["model.name=null", f"model.arch={json.dumps(arch.to_dict())}"]
    else:
        try:
            arch = get_model_info(model).config
        except KeyError as e:
            raise ConfigError(f"MODEL {e.args[0]} (nor is {model!r} an existing folder or file)") from None
        member, start = model, [f"model.name={model}", "model.init=pretrained"]
    steps = DEFAULT_STEPS if steps is None else steps
    if steps < 1:
        raise ConfigError(f"--steps must be ≥ 1, got {steps}")
    preset = _preset_for(member)
    base = [*start, f"data.train={_q(data)}", f"train.output_dir={_q(output_dir)}", f"train.max_steps={steps}",
            "train.max_minutes=null", f"optim.warmup_steps={min(MAX_WARMUP, steps // 10)}"]
    if name:
        base.append(f"model.export_name={_q(name)}")
    if preset.startswith(DEFAULT_MODEL) and member != DEFAULT_MODEL:  # the recipe, for another architecture
        base += [f"data.spatial_dims={arch.spatial_dims}", f"data.in_channels={arch.in_channels}"]
    return load_config(preset, [*base, *overrides], check=check)
