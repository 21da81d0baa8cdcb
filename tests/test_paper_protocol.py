"""The paper's protocols by default (issue #17): stage-1 presets, LoRA with the quant convs, the alternating
GAN schedule, the CAD protocol (kept epoch, classifier initialisation, sampling, sizes), stitched 2D latents for
volumes and per-slice bicubic rows. Tiny models and few steps throughout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from medlatent.training.config import load_config, preset_names
from medlatent.training.losses import LossConfig

TINY = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 1, "embed_dim": 1}


# ------------------------------------------------------------------------------------------ training presets
def _preset(name: str):
    return load_config(name, ["data.train=/nowhere"])


def test_stage1_presets_carry_the_papers_values():
    two_d = [n for n in preset_names() if n.startswith("medvae_") and n.endswith("_2d-stage1")]
    assert {"medvae_4_1_2d-stage1", "medvae_8_1_2d-stage1", "medvae_4_4_2d-stage1", "medvae_4_3_2d-stage1",
            "medvae_8_4_2d-stage1"} <= set(two_d)
    for name in two_d:
        cfg = _preset(name)
        assert cfg.loss.clip_weight == 100.0, name  # BiomedCLIP for all four 2D base models (paper §3)
        assert cfg.loss.disc_schedule == "alternate", name  # the official loop
        assert (cfg.loss.kl_weight, cfg.loss.disc_start) == (1e-6, 3125), name
        if cfg.model.lora_rank:
            assert cfg.model.lora_rank == 4 and cfg.model.lora_train_quant, name
    for name in [n for n in preset_names() if n.startswith("medvae_") and "_3d-" in n]:
        assert _preset(name).loss.disc_schedule == "alternate", name
    # outside the presets: no download needed, both optimisers every batch (documented as medlatent's choice)
    assert LossConfig().clip_weight == 0.0 and LossConfig().disc_schedule == "every_batch"


def test_unknown_disc_schedule_is_refused_by_name():
    from medlatent.training.config import ConfigError

    with pytest.raises(ConfigError, match="disc_schedule must be one of alternate, every_batch"):
        load_config("medvae_4_1_2d-stage1", ["data.train=/nowhere", "loss.disc_schedule=sometimes"])
    with pytest.raises(ConfigError, match="lora_train_quant must be true or false"):
        load_config("medvae_4_3_2d-stage1", ["data.train=/nowhere", "model.lora_train_quant=maybe"])


def _tiny_cfg(tmp_path: Path, source: Path, **sections):
    raw = {
        "model": {"name": "medvae_4_1_2d", "arch": dict(TINY), "init": "random"},
        "data": {"train": str(source), "val": None, "size": 32, "num_workers": 0, "mode": "random_crop"},
        "loss": {"perceptual": "none", "disc_start": 0, "disc_layers": 1},
        "optim": {"base_lr": 2e-3, "scale_lr": False},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 2, "log_every": 1,
                  "val_every": 1000, "ckpt_every": 1000, "seed": 0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return load_config(str(tmp_path / "cfg.yaml"))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    import shutil

    from io_fixtures import sample_file

    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(sample_file("CT_small.dcm"), root / "ct.dcm")
    shutil.copy(sample_file("MR_small.dcm"), root / "mr.dcm")
    return root


@pytest.mark.parametrize("train_quant", [True, False])
def test_lora_trains_the_quant_convs_unless_frozen(tmp_path: Path, images: Path, train_quant: bool):
    from medlatent.training.build import build_model

    cfg = _tiny_cfg(tmp_path, images, model={"lora_rank": 2, "lora_train_quant": train_quant},
                    loss={"adaptive_disc_weight": False})
    model, params = build_model(cfg)
    ids = {id(p) for p in params}
    quant = [*model.quant_conv.parameters(), *model.post_quant_conv.parameters()]
    assert all((id(p) in ids) == train_quant and p.requires_grad == train_quant for p in quant)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n in trained if ".lora_" in n or "quant_conv" in n}
    assert any(".lora_" in n for n in trained)


def _state(module: torch.nn.Module, params_only: bool = False) -> dict[str, torch.Tensor]:
    items = module.named_parameters() if params_only else module.state_dict().items()
    return {k: v.detach().clone() for k, v in items}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_alternate_schedule_steps_one_optimiser_per_step_and_resumes_exactly(tmp_path: Path, images: Path):
    pytest.importorskip("accelerate")
    from medlatent.training.trainer import Trainer

    common = dict(loss={"disc_schedule": "alternate"}, train={"max_steps": 4, "ckpt_every": 2})
    straight = Trainer(_tiny_cfg(tmp_path / "a", images, **common))
    # the discriminator's weights (its BatchNorm statistics move with every pass through it, as in the official code)
    history = [(_state(straight.model), _state(straight.disc, params_only=True))]
    for k in range(1, 5):
        straight.fit(max_steps=k)
        history.append((_state(straight.model), _state(straight.disc, params_only=True)))
    for k in range(4):  # step k: the autoencoder on even k, the discriminator on odd k
        (m0, d0), (m1, d1) = history[k], history[k + 1]
        assert _same(m0, m1) == (k % 2 == 1) and _same(d0, d1) == (k % 2 == 0), k

    first = Trainer(_tiny_cfg(tmp_path / "b", images, **common))
    first.fit(max_steps=3)  # the last checkpoint is step 2: a run killed during step 3
    del first
    import shutil

    shutil.rmtree(tmp_path / "b" / "run" / "checkpoints" / "step_0000003", ignore_errors=True)
    resumed = Trainer(_tiny_cfg(tmp_path / "b", images, **common))
    assert resumed.progress.step == 2
    resumed.fit()
    assert _same(_state(straight.model), _state(resumed.model))
    assert _same(_state(straight.disc), _state(resumed.disc))
