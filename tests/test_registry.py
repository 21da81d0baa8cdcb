"""The seven official members: names, f, C, latent shapes at full config (shape-only, on the meta device)."""

import pytest
import torch

from medlatent import MedVAE, get_model_info, list_models

EXPECTED = {  # name: (spatial_dims, per-axis reduction, C, image channels, f)
    "medvae_4_1_2d": (2, 4, 1, 1, 16),
    "medvae_4_3_2d": (2, 4, 3, 3, 16),
    "medvae_4_4_2d": (2, 4, 4, 1, 16),
    "medvae_8_1_2d": (2, 8, 1, 1, 64),
    "medvae_8_4_2d": (2, 8, 4, 3, 64),
    "medvae_4_1_3d": (3, 4, 1, 1, 64),
    "medvae_8_1_3d": (3, 8, 1, 1, 512),
}


def test_registry_holds_the_official_family_and_the_bundled_default():
    from medlatent.registry import DEFAULT_3D_MODEL, DEFAULT_MODEL

    bundled = [DEFAULT_MODEL, DEFAULT_3D_MODEL, "medlatent_small_4_4_2d"]
    assert list_models() == sorted([*EXPECTED, *bundled])
    assert all(get_model_info(n).bundled for n in bundled) and not any(get_model_info(n).bundled for n in EXPECTED)
    info = get_model_info(DEFAULT_MODEL)
    assert (info.f, info.C, info.spatial_dims) == (16, 1, 2)
    info = get_model_info(DEFAULT_3D_MODEL)
    assert (info.f, info.C, info.spatial_dims) == (64, 1, 3)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_member_facts_and_latent_shapes(name):
    dims, s, c, io, f = EXPECTED[name]
    info = get_model_info(name)
    cfg = info.config
    assert (cfg.spatial_dims, cfg.downsample_per_axis, cfg.embed_dim, cfg.z_channels) == (dims, s, c, c)
    assert (cfg.in_channels, cfg.out_channels, cfg.ch, cfg.num_res_blocks) == (io, io, 128, 2)
    assert info.f == f and info.C == c
    assert info.lora == (io == 3)
    assert info.hub_checkpoint.startswith("model_weights/") and info.hub_checkpoint.endswith(".ckpt")
    with torch.device("meta"):
        model = MedVAE.from_config(name)
        spatial = (64, 96) if dims == 2 else (32, 64, 48)
        x = torch.empty(2, 1, *spatial)  # grayscale input; 3-channel members replicate it
        z = model.encode(x).mean
        assert tuple(z.shape) == (2, c, *(n // s for n in spatial))
        assert tuple(model.stage2_features(z).shape) == tuple(z.shape)
        assert tuple(model.decode(z).shape) == (2, io, *spatial)
        assert tuple(model.reconstruct(x).shape) == (2, 1, *spatial)
    assert model.latent_shape(spatial) == (c, *(n // s for n in spatial))


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KeyError, match="medvae_4_1_2d"):
        get_model_info("medvae_4_1_2D")
    with pytest.raises(KeyError, match="Available"):
        get_model_info("resnet50")
