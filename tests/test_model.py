"""Behaviour of the one 2D/3D implementation on tiny configs."""

import pytest
import torch
import torch.nn.functional as F

from conftest import image_for, randomise, tiny_config
from medlatent import DiagonalGaussian, MedVAE
from medlatent.model import layers


def test_shapes(tiny_model):
    x = image_for(tiny_model, size=8)
    with torch.no_grad():
        post = tiny_model.encode(x)
        z = post.mean
        assert z.shape == (2, 2) + (4,) * tiny_model.spatial_dims
        assert post.std.shape == z.shape
        assert tiny_model.stage2_features(z).shape == z.shape
        assert tiny_model.decode(z).shape == x.shape
        out = tiny_model(x)
    assert out.reconstruction.shape == x.shape
    assert torch.equal(out.z, z)


def test_encode_is_deterministic_and_sampling_is_explicit(tiny_model):
    x = image_for(tiny_model)
    with torch.no_grad():
        a, b = tiny_model.encode(x), tiny_model.encode(x.clone())
        assert torch.equal(a.mean, b.mean)  # same bits: the latent of record is the posterior mean
        assert torch.equal(tiny_model(x).reconstruction, tiny_model(x).reconstruction)
        s1 = a.sample(torch.Generator().manual_seed(3))
        s2 = a.sample(torch.Generator().manual_seed(3))
        s3 = a.sample(torch.Generator().manual_seed(4))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert not torch.equal(s1, a.mean)


def test_grad_mode_gives_same_outputs_as_inference(tiny_model):
    """In-place activations are used only without autograd; both paths must agree."""
    x = image_for(tiny_model)
    with torch.no_grad():
        ref = tiny_model(x).reconstruction
    out = tiny_model(x).reconstruction
    out.sum().backward()
    # float32 noise only: oneDNN may pick other conv kernels with autograd on (seen: 7e-6 with one thread)
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=2e-5)
    assert tiny_model.decoder.conv_out.weight.grad is not None


def test_grayscale_into_three_channel_model():
    model = randomise(MedVAE(tiny_config(in_channels=3, out_channels=3))).eval()
    gray = image_for(model, channels=1)
    with torch.no_grad():
        z_gray = model.encode(gray).mean
        z_rgb = model.encode(gray.repeat(1, 3, 1, 1)).mean
        assert torch.equal(z_gray, z_rgb)  # replication, documented
        rgb_out = model.decode(z_gray)
        assert rgb_out.shape[1] == 3
        torch.testing.assert_close(model.reconstruct(gray), rgb_out.mean(1, keepdim=True))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m: torch.zeros(2, 1, 8), "4-D tensor"),
        (lambda m: torch.zeros(1, 8, 8), r"x\[None\]"),
        (lambda m: torch.zeros(1, 2, 8, 8), "1 channel"),
        (lambda m: torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "floating-point"),
        (lambda m: torch.full((1, 1, 8, 8), float("nan")), "NaN"),
        (lambda m: torch.zeros(1, 1, 8, 7), "multiples of 2"),
        (lambda m: [[0.0]], "torch.Tensor"),
    ],
)
def test_bad_images_are_refused_clearly(make, match):
    model = MedVAE(tiny_config())
    with pytest.raises((ValueError, TypeError), match=match):
        model.encode(make(model))


def test_bad_latents_are_refused_clearly():
    model = MedVAE(tiny_config(spatial_dims=3))
    with pytest.raises(ValueError, match="5-D tensor B×C×X×Y×Z"):
        model.decode(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="2 channel"):
        model.stage2_features(torch.zeros(1, 3, 4, 4, 4))


def test_no_stage2_head():
    model = MedVAE(tiny_config(stage2_head=False))
    assert not any(k.startswith("channel_") for k in model.state_dict())
    with pytest.raises(RuntimeError, match="stage-2"):
        model.stage2_features(torch.zeros(1, 2, 4, 4))


def test_config_validation():
    with pytest.raises(ValueError, match="spatial_dims"):
        tiny_config(spatial_dims=4)
    with pytest.raises(ValueError, match="divisible by norm_groups=32"):
        tiny_config(ch=48)
    # a narrow model may use fewer groups (several channels per group); configs without the key load as 32
    narrow = tiny_config(ch=16, norm_groups=8)
    assert MedVAE(narrow).encoder.norm_out.num_groups == 8
    legacy = {k: v for k, v in tiny_config().to_dict().items() if k != "norm_groups"}
    assert type(narrow).from_dict(legacy).norm_groups == 32
    with pytest.raises(ValueError, match="unknown MedVAEConfig keys"):
        type(tiny_config()).from_dict({**tiny_config().to_dict(), "colour": 1})
    cfg = tiny_config()
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


def _dense_attention(q, k, v):
    w = torch.softmax(q @ k.transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)
    return w @ v


@pytest.mark.parametrize("max_scores", [2**26, 1000])
def test_attention_equals_dense(max_scores):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 64, generator=g) for _ in range(3))
    out = layers.attention(q, k, v, max_scores=max_scores)
    torch.testing.assert_close(out, _dense_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_attention_never_materialises_more_than_the_budget(monkeypatch):
    """Even if the backend fell back to explicit scores, no call sees more than `max_scores` of them."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append(q.shape[-2] * k.shape[-2])
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 4096, 8)
    layers.attention(q, q, q, max_scores=4096 * 100)
    assert max(seen) <= 4096 * 100 and len(seen) == 41


def test_attn_block_matches_the_dense_formulation_in_2d_and_3d():
    for dims, shape in ((2, (2, 32, 5, 7)), (3, (1, 32, 3, 4, 5))):
        block = randomise(layers.AttnBlock(dims, 32)).eval()
        x = torch.randn(shape)
        h = block.norm(x)
        q, k, v = (t.flatten(2).transpose(1, 2) for t in (block.q(h), block.k(h), block.v(h)))
        ref = x + block.proj_out(_dense_attention(q, k, v).transpose(1, 2).reshape(shape))
        with torch.no_grad():
            torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_downsample_pads_high_side():
    down = layers.Downsample(2, 32)
    x = torch.randn(1, 32, 6, 6)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), ref)


def test_groupnorm_keeps_float32_statistics_under_bfloat16():
    norm = layers.GroupNorm32(64)
    x = torch.randn(1, 64, 16, 16) * 50 + 300
    xb = x.bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    # only the final rounding to bfloat16 differs from float32 normalisation of the same input
    torch.testing.assert_close(out.float(), norm(xb.float()), rtol=0.01, atol=0.02)


def test_posterior_kl_reduces_all_non_batch_axes():
    moments = torch.zeros(2, 4, 3, 3, 3)  # 3D: mean 0, logvar 0 → KL 0
    assert torch.equal(DiagonalGaussian(moments).kl(), torch.zeros(2))
    moments[:, :2] = 1.0  # mean 1 → KL = 0.5 per element, 2·27 elements
    torch.testing.assert_close(DiagonalGaussian(moments).kl(), torch.full((2,), 27.0))
    clamp = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 99.0)], 1))
    assert clamp.logvar.max() == 20.0


@pytest.mark.parametrize("dims,shape", [(2, (2, 8, 5, 7)), (3, (1, 4, 3, 5, 4))])
def test_subpixel_upsample_equals_nearest_then_conv(dims, shape):
    """Inference fuses ×2 nearest upsampling and the 3×3 conv into per-phase 2×2 convs: same values and layout."""
    from medlatent.model.layers import Upsample

    torch.manual_seed(0)
    up = Upsample(dims, shape[1]).eval()
    x = torch.randn(shape)
    reference = up(x.requires_grad_())  # the autograd path: interpolate, then conv
    assert reference.requires_grad
    with torch.no_grad():
        fast = up(x.detach())
        torch.testing.assert_close(fast, reference.detach(), atol=2e-6, rtol=0)
        if dims == 2:
            cl = up(x.detach().to(memory_format=torch.channels_last))
            assert cl.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(cl, reference.detach(), atol=2e-6, rtol=0)


def test_fused_is_an_explicit_choice_of_algorithm_with_the_same_values():
    """`fused` None follows autograd; True/False force the in-place / sub-pixel or the reference algorithm."""
    from medlatent.model.layers import ResnetBlock, Upsample

    torch.manual_seed(0)
    block, up = ResnetBlock(2, 8, 16, groups=4).eval(), Upsample(2, 8).eval()
    x = torch.randn(2, 8, 6, 5)
    with torch.no_grad():
        auto_block, auto_up = block(x.clone()), up(x)
        block.fused, up.fused = False, False
        ref_block, ref_up = block(x.clone()), up(x)
    assert torch.equal(auto_block, ref_block)
    torch.testing.assert_close(auto_up, ref_up, atol=2e-6, rtol=0)
    block.fused, up.fused = None, True  # the sub-pixel form also runs under autograd when asked for
    y = up(x.requires_grad_())
    assert y.requires_grad
    torch.testing.assert_close(y.detach(), ref_up, atol=2e-6, rtol=0)
    assert torch.equal(block(x).detach(), ref_block)  # auto under autograd: unfused


def test_device_dtype_and_inference_defaults_are_explicit():
    model = MedVAE(tiny_config(), max_tile=16)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.to(torch.float64).dtype == torch.float64
    assert model.max_tile == 16 and MedVAE(tiny_config()).max_tile is None
    for bad in (3, 2, 0, 16.0, True):
        with pytest.raises(ValueError, match="max_tile must be a multiple of 2"):
            MedVAE(tiny_config(), max_tile=bad)


def test_finite_check_once_where_input_enters():
    """The public entries refuse NaN; the internal per-tile and per-step calls skip the scan (a device sync)."""
    from medlatent.engine.tiled import TiledAutoencoder, TileSettings

    model = MedVAE(tiny_config()).eval()
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 3, 3] = float("nan")
    with torch.no_grad():
        assert torch.isnan(model.encode(x, check_finite=False).mean).any()
        assert torch.isnan(model(x, check_finite=False).reconstruction).any()
        with pytest.raises(ValueError, match="latent z contains NaN"):
            model.decode(torch.full((1, 2, 4, 4), float("nan")))
    engine = TiledAutoencoder(model, TileSettings(tile=8, overlap=2))
    with pytest.raises(ValueError, match="image contains NaN or infinite values"):
        engine.encode(x)
    with pytest.raises(ValueError, match="latent z contains NaN or infinite values"):
        engine.decode(torch.full((1, 2, 8, 8), float("inf")))


def test_image_norm_routing_is_per_model():
    """Routing one model's GroupNorms through image-wide statistics leaves another model alone, and a second
    routing of the same model is refused."""
    from medlatent.model.layers import GroupNorm32, routed_group_norms

    a, b = randomise(MedVAE(tiny_config())).eval(), randomise(MedVAE(tiny_config())).eval()
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        before = b.reconstruct(x)

        def zero(gn: GroupNorm32, t: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(t)

        with routed_group_norms(a, zero):
            assert all(m.shared is zero for m in a.modules() if isinstance(m, GroupNorm32))
            assert torch.equal(b.reconstruct(x), before)
            assert not torch.equal(a.reconstruct(x), before)
            with pytest.raises(RuntimeError, match="already routed"):
                with routed_group_norms(a.decoder, zero):
                    pass
        assert torch.equal(a.reconstruct(x), before)
    assert all(m.shared is None for m in a.modules() if isinstance(m, GroupNorm32))
