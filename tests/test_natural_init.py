"""Starting a multi-channel member from a natural-image KL-VAE: layout conversions, LoRA set-up, export.

The reference is a tiny diffusers ``AutoencoderKL`` with random weights; the LDM layout is medlatent's own
(plus the wrapping and training keys of a CompVis checkpoint).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import randomise
from medlatent import MedVAE, get_model_info
from medlatent.checkpoints import CheckpointError, load_checkpoint
from medlatent.model.lora import LoRAConv, inject_lora
from medlatent.training.export import export_model, export_official_ckpt
from medlatent.training.natural import (
    config_from_natural,
    convert_diffusers_state_dict,
    convert_ldm_state_dict,
    convert_natural_state_dict,
    load_natural_vae,
)

diffusers = pytest.importorskip("diffusers")

OFFICIAL = json.loads((Path(__file__).parent / "data" / "official_keys.json").read_text())
# every conv of every ResnetBlock / AttnBlock: the set the official code wraps (see natural.py's docstring)
ADAPTED = re.compile(
    r"\.(block\.\d+|block_[12])\.(conv1|conv2|nin_shortcut)\.weight$|\.attn_1\.(q|k|v|proj_out)\.weight$"
)


@pytest.fixture(scope="module")
def natural_vae():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    )
    return randomise(vae, seed=1).eval()


@pytest.fixture(scope="module")
def image():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def ldm_sd(natural_vae):
    """The tiny VAE in the CompVis layout, i.e. medlatent's keys."""
    return convert_diffusers_state_dict(natural_vae.state_dict())


def _reference(vae, x):
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        return post.mean, post.logvar, vae.decode(post.mean).sample


def _ours(model, x):
    with torch.no_grad():
        post = model.encode(x)
        return post.mean, post.logvar, model.decode(post.mean)


def _close(a, b, atol=1e-5):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=atol)


def _plain(sd):
    model = MedVAE(config_from_natural(sd, stage2_head=False))
    model.load_state_dict(convert_natural_state_dict(sd), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------- conversions
def test_diffusers_conversion_matches_diffusers(natural_vae, image):
    sd = natural_vae.state_dict()
    cfg = config_from_natural(sd, stage2_head=False)
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.embed_dim) == (32, (1, 2), 1, 4, 4)
    assert (cfg.in_channels, cfg.out_channels, cfg.spatial_dims) == (3, 3, 2)
    _close(_ours(_plain(sd), image), _reference(natural_vae, image))


def test_diffusers_old_attention_names(natural_vae, image):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{old[m[1]]}.", k): v
          for k, v in natural_vae.state_dict().items()}
    assert "encoder.mid_block.attentions.0.query.weight" in sd
    _close(_ours(_plain(sd), image), _reference(natural_vae, image))


def test_ldm_layout_drops_wrapping_and_training_keys(natural_vae, ldm_sd, image):
    assert "decoder.up.1.upsample.conv.weight" in ldm_sd  # diffusers' up_blocks.0 is LDM's up.1
    training = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}
    ckpt = {"state_dict": {**ldm_sd, **training}}  # a CompVis first-stage model.ckpt
    assert convert_ldm_state_dict(ckpt).keys() == ldm_sd.keys()
    # a full latent-diffusion checkpoint; attention projections saved as Linear weights
    full = {f"first_stage_model.{k}": v.flatten(1) if k.endswith(".attn_1.q.weight") else v for k, v in ldm_sd.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    full["first_stage_model.loss.logvar"] = torch.zeros(())
    for sd in (ckpt, {"state_dict": full}):
        converted = convert_natural_state_dict(sd)
        assert converted.keys() == ldm_sd.keys()
        _close(_ours(_plain(converted), image), _reference(natural_vae, image))


# ---------------------------------------------------------------------------------------------- LoRA set-up
def _adapter_bases(model):
    return {n for n, m in model.named_modules() if isinstance(m, LoRAConv)}


@pytest.mark.parametrize("source", ["diffusers-dir", "ldm-ckpt"])
def test_load_natural_vae_freezes_base_and_adds_rank4_adapters(tmp_path, natural_vae, ldm_sd, image, source):
    if source == "diffusers-dir":
        natural_vae.save_pretrained(tmp_path / "vae")
        path = tmp_path / "vae"
    else:
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": {**ldm_sd, "loss.logvar": torch.zeros(())}}, path)
    model, params = load_natural_vae(path)
    assert model.training and model.config.stage2_head

    expected = {k[: -len(".weight")] for k in ldm_sd if ADAPTED.search(k)}
    assert len(expected) == 30  # tiny config: 5 + 8 encoder, 8 + 9 decoder convs
    assert _adapter_bases(model) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{b}.{x}.weight" for b in expected for x in ("lora_down", "lora_up")}
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(params) == 60
    for m in model.modules():
        if isinstance(m, LoRAConv):
            assert m.lora_down.weight.shape[0] == 4 and m.lora_up.weight.shape[1] == 4
            assert not m.lora_up.weight.any()  # zero-initialised: the model starts as the base model
            assert m.lora_down.weight.any()
    _close(_ours(model.eval(), image), _reference(natural_vae, image))
    assert model.weights_info["file"].startswith(str(path))


def test_adapter_layout_of_the_full_members_is_the_official_one():
    for name in ("medvae_4_3_2d", "medvae_8_4_2d"):
        official = {k: tuple(s) for k, s in OFFICIAL[name]}
        with torch.device("meta"):
            model = MedVAE(get_model_info(name).config)
            inject_lora(model, rank=4)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official


def test_full_finetuning_and_grayscale_input(tmp_path, natural_vae, image):
    natural_vae.save_pretrained(tmp_path / "vae")
    model, params = load_natural_vae(tmp_path / "vae", lora_rank=None)
    assert not _adapter_bases(model)
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if not n.startswith("channel_")}
    assert not model.channel_proj.weight.requires_grad
    gray, _ = load_natural_vae(tmp_path / "vae", lora_rank=None, in_channels=1)
    assert gray.config.in_channels == 1
    x = image[:, :1]
    with torch.no_grad():  # summed RGB kernels on grayscale == RGB model on the replicated image
        torch.testing.assert_close(gray.eval().encode(x).mean, model.eval().encode(x).mean, rtol=0, atol=1e-5)


def test_load_natural_vae_errors_name_the_file(tmp_path, ldm_sd):
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_natural_vae(tmp_path / "nothere.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty.*config.json"):
        load_natural_vae(tmp_path / "empty")
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {**ldm_sd, "encoder.down.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)}}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.ckpt.*unexpected keys: encoder\.down\.0\.attn"):
        load_natural_vae(bad)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(CheckpointError, match=r"other\.ckpt.*no autoencoder weights"):
        load_natural_vae(other)


# ---------------------------------------------------------------------------------------------- export
def test_export_merged_and_with_adapters_reload_to_the_same_model(tmp_path, natural_vae, image):
    natural_vae.save_pretrained(tmp_path / "vae")
    model, params = load_natural_vae(tmp_path / "vae")
    with torch.no_grad():  # a trained update (lora_up starts at zero)
        for p in params:
            if p.shape[1] == 4:
                p.normal_(0, 0.05)
    model.eval()
    trained = _ours(model, image)
    assert (trained[0] - _reference(natural_vae, image)[0]).abs().max() > 1e-3

    merged_dir = export_model(model, tmp_path / "merged", merged=True, name="tiny")
    lora_dir = export_model(model, tmp_path / "lora", merged=False, name="tiny")
    assert _adapter_bases(model)  # exporting merged left the model's adapters in place
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as f:
        merged_keys = set(f.keys())
    with safe_open(str(lora_dir / "model.safetensors"), "pt") as f:
        lora_keys = set(f.keys())
    assert not any("lora_" in k for k in merged_keys)
    assert merged_keys == set(MedVAE(model.config).state_dict())
    assert "encoder.down.0.block.0.conv1.lora_down.weight" in lora_keys
    q = "encoder.mid.attn_1.q"
    assert {f"{q}.conv.weight", f"{q}.conv.bias", f"{q}.lora_down.weight", f"{q}.lora_up.weight"} <= lora_keys
    # same key pattern as the released LoRA member (level/block indices aside)
    pattern = {re.sub(r"\.\d+\.", ".N.", k) for k in lora_keys}
    official = {re.sub(r"\.\d+\.", ".N.", k) for k, _ in OFFICIAL["medvae_4_3_2d"]}
    assert pattern == official

    for d in (merged_dir, lora_dir):
        reloaded = MedVAE.from_pretrained(d)
        assert reloaded.config == model.config and reloaded.weights_info["model"] == "tiny"
        assert not _adapter_bases(reloaded)
        _close(_ours(reloaded, image), trained)
    _close(_ours(load_checkpoint(lora_dir / "model.safetensors"), image), trained)


@pytest.mark.parametrize("merged", [False, True])
def test_export_official_ckpt_loads_back(tmp_path, natural_vae, image, merged):
    natural_vae.save_pretrained(tmp_path / "vae")
    model, params = load_natural_vae(tmp_path / "vae")
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    model.eval()
    path = export_official_ckpt(model, tmp_path / "vae.ckpt", merged=merged)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"state_dict"}
    assert any("lora_up" in k for k in ckpt["state_dict"]) != merged
    _close(_ours(load_checkpoint(path), image), _ours(model, image))
    # a released-layout checkpoint can start another round of LoRA training (adapters merged, fresh ones added)
    again, _ = load_natural_vae(path)
    _close(_ours(again.eval(), image), _ours(model, image))
