"""`model.init: codec`: the network starts as the fitted interpolation codec, exactly, and every weight can learn."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from io_fixtures import sample_file
from medlatent import MedVAE
from medlatent.training.codec_init import LinearPath, fit_linear_path, init_as_codec


def real_image(size: int = 32) -> torch.Tensor:
    """The CT test slice, min-max scaled to [-1, 1], its top-left ``size``² block as ``1×1×S×S``."""
    import pydicom

    a = torch.from_numpy(pydicom.dcmread(sample_file("CT_small.dcm")).pixel_array.astype("float32"))
    a = (a - a.min()) / (a.max() - a.min()) * 2 - 1
    return a[:size, :size][None, None].contiguous()


def perturbed_path(d: int, levels: int, maps: int = 3, latent: int = 3, seed: int = 0) -> LinearPath:
    g = torch.Generator().manual_seed(seed)
    path = LinearPath.interpolation(d, levels, maps, latent)
    for k in path.parameters():
        k.add_(0.05 * torch.randn(k.shape, generator=g))
    return path


@pytest.mark.parametrize("d", [2, 3])
def test_network_runs_the_linear_path_exactly(d: int):
    torch.manual_seed(0)
    model = MedVAE(tiny_config(d, norm_groups=8, z_channels=3, embed_dim=3, stage2_head=False)).eval()
    path = perturbed_path(d, levels=1)
    init_as_codec(model, path)
    x = real_image(32)
    if d == 3:  # a volume: the slice stacked with shifted copies of itself
        x = torch.stack([x.roll(i, -1) for i in range(16)], -1)[..., :16, :16, :]
    with torch.no_grad():
        post = model.encode(x)
        z = post.mean
        # z is the linear path's latent (three distinct maps), the decoder's output is its decode
        assert (z - path.encode(x)).abs().max() < 2e-4
        assert (model.decode(z) - path.decode(path.encode(x))).abs().max() < 2e-4
        assert (z[:, 1:] - z[:, :1]).abs().mean() > 1e-3
        assert torch.allclose(post.logvar, torch.full_like(post.logvar, -14.0))


def test_every_weight_learns_within_a_few_steps():
    """Residual branches start at zero, so the first step reaches only their last convs and the weights that
    read into the image pair; three steps must reach every parameter (no dead part of the network)."""
    torch.manual_seed(0)
    model = MedVAE(tiny_config(2, norm_groups=8, z_channels=3, embed_dim=3, stage2_head=False)).train()
    init_as_codec(model, perturbed_path(2, 1))
    x = torch.cat([real_image(32), -real_image(32).flip(-1)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    touched = {n: False for n, _ in model.named_parameters()}
    for _ in range(3):
        out = model(x, sample=True)
        loss = F.l1_loss(out.reconstruction, x) + 1e-6 * out.posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            touched[n] |= bool(p.grad is not None and p.grad.abs().sum() > 0)
        opt.step()
    assert [n for n, t in touched.items() if not t] == []


def test_fit_beats_its_interpolation_start_and_needs_wide_enough_groups():
    x = real_image(64)
    flips = [x, x.flip(-1), x.flip(-2), -x]

    def batches():
        while True:
            yield torch.cat(flips)

    start = LinearPath.interpolation(2, 1, maps=2, latent=2)
    before = F.mse_loss(start.decode(start.encode(x)), x).item()
    path = fit_linear_path(batches(), 2, 1, maps=2, latent=2, steps=60)
    after = F.mse_loss(path.decode(path.encode(x)), x).item()
    assert after < 0.8 * before
    assert path.history[-1] < path.history[0]
    with pytest.raises(ValueError, match="channels per GroupNorm group"):
        # 32 groups of one channel: no room for the constants
        init_as_codec(MedVAE(tiny_config(2, z_channels=2, embed_dim=2)), path)


@pytest.mark.slow
def test_training_config_builds_a_codec_model(tmp_path: Path):
    pytest.importorskip("accelerate")
    from medlatent.training.build import build_model
    from medlatent.training.config import load_config

    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(sample_file("CT_small.dcm"), root / "ct.dcm")
    shutil.copy(sample_file("MR_small.dcm"), root / "mr.dcm")
    arch = "{ch: 32, ch_mult: [1, 2], num_res_blocks: 1, z_channels: 2, embed_dim: 2, norm_groups: 8}"
    cfg = load_config("medvae_4_1_2d-stage1", [f"data.train={root}", "data.size=32", "data.mode=random_crop",
                                               "model.init=codec", f"model.arch={arch}"])
    model, _ = build_model(cfg)
    assert model.weights_info["weights"] == "codec"
    with torch.no_grad():
        x = real_image(32)
        rec = model.decode(model.encode(x).mean)
    # before any training step the model already reconstructs like a (fitted) interpolation codec
    assert F.mse_loss(rec, x).item() < 0.5 * F.mse_loss(torch.zeros_like(x), x).item()


@pytest.mark.slow
def test_warmup_ramps_the_learning_rate_linearly(tmp_path: Path):
    pytest.importorskip("accelerate")
    import csv

    import yaml

    from medlatent.training.config import load_config
    from medlatent.training.trainer import Trainer

    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(sample_file("CT_small.dcm"), root / "ct.dcm")
    raw = {"model": {"name": "medvae_4_1_2d", "arch": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                                       "z_channels": 1, "embed_dim": 1}},
           "data": {"train": str(root), "size": 16, "mode": "random_crop"},
           "loss": {"perceptual": "none", "disc_start": 10**9},
           "optim": {"base_lr": 1e-3, "scale_lr": False, "warmup_steps": 4},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "batch_size": 1, "log_every": 1,
                     "ckpt_every": 1000}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    trainer = Trainer(load_config(str(tmp_path / "cfg.yaml")))
    trainer.fit()
    with (tmp_path / "run" / "log.csv").open() as fh:
        lrs = [float(r["lr"]) for r in csv.DictReader(fh)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert trainer.opt.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_max_tile_is_saved_loaded_and_caps_the_engines_tiles(tmp_path: Path):
    """A model trained on crops carries `max_tile` in config.json; the tiling engine keeps below it by itself."""
    from medlatent.checkpoints import CheckpointError
    from medlatent.engine.tiled import TiledAutoencoder

    model = MedVAE(tiny_config(2))
    assert TiledAutoencoder(model).tile_and_overlap("encode")[0] > 64
    model.max_tile = 64
    model.save_pretrained(tmp_path / "m")
    loaded = MedVAE.from_pretrained(tmp_path / "m")
    assert loaded.max_tile == 64
    assert TiledAutoencoder(loaded).tile_and_overlap("encode")[0] == 64
    assert TiledAutoencoder(loaded).tile_and_overlap("decode")[0] == 64
    cfg = (tmp_path / "m" / "config.json").read_text().replace('"max_tile": 64', '"max_tile": 63')
    (tmp_path / "m" / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="max_tile"):
        MedVAE.from_pretrained(tmp_path / "m")
