"""The training data split along its seams (config, sources, splits, crops, dataset, sampler, loaders) behind the
public medlatent.training.data; the loss section checked from its annotations like the others; the reference
naming each key's rule."""

from __future__ import annotations

import importlib
import inspect
from typing import Annotated

import numpy as np
import pytest
import torch
from annotated_types import Ge, MinLen
from pydantic import FiniteFloat

from io_fixtures import sample_file
from medlatent.training import data
from medlatent.training.config import ConfigError, from_dict, load_config
from medlatent.training.losses import LossConfig
from medlatent.training.options import describe

MODULES = ("data_config", "sources", "splits", "crops", "dataset", "sampler", "loaders")


# every public name the single data.py had
OLD_NAMES = ("MODES", "MODALITIES", "SPLITS", "RESIZED_CROP_SIDE", "SLICE_TRIES", "SLICE_MIN_STD", "DEFAULT_ITEM_SEED",
             "Mode", "Modality", "DataError", "normalise_val", "DataConfig", "Entry", "is_manifest", "read_source",
             "manifest_has_split", "pad_to", "crop_starts", "crop", "resize2d", "pick_slice", "ImageDataset",
             "EpochSampler", "hold_out", "split_sources", "build_datasets", "make_loader")


def test_the_public_entry_re_exports_every_name_from_its_one_job_module():
    homes = [importlib.import_module(f"medlatent.training.{m}") for m in MODULES]
    assert set(OLD_NAMES) <= set(data.__all__)
    for name in data.__all__:
        value = getattr(data, name)
        assert any(vars(mod).get(name) is value for mod in homes), name
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__ in {mod.__name__ for mod in homes}, name


def test_a_dataset_sample_is_cut_sample_of_the_whole_image_with_the_keys_rng():
    ct = sample_file("CT_small.dcm")
    ds = data.ImageDataset([(ct, "auto")], size=32, mode="random_resized_crop", invert=0.5)
    for seed in (1, 2, 3):
        expected = data.cut_sample(ds.array(0), ds.data, np.random.default_rng([0, seed]))
        torch.testing.assert_close(ds[(0, seed)]["image"], torch.from_numpy(np.ascontiguousarray(expected)))
    val = data.ImageDataset([(ct, "auto")], size=32, train=False)
    torch.testing.assert_close(val[0]["image"], torch.from_numpy(data.cut_sample(val.array(0), val.data, None)))


@pytest.mark.parametrize("override, message", [
    ("loss.kl_weight=-1", "loss.kl_weight must be a finite number ≥ 0, got -1"),
    ("loss.clip_weight=.inf", "loss.clip_weight must be a finite number ≥ 0, got inf"),
    ("loss.disc_start=-3", "loss.disc_start must be an integer ≥ 0 or null, got -3"),
    ("loss.disc_start=1.5", "loss.disc_start must be an integer or null, got 1.5"),
    ("loss.disc_layers=0", "loss.disc_layers must be an integer ≥ 1, got 0"),
    ("loss.perceptual=vgg", "loss.perceptual must be one of lpips, ms_ssim, none, got 'vgg'"),
    ("loss.clip_model=''", "loss.clip_model must be non-empty text, got ''"),
    ("loss.lpips_weights=''", "loss.lpips_weights must be non-empty text or null, got ''"),
    ("train.max_steps=many", "train.max_steps must be an integer, got 'many'"),  # the wrong kind: the type alone
])
def test_loss_errors_name_the_key_once_and_the_rule(override: str, message: str):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=x", override])
    assert str(e.value) == f"defaults: {message}"


def test_loss_section_converts_yaml_values_and_raises_the_config_error_itself():
    cfg = load_config(None, ["data.train=x", "loss.disc_weight=1", "loss.disc_start=1.0e+9", "loss.kl_weight=1e-6"])
    assert cfg.loss.disc_weight == 1.0 and isinstance(cfg.loss.disc_weight, float)
    assert cfg.loss.disc_start is None and cfg.loss.kl_weight == 1e-6  # 1e9 still means GAN off
    with pytest.raises(ConfigError, match=r"^loss\.disc_weight must be a finite number ≥ 0, got nan$"):
        LossConfig(disc_weight=float("nan"))
    with pytest.raises(ConfigError, match=r"^loss\.kl_weight must be"):  # not "loss: loss.kl_weight"
        from_dict({"loss": {"kl_weight": -1}})


def test_describe_says_finite_and_non_empty_and_the_type_alone_on_request():
    assert describe(Annotated[FiniteFloat, Ge(0)]) == "a finite number ≥ 0"
    assert describe(Annotated[str, MinLen(1)] | None) == "non-empty text or null"
    assert describe(Annotated[int, Ge(0)] | None, bounds=False) == "an integer or null"


def test_the_reference_names_each_keys_rule():
    from medlatent.training.reference import config_reference

    doc = config_reference()
    assert "| key | default | accepts | meaning |" in doc
    assert "| `train.max_steps` | `10000` | an integer > 0 |" in doc
    assert "| `loss.kl_weight` | `1e-06` | a finite number ≥ 0 |" in doc
    assert "| `loss.disc_start` | `3125` | an integer ≥ 0 or null |" in doc
