"""The learning-rate schedule (warm-up, cosine decay, resume) and a GAN that is off when switched off."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from io_fixtures import sample_file
from medlatent.training.config import ConfigError, load_config
from medlatent.training.losses import LossConfig, Stage1Loss
from medlatent.training.schedule import learning_rate

TINY = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 1, "embed_dim": 1}


# ------------------------------------------------------------------------------------------ schedule
def test_constant_schedule_is_the_warm_up_then_the_peak():
    lrs = [learning_rate(s, 1e-3, warmup_steps=4, max_steps=10) for s in range(1, 11)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3] + [1e-3] * 6)
    assert learning_rate(7, 2e-4) == 2e-4  # no warm-up


def test_cosine_schedule_values():
    peak = 1e-3
    lr = [learning_rate(s, peak, warmup_steps=2, schedule="cosine", max_steps=12, min_lr_ratio=0.1)
          for s in range(1, 16)]
    assert lr[:2] == pytest.approx([5e-4, 1e-3])  # warm-up unchanged; its last step is the peak
    # step 7 is half-way from step 2 to step 12: the mean of the peak and the floor
    assert lr[6] == pytest.approx(0.5 * (peak + 0.1 * peak))
    assert lr[4] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 10))))
    assert lr[11] == pytest.approx(0.1 * peak)  # train.max_steps reaches the floor
    assert lr[12:] == pytest.approx([0.1 * peak] * 3)  # and stays there past it
    assert all(a > b for a, b in zip(lr[1:11], lr[2:12]))  # strictly decreasing after the warm-up
    # no warm-up: step 1 already decays; min_lr_ratio 0 ends at zero
    assert learning_rate(10, peak, schedule="cosine", max_steps=10) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(1, peak, schedule="cosine", max_steps=10) < peak
    # a warm-up as long as the run leaves nothing to decay over
    assert learning_rate(5, peak, warmup_steps=5, schedule="cosine", max_steps=5) == pytest.approx(peak)
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(1, peak, schedule="linear")


def test_schedule_options_are_checked(tmp_path: Path):
    assert load_config(None, [f"data.train={tmp_path}"]).optim.schedule == "constant"
    cfg = load_config(None, [f"data.train={tmp_path}", "optim.schedule=cosine", "optim.min_lr_ratio=1e-1"])
    assert cfg.optim.min_lr_ratio == pytest.approx(0.1)  # YAML reads 1e-1 as a string; taken as the number
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(None, [f"data.train={tmp_path}", "optim.schedule=step"])
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        load_config(None, [f"data.train={tmp_path}", "optim.min_lr_ratio=1.5"])


# ------------------------------------------------------------------------------------------ GAN off
def test_disc_start_null_and_the_old_huge_value_mean_off(tmp_path: Path):
    assert LossConfig(disc_start=None).disc_start is None and not LossConfig(disc_start=None).adversarial
    assert LossConfig(disc_start=10**9).disc_start is None  # the old spelling
    assert LossConfig(disc_start=10**9 - 1).disc_start == 10**9 - 1 and LossConfig().adversarial
    with pytest.raises(ValueError, match="null"):
        LossConfig(disc_start=-1)
    crit = Stage1Loss(LossConfig(perceptual="none", disc_start=None), in_channels=1)
    assert crit.discriminator is None
    assert not any(k.startswith("discriminator.") for k in crit.state_dict())
    assert not crit.discriminator_active(10**12) and crit.trains_generator(1) and not crit.trains_discriminator(1)
    x = torch.zeros(1, 1, 8, 8)
    d_loss, logs = crit.discriminator_loss(x, x, step=5)
    assert d_loss.item() == 0.0 and logs == {"disc": 0.0}
    # every preset that had the GAN off still has it off, now spelled null
    for name in ("medlatent_small_4_1_2d-stage1", "medlatent_small_4_4_2d-stage1", "medlatent_small_4_1_3d-stage2_3d"):
        assert load_config(name, [f"data.train={tmp_path}"]).loss.disc_start is None, name


# ------------------------------------------------------------------------------------------ trainer
@pytest.fixture
def one_image(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(sample_file("CT_small.dcm"), root / "ct.dcm")
    return root


def _cfg(tmp_path: Path, source: Path, name: str, **sections):
    raw = {"model": {"name": "medvae_4_1_2d", "arch": dict(TINY)},
           "data": {"train": str(source), "size": 16, "mode": "random_crop", "num_workers": 0},
           "loss": {"perceptual": "none", "disc_start": None, "disc_layers": 1},
           "optim": {"base_lr": 1e-3, "scale_lr": False},
           "train": {"output_dir": str(tmp_path / name / "run"), "max_steps": 6, "batch_size": 1, "log_every": 1,
                     "ckpt_every": 3, "keep_checkpoints": 0, "seed": 0}}
    for section, values in sections.items():
        raw[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path))


def _lrs(run: Path) -> list[float]:
    with (run / "log.csv").open() as fh:
        return [float(r["lr"]) for r in csv.DictReader(fh)]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_cosine_lr_continues_across_a_resume(tmp_path: Path, one_image: Path):
    pytest.importorskip("accelerate")
    from medlatent.training.trainer import Trainer

    sched = {"warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.2}
    straight = Trainer(_cfg(tmp_path, one_image, "a", optim=sched))
    straight.fit()
    expected = [learning_rate(s, 1e-3, warmup_steps=2, schedule="cosine", max_steps=6, min_lr_ratio=0.2)
                for s in range(1, 7)]
    assert _lrs(tmp_path / "a" / "run") == pytest.approx(expected)

    first = Trainer(_cfg(tmp_path, one_image, "b", optim=sched))
    first.fit(max_steps=3)  # stops after the step-3 checkpoint
    del first
    resumed = Trainer(_cfg(tmp_path, one_image, "b", optim=sched))
    assert resumed.progress.step == 3
    resumed.fit()
    assert _lrs(tmp_path / "b" / "run") == pytest.approx(expected)
    assert resumed.opt.optimizer.param_groups[0]["lr"] == pytest.approx(expected[-1])
    a, b = _weights(straight.model), _weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gan_off_builds_and_saves_no_discriminator(tmp_path: Path, one_image: Path):
    pytest.importorskip("accelerate")
    from medlatent.training.trainer import Trainer

    off = Trainer(_cfg(tmp_path, one_image, "off", loss={"learn_logvar": True}))
    assert off.disc is None and off.opt_d is None and off.loss.discriminator is None
    off.fit()
    state = torch.load(tmp_path / "off" / "run" / "checkpoints" / "step_0000006" / "state.pt", weights_only=True)
    assert "opt_d" not in state
    assert list(state["loss"]) == ["logvar"]  # the learned log-variance is still saved
    assert state["config"]["loss"]["disc_start"] is None
    # a GAN that never starts within the run trains the autoencoder exactly as no GAN at all
    late = Trainer(_cfg(tmp_path, one_image, "late", loss={"learn_logvar": True, "disc_start": 100}))
    assert late.disc is not None and late.opt_d is not None
    late.fit()
    a, b = _weights(off.model), _weights(late.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(off.loss.logvar, late.loss.logvar)


def test_resume_across_gan_on_and_off(tmp_path: Path, one_image: Path, capsys):
    pytest.importorskip("accelerate")
    from medlatent.training.trainer import Trainer

    # written with a discriminator (GAN on from step 2), resumed with the GAN off: the critic is dropped, one note
    on = Trainer(_cfg(tmp_path, one_image, "x", loss={"disc_start": 2}, train={"max_steps": 3}))
    on.fit()
    assert "opt_d" in torch.load(tmp_path / "x" / "run" / "checkpoints" / "step_0000003" / "state.pt",
                                 weights_only=True)
    capsys.readouterr()
    off = Trainer(_cfg(tmp_path, one_image, "x", loss={"disc_start": None}))
    assert off.progress.step == 3 and off.disc is None
    out = capsys.readouterr().out
    assert "discriminator is not used" in out and "resumed from" in out
    off.fit()
    last = torch.load(tmp_path / "x" / "run" / "checkpoints" / "step_0000006" / "state.pt", weights_only=True)
    assert "opt_d" not in last and not any(k.startswith("discriminator.") for k in last["loss"])

    # written without one, resumed with the GAN on: the discriminator starts from its initial weights
    capsys.readouterr()
    on_again = Trainer(_cfg(tmp_path, one_image, "x", loss={"disc_start": 7}, train={"max_steps": 8}))
    assert on_again.progress.step == 6 and on_again.disc is not None
    assert "saved without a discriminator" in capsys.readouterr().out
    before = _weights(on_again.disc)
    on_again.fit()
    after = _weights(on_again.disc)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # step 8 trained it (GAN on from step 7)
