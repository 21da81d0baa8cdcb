"""Tiling helpers and the tiled-vs-untiled contract (2D and 3D)."""

import numpy as np
import pytest
import torch

from conftest import randomise, tiny_config
from medlatent import MedVAE
from medlatent.engine.seams import border_mask, seam_report
from medlatent.engine.tiled import TiledAutoencoder, TileSettings
from medlatent.engine.tiling import blend_weights, plan_tiles, receptive_radius, tile_for_budget, tile_starts


def test_tile_starts_cover_and_overlap():
    for size, tile, ov, mult in [(100, 32, 8, 1), (128, 48, 16, 4), (64, 64, 8, 4), (30, 64, 8, 2), (257, 100, 30, 1)]:
        starts = tile_starts(size, min(tile, size), ov, mult)
        assert starts[0] == 0 and starts[-1] + min(tile, size) == size
        assert all(a % mult == 0 for a in starts[:-1])
        for a, b in zip(starts, starts[1:]):
            assert a + tile - b >= ov  # neighbours share at least the overlap
    with pytest.raises(ValueError):
        tile_starts(100, 10, 10)


def test_blend_weights_sum_to_a_smooth_partition():
    shape, tile, ov = (64, 40), 24, 8
    tiles = plan_tiles(shape, (tile, tile), (ov, ov))
    total = torch.zeros(shape)
    for t in tiles:
        total[t.slices()] += blend_weights(t, shape, (ov, ov))
    assert total.min() > 0.5  # every pixel is covered with real weight
    single = blend_weights(tiles[0], shape, (ov, ov))
    assert single[0, 0] == 1 and single[-1, -1] < 0.01  # border side kept, interior side faded


def test_receptive_radius_and_budget():
    assert receptive_radius((1, 2, 4), 2) > receptive_radius((1, 2), 1)
    t = tile_for_budget(4 * 2**30, 2048, 2, 4, 32)
    assert t % 4 == 0 and t * t * 2048 <= 4 * 2**30
    assert tile_for_budget(1, 2048, 3, 8, 64) == 64


@pytest.mark.parametrize("dims, size, tile", [(2, 48, 24), (3, 16, 8)])
def test_tiled_matches_untiled_when_one_tile_covers_all(dims, size, tile):
    model = randomise(MedVAE(tiny_config(dims))).eval()
    x = torch.rand((1, 1) + (size,) * dims) * 2 - 1
    runner = TiledAutoencoder(model, TileSettings(tile=size))
    with torch.inference_mode():
        assert torch.allclose(runner.encode(x), model.encode(x).mean, atol=1e-6)


@pytest.mark.parametrize("dims, size, tile, overlap", [(2, 64, 32, 8), (3, 16, 8, 4)])
def test_tiled_inference_is_close_and_seamless(dims, size, tile, overlap):
    torch.manual_seed(0)
    model = randomise(MedVAE(tiny_config(dims))).eval()
    # a smooth image: what medical images mostly are, and where seams would show
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 3, size)] * dims, indexing="ij"))
    x = torch.sin(grid.sum(0) * 2)[None, None] * 0.8
    runner = TiledAutoencoder(model, TileSettings(tile=tile, overlap=overlap, batch_size=3))
    with torch.inference_mode():
        z_full = model.encode(x).mean
        z_tiled = runner.encode(x)
        y_full = model.decode(z_full)
        y_tiled = runner.decode(z_full)
    assert z_tiled.shape == z_full.shape and y_tiled.shape == y_full.shape
    # decode tiles are planned in latent voxels (÷2 for the tiny model), blended in image space (×2)
    dec = seam_report(y_tiled[0, 0], y_full[0, 0], tile // 2, overlap // 2, scale=2)
    # random weights: GroupNorm statistics and attention are per tile, so agreement is limited (measured
    # 19-24 dB here, see bench/RESULTS.md); seams must not add gradient energy along tile borders
    assert dec["psnr_vs_untiled"] > 17
    assert dec["border_gradient_ratio"] < dec["border_gradient_ratio_untiled"] * 1.1 + 0.05
    enc_psnr = seam_report(z_tiled[0, 0], z_full[0, 0], tile // 2, overlap // 2)["psnr_vs_untiled"]
    assert enc_psnr > 14


def test_border_mask_marks_blend_centres():
    # three tiles of at most 32 are needed; balanced, they are 27 long and start at 0, 18, 37: centres 22 and 41
    m = border_mask((64,), 32, 8)
    assert m.nonzero().flatten().tolist() == [21, 22, 40, 41]


@pytest.mark.parametrize("size,tile,ov,mult", [(2048, 512, 36, 4), (100, 32, 8, 1), (64, 32, 8, 1), (257, 100, 30, 1),
                                               (130, 64, 16, 8), (64, 64, 8, 4), (30, 64, 8, 2)])
def test_balanced_tiles_keep_the_count_and_the_overlap_with_fewer_pixels(size, tile, ov, mult):
    from medlatent.engine.tiling import balanced_tile

    t = balanced_tile(size, tile, ov, mult)
    assert t <= min(tile, size) and (t == size or t % mult == 0)
    fixed, balanced = tile_starts(size, min(tile, size), ov, mult), tile_starts(size, t, ov, mult)
    assert len(balanced) == len(fixed)  # as many forward passes as before, each on at most as many pixels
    assert balanced[0] == 0 and balanced[-1] + t == size
    assert all(a + t - b >= ov for a, b in zip(balanced, balanced[1:]))
    if size == 2048:
        assert t == 440  # 5 × 440² instead of 5 × 512² per row: 26 % fewer pixels in all


def test_bfloat16_autocast_on_cpu_stays_close_to_float32():
    from medlatent.io.image import ImageData, spacing_affine
    from medlatent.pipeline import EncodeOptions, encode_image

    model = randomise(MedVAE(tiny_config(2))).eval()
    model.weights_info = {"model": "tiny"}
    arr = (np.sin(np.linspace(0, 6, 64))[:, None] * np.cos(np.linspace(0, 4, 48))[None, :] * 1000).astype(np.int16)
    img = ImageData(arr[None], spacing_affine((1.0, 1.0)))
    z32 = encode_image(model, img, EncodeOptions(precision="fp32")).z
    z16 = encode_image(model, img, EncodeOptions(precision="bf16")).z
    assert z16.dtype == torch.float32
    rel = float((z16 - z32).norm() / z32.norm())
    assert 0 < rel < 0.05


@pytest.mark.parametrize("shape,tile,ov,mult", [((100, 70), 48, 16, 4), ((40, 33, 27), 16, 6, 1)])
def test_tile_cores_partition_the_image(shape, tile, ov, mult):
    from medlatent.engine.imagenorm import core_fractions

    tiles = plan_tiles(shape, (tile,) * len(shape), (ov,) * len(shape), mult)
    count = torch.zeros(shape, dtype=torch.int32)
    for t, fr in core_fractions(tiles, shape, mult).items():
        box = tuple(slice(a + round(f0 * n), a + round(f1 * n)) for a, n, (f0, f1) in zip(t.starts, t.sizes, fr))
        count[box] += 1
    assert bool((count == 1).all())


def test_image_norm_gives_each_tile_the_whole_image_statistics():
    """One GroupNorm layer, tile by tile: after a statistics pass over the tile cores, every tile is normalised
    exactly as the whole image is; with per-tile statistics it is not."""
    from medlatent.engine.imagenorm import ImageNorm, attached, core_fractions
    from medlatent.model.layers import GroupNorm32

    g = torch.Generator().manual_seed(0)
    gn = GroupNorm32(8, 4)
    with torch.no_grad():
        gn.weight.copy_(torch.rand(8, generator=g) + 0.5)
        gn.bias.copy_(torch.randn(8, generator=g))
    ramp = torch.linspace(-1, 3, 40)[:, None] * torch.linspace(0.5, 2, 30)[None]
    x = torch.randn((1, 8, 40, 30), generator=g) * 0.3 + ramp  # statistics vary across the image
    whole = gn(x)
    tiles = plan_tiles((40, 30), (16, 16), (6, 6))
    norm = ImageNorm(core_fractions(tiles, (40, 30)))
    with attached(gn, norm):
        norm.start_pass(record=True)
        for t in tiles:
            norm.set_batch([t])
            gn(x[(slice(None), slice(None), *t.slices())])
        norm.start_pass(record=False)
        for t in tiles:
            sl = (slice(None), slice(None), *t.slices())
            torch.testing.assert_close(gn(x[sl]), whole[sl], atol=1e-5, rtol=1e-5)
    assert gn.shared is None  # detached after the block
    sl = (slice(None), slice(None), *tiles[0].slices())
    assert (gn(x[sl]) - whole[sl]).abs().max() > 0.1


@pytest.mark.parametrize("dims,size,tile", [(2, 96, 48), (3, 32, 16)])
def test_image_norm_runs_2d_and_3d_and_detaches(dims, size, tile):
    model = randomise(MedVAE(tiny_config(dims))).eval()
    x = torch.rand((1, 1) + (size,) * dims) * 2 - 1
    eng = TiledAutoencoder(model, TileSettings(tile=tile, norm="image", norm_passes=2))
    z = eng.encode(x)
    y = eng.decode(z)
    assert z.shape[2:] == (size // model.downsample_per_axis,) * dims and y.shape == x.shape
    assert bool(torch.isfinite(y).all())
    assert all(m.shared is None for m in model.modules() if hasattr(m, "shared"))
    with pytest.raises(ValueError, match="norm"):
        TileSettings(norm="global")
