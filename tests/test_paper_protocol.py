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
    from io_fixtures import training_images

    return training_images(tmp_path / "images", volume=False)


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


# ------------------------------------------------------------------------------------------ CAD protocol
def _cad_task(folder: Path, dims: int, n: int = 24, size: int = 16) -> Path:
    """``n`` real patches (CT_small in 2D, anatomical.nii in 3D) whose last-axis upper half is white (label 1)
    or black (label 0); half train, a sixth val, the rest test."""
    import numpy as np

    from io_fixtures import nibabel_data, sample_file, write_task_image
    from medlatent.evaluation.finefeature import crop, source_planes, unit

    folder.mkdir(parents=True, exist_ok=True)
    planes = source_planes(sample_file("CT_small.dcm") if dims == 2 else nibabel_data("anatomical.nii"), dims)
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for i in range(n):
        plane = planes[i % len(planes)]
        p = unit(crop(plane, [int(rng.integers(0, s - size + 1)) for s in plane.shape], size))
        p[..., size // 2:] = float(i % 2)
        split = "train" if i < n // 2 else "val" if i < n // 2 + n // 6 else "test"
        name = write_task_image(folder, str(i), p, dims)
        rows.append(f"{name},{i % 2},{split}")
    (folder / "task.csv").write_text("\n".join(rows) + "\n")
    return folder / "task.csv"


def _tiny_vae(dims: int, seed: int = 0):
    from conftest import randomise, tiny_config
    from medlatent import MedVAE

    return randomise(MedVAE(tiny_config(dims)), seed).eval()


@pytest.fixture
def cad_app():
    import typer

    from medlatent.evaluation.cli_cad import register

    app = typer.Typer()
    register(app)
    return app


def _invoke(app, args: list[str]):
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, args)
    return res


def test_cad_defaults_are_the_papers():
    from medlatent.evaluation.cad import CADConfig

    cfg = CADConfig()
    assert cfg.select == "last" and cfg.epochs == 100 and cfg.lr == 1e-4
    assert cfg.size_for(2) == (1024, 512) and cfg.size_for(3) == (224, 224, 160)
    assert cfg.batch_size_for(2, "latent") == cfg.batch_size_for(2, "image") == 256
    assert (cfg.batch_size_for(3, "latent"), cfg.batch_size_for(3, "stitched"), cfg.batch_size_for(3, "image")) == (
        20, 20, 10)
    assert not cfg.balanced_for(2) and cfg.balanced_for(3)  # weighted sampling only on the 3D tasks
    assert cfg.initialisation == "from scratch"
    assert CADConfig(pretrained=True, pretrained_weights="/w/hrnet.safetensors").initialisation == (
        "ImageNet-pretrained (/w/hrnet.safetensors)")
    chosen = CADConfig(size=64, batch_size=8, balanced=True, select="best")  # medlatent's choices stay options
    assert chosen.size_for(2) == (64, 64) and chosen.batch_size_for(3, "image") == 8 and chosen.balanced_for(2)


def test_cad_run_records_the_epoch_and_the_initialisation(tmp_path: Path, cad_app):
    import json

    pytest.importorskip("torchmetrics")
    csv_path = _cad_task(tmp_path / "data", 2)
    common = ["--classifier", "tiny", "--size", "16", "--epochs", "3", "--seeds", "0", "--batch-size", "4"]
    out = tmp_path / "last"
    res = _invoke(cad_app, ["cad", str(csv_path), "-o", str(out), *common])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "cad.json").read_text())[0]
    assert doc["epoch_selection"] == "last" and doc["classifier_init"] == "from scratch"
    assert doc["config"]["balanced"] is False and doc["rows"][0]["batch_size"] == 4
    assert [r["epoch"] for r in doc["rows"][0]["runs"]] == [2]  # 0-based: the third and last epoch
    assert "tested the last epoch (3 of 3, the paper's rule)" in (out / "report.md").read_text()
    assert "from scratch; uniform sampling" in (out / "cad.md").read_text()

    best = tmp_path / "best"
    res = _invoke(cad_app, ["cad", str(csv_path), "-o", str(best), *common, "--select", "best", "--balanced"])
    assert res.exit_code == 0, res.output
    doc = json.loads((best / "cad.json").read_text())[0]
    run = doc["rows"][0]["runs"][0]
    assert doc["epoch_selection"] == "best" and run["val_auroc"] is not None and doc["config"]["balanced"] is True
    assert f"epochs {run['epoch'] + 1} of 3" in (best / "cad.md").read_text()

    res = _invoke(cad_app, ["cad", str(csv_path), "-o", str(tmp_path / "bad"), *common, "--select", "val"])
    assert res.exit_code == 1 and "select must be one of last, best" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "bad" / "cad.json").exists()


# ------------------------------------------------------------------------------------------ stitched 2D latents
def test_stitched_latent_is_the_slice_latents_averaged_to_the_3d_size():
    from medlatent.evaluation.cad import stitched_latent_input

    vae = _tiny_vae(2)
    vol = torch.rand(1, 8, 6, 4) * 2 - 1
    z = stitched_latent_input(vae, vol, "all")
    assert z.shape == (2, 4, 3, 2)  # C × X/2 × Y/2 × Z/2: the size of a 3D latent with the same reduction
    with torch.no_grad():
        first, second = (vae.encode(vol[None, :, :, :, k]).mean[0] for k in (0, 1))
    if vae.config.stage2_head:
        first, second = (vae.stage2_features(t[None])[0] for t in (first, second))
    torch.testing.assert_close(z[..., 0], (first + second) / 2, atol=1e-5, rtol=1e-5)
    assert stitched_latent_input(vae, vol).shape == (1, 4, 3, 2)  # the paper's channel mean


def _natural_folder(path: Path) -> Path:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=32)
    vae.save_pretrained(path)
    return path


def test_a_kl_vae_checkpoint_file_encodes_as_its_diffusers_folder(tmp_path: Path):
    from safetensors.torch import save_file

    from medlatent.evaluation.baselines import natural_image_autoencoder

    folder = _natural_folder(tmp_path / "kl")
    diffusers_ae = natural_image_autoencoder(folder)
    save_file({k: v.contiguous() for k, v in diffusers_ae.vae.state_dict().items()}, tmp_path / "kl.safetensors")
    file_ae = natural_image_autoencoder(tmp_path / "kl.safetensors")  # imported without diffusers' loader
    assert (file_ae.kind, file_ae.C, file_ae.downsample_per_axis) == ("kl", 4, 2)
    x = torch.rand(2, 1, 8, 12) * 2 - 1
    torch.testing.assert_close(file_ae.encode(x), diffusers_ae.encode(x), atol=1e-4, rtol=1e-4)
    assert file_ae.method()(torch.rand(1, 1, 6, 4, 3)).shape == (1, 1, 6, 4, 3)


def test_cad_3d_task_has_stitched_2d_and_natural_rows_beside_the_3d_latent(tmp_path: Path, cad_app):
    import csv

    pytest.importorskip("torchmetrics")
    csv_path = _cad_task(tmp_path / "data", 3, n=12)
    _tiny_vae(3).save_pretrained(tmp_path / "vae3d")
    _tiny_vae(2, seed=1).save_pretrained(tmp_path / "vae2d")
    kl = _natural_folder(tmp_path / "kl")
    res = _invoke(cad_app, ["cad", str(csv_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "vae3d"),
                            "--stitched-2d", str(tmp_path / "vae2d"), "--natural", str(kl), "--classifier", "tiny",
                            "--size", "16", "--epochs", "1", "--seeds", "0", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    rows = {r["kind"]: r for r in csv.DictReader(open(tmp_path / "out" / "cad.csv"))}
    assert set(rows) == {"image", "latent", "interp", "stitched", "natural"}
    assert rows["latent"]["input_shape"] == rows["stitched"]["input_shape"] == rows["natural"]["input_shape"] \
        == rows["interp"]["input_shape"] == "1x8x8x8"
    assert rows["stitched"]["f"] == rows["latent"]["f"] == "8" and rows["natural"]["C"] == "4"
    assert rows["stitched"]["method"].startswith("2D ") and rows["natural"]["method"].startswith("KL-VAE kl")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "the mean of the 4 latent channels" in report and "class-balanced sampling" in report  # 3D: balanced


def test_cad_2d_task_has_a_natural_autoencoder_row(tmp_path: Path):
    from medlatent.evaluation.baselines import natural_image_autoencoder
    from medlatent.evaluation.cad import CADConfig, default_methods, run_cad

    pytest.importorskip("torchmetrics")
    csv_path = _cad_task(tmp_path / "data", 2, n=12)
    ae = natural_image_autoencoder(_natural_folder(tmp_path / "kl"))
    methods = default_methods(natural={"kl": ae}, kinds=("image",))
    res = run_cad(csv_path, methods, config=CADConfig(classifier="tiny", size=16, epochs=1, seeds=(0,), batch_size=4),
                  cache_dir=tmp_path / "cache")
    row = res.rows[-1]
    assert (row.kind, row.label, row.f, row.C, row.input_shape) == ("natural", "KL-VAE kl (C=4)", 4, 4, [1, 8, 8])
    assert any(p.parent.parent.name == "natural" for p in (tmp_path / "cache").rglob("*.safetensors"))


def test_stitched_rows_are_refused_on_a_2d_task(tmp_path: Path, cad_app):
    csv_path = _cad_task(tmp_path / "data", 2, n=12)
    _tiny_vae(2).save_pretrained(tmp_path / "vae2d")
    res = _invoke(cad_app, ["cad", str(csv_path), "-o", str(tmp_path / "out"), "--stitched-2d",
                            str(tmp_path / "vae2d"), "--classifier", "tiny", "--size", "16", "--epochs", "1",
                            "--seeds", "0"])
    assert res.exit_code == 1 and "rows of 3D tasks" in res.output and "Traceback" not in res.output
    res = _invoke(cad_app, ["cad", str(csv_path), "-o", str(tmp_path / "out"), "--natural", str(tmp_path / "none"),
                            "--classifier", "tiny", "--size", "16"])
    assert res.exit_code == 1 and "no such folder" in res.output


# ------------------------------------------------------------------------------------------ 3D recon rows
def test_slice_bicubic_is_2d_bicubic_per_slice_then_block_means_along_z():
    import torch.nn.functional as F

    from medlatent.evaluation.baselines import roundtrip, shrink

    torch.manual_seed(0)
    x = torch.rand(1, 1, 8, 12, 6)
    small = shrink(x, 2, "slice-bicubic")
    assert small.shape == (1, 1, 4, 6, 3)  # the 3D latent's size
    per_slice = torch.stack([F.interpolate(x[..., k], size=(4, 6), mode="bicubic", align_corners=False,
                                           antialias=True) for k in range(6)], dim=-1)
    torch.testing.assert_close(small, (per_slice[..., 0::2] + per_slice[..., 1::2]) / 2)
    assert roundtrip(x, 2, "slice-bicubic").shape == x.shape


def test_recon_of_a_volume_has_slice_bicubic_and_stitched_2d_rows(tmp_path: Path):
    import json

    import numpy as np
    import typer
    from typer.testing import CliRunner

    from io_fixtures import nibabel_data
    from medlatent.evaluation.cli_recon import register
    from medlatent.io.image import ImageData
    from medlatent.io.readers import read_image
    from medlatent.io.writers import write_image

    vol = read_image(nibabel_data("anatomical.nii"))
    crop = np.ascontiguousarray(vol.array[..., 10:26, 10:26, 10:26]).astype(np.float32)
    write_image(ImageData(crop, vol.affine), tmp_path / "vol.nii.gz", "nifti")
    _tiny_vae(3).save_pretrained(tmp_path / "vae3d")
    _tiny_vae(2, seed=1).save_pretrained(tmp_path / "vae2d")
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["recon", str(tmp_path / "vol.nii.gz"), "-o", str(tmp_path / "out"), "-m",
                                   str(tmp_path / "vae3d"), "--stitched-2d", str(tmp_path / "vae2d"), "--baselines",
                                   "area,slice-bicubic", "--seeds", "1", "--figures", "0", "--no-equal-values"])
    assert res.exit_code == 0, res.output
    methods = json.loads((tmp_path / "out" / "summary.json").read_text())["methods"]
    stitched = next(k for k in methods if k.startswith("2D:"))
    assert {"area", "slice-bicubic"} <= set(methods)
    assert methods["slice-bicubic"]["f"] == methods["area"]["f"] == methods[stitched]["f"] == 8
    assert methods["slice-bicubic"]["values_stored"] == methods["area"]["values_stored"]
    assert methods["slice-bicubic"]["note"].startswith("2D bicubic ÷2 on every slice")
