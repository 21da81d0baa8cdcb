"""The training configuration's sections are converted and checked by pydantic, from their annotations: every
error names its key, YAML's loose values become the typed ones, and ImageDataset cuts samples by a DataConfig."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import torch
from annotated_types import Ge, Interval

from io_fixtures import copy_to, sample_file
from medlatent.training.config import ConfigError, from_dict, load_config, preset_names
from medlatent.training.data import DataConfig, DataError, ImageDataset, build_datasets
from medlatent.training.options import describe


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=0", "train.max_steps must be an integer > 0, got 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be an integer ≥ 0, got -1"),
    ("train.mixed_precision=fp8", "train.mixed_precision must be one of no, bf16, fp16, got 'fp8'"),
    ("train.ema_decay=1", "train.ema_decay must be a number in (0, 1) or null, got 1"),
    ("train.log_with=[tensorboard, visdom]", "train.log_with has an unknown tracker 'visdom'"),
    ("optim.base_lr=0", "optim.base_lr must be a number > 0, got 0"),
    ("optim.betas=[0.5]", "optim.betas must be a list of 2 numbers, got [0.5]"),
    ("optim.schedule=step", "optim.schedule must be one of constant, cosine, got 'step'"),
    ("model.lora_rank=-1", "model.lora_rank must be an integer ≥ 0, got -1"),
    ("model.arch=[1]", "model.arch must be a mapping, got [1]"),
    ("data.size=1", "data.size must be an integer ≥ 2, got 1"),
    ("data.spatial_dims=4", "data.spatial_dims must be one of 2, 3, got 4"),
    ("data.val_fraction=1", "data.val_fraction must be a number in [0, 1), got 1"),
    ("data.crop_side=[0.8, 0.5]", "data.crop_side must satisfy 0 < low ≤ high ≤ 1"),
    ("loss.kl_weight=heavy", "loss.kl_weight must be a number, got 'heavy'"),
    ("loss.learn_logvar=perhaps", "loss.learn_logvar must be true or false, got 'perhaps'"),
])
def test_errors_name_the_key_the_rule_and_the_value(override: str, message: str):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=x", override])
    assert message in str(e.value)
    with pytest.raises(ConfigError):  # checked when the section is built, so --show refuses it too
        load_config(None, [override], check=False)


def test_yaml_values_become_the_typed_ones():
    cfg = load_config(None, ["data.train=x", "optim.base_lr=3e-4", "loss.kl_weight=1e-6", "optim.betas=[0, 1]",
                             "data.mri_percentiles=[1, 99]", "train.output_dir=2024", "train.log_with=tensorboard",
                             "data.val=false", "train.max_steps=12.0"])
    assert cfg.optim.base_lr == 3e-4 and cfg.loss.kl_weight == 1e-6  # YAML 1.1 reads both as text
    assert cfg.optim.betas == (0.0, 1.0) and cfg.data.mri_percentiles == (1.0, 99.0)
    assert cfg.train.output_dir == "2024" and cfg.train.log_with == ["tensorboard"]
    assert cfg.data.val is None and cfg.train.max_steps == 12 and isinstance(cfg.train.max_steps, int)
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        load_config(None, ["data.train=x", "train.max_steps=12.5"])


def test_show_needs_no_data_but_a_run_does():
    assert load_config(None, [], check=False).data.train == ""
    with pytest.raises(ConfigError, match="data.train is not set"):
        load_config(None, [])
    with pytest.raises(ConfigError, match=r"data must be a mapping"):
        from_dict({"data": "x"})


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_survives_its_own_yaml(name: str):
    cfg = load_config(name, ["data.train=x"])
    assert from_dict(cfg.to_dict()) == cfg  # the conversion is idempotent: --show output loads as the same run


def test_dataconfig_checks_itself_when_built_directly():
    data = DataConfig(train=Path("imgs"), crop_side=[0.25, 0.75], val="None")
    assert data.train == "imgs" and data.crop_side == (0.25, 0.75) and data.val is None
    with pytest.raises(DataError, match=r"data.invert must be a number in \[0, 1\], got 2"):
        DataConfig(train="x", invert=2)
    with pytest.raises(DataError, match=r"data.num_workers must be an integer ≥ 0"):
        DataConfig(train="x", num_workers=-1)
    with pytest.raises(DataError, match=r"unknown key 'flip' \(did you mean 'flips'\?\)"):
        DataConfig.from_dict({"train": "x", "flip": True})


def test_image_dataset_cuts_samples_by_a_dataconfig(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    copy_to(images, sample_file("CT_small.dcm"), "ct.dcm")
    data = DataConfig(train=str(images), size=32, mode="random_resized_crop", invert=0.5, val="none")
    entries = [(images / "ct.dcm", "auto")]
    by_config = ImageDataset(entries, data)
    by_keywords = ImageDataset(entries, size=32, mode="random_resized_crop", invert=0.5)
    for key in ((0, 1), (0, 2), (0, 3)):
        torch.testing.assert_close(by_config[key]["image"], by_keywords[key]["image"])
    # keywords override the config's fields (checked like any DataConfig); the config itself is not changed
    assert ImageDataset(entries, data, size=16)[(0, 1)]["image"].shape == (1, 16, 16) and data.size == 32
    with pytest.raises(DataError, match="data.size must be an integer ≥ 2"):
        ImageDataset(entries, data, size=0)
    train, val = build_datasets(data, downsample=4)
    assert train.data is data and val is None


def test_describe_reads_the_annotation():
    assert describe(Annotated[int, Ge(1)] | None) == "an integer ≥ 1 or null"
    assert describe(Annotated[float, Interval(gt=0, le=1)]) == "a number in (0, 1]"
    assert describe(tuple[float, float]) == "a list of 2 numbers"
    assert describe(bool) == "true or false"


def test_configuration_fields_stay_plain_dataclasses():
    # the reference (docs/training-config.md) reads the fields' defaults and help texts
    assert all(f.metadata.get("help") for f in dataclasses.fields(DataConfig))


def test_core_imports_no_pydantic_and_no_training_config():
    code = ("import sys, medlatent, medlatent.runs, medlatent.checkpoints, medlatent.cli\n"
            "from medlatent.model import MedVAE\n"
            "from medlatent.registry import DEFAULT_MODEL\n"
            "MedVAE.from_pretrained(DEFAULT_MODEL)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('pydantic', 'medlatent.training'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
