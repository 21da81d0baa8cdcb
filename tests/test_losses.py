"""Training losses: LPIPS layout and loading, MS-SSIM, per-slice rule, PatchGAN, CLIP consistency, stage 1."""

import sys

import pytest
import torch
from torch import nn

from conftest import tiny_config
from medlatent import MedVAE
from medlatent.training.clip import ClipConsistency, ClipWeightsError, load_biomedclip
from medlatent.training.discriminator import PatchDiscriminator, hinge_d_loss
from medlatent.training.losses import LossConfig, Stage1Loss
from medlatent.training.perceptual import LPIPS, MSSSIMLoss, PerceptualWeightsError, load_lpips, over_slices


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return load_lpips(None)


def _images(b=2, c=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, c, size, size), generator=g) * 2 - 1


# ------------------------------------------------------------------ LPIPS
def test_lpips_distance_and_gradients(lpips):
    x, y = _images(size=16, seed=0), _images(size=16, seed=1)
    assert torch.equal(lpips(x, x), torch.zeros(2, 1, 1, 1))
    x.requires_grad_(True)
    d = lpips(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips.parameters())
    assert torch.allclose(lpips(x.detach(), y), lpips(x.detach().expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)))


def test_lpips_stays_in_eval_mode(lpips):
    wrapper = nn.ModuleDict({"p": lpips}).train()
    assert not any(m.training for m in lpips.modules())
    wrapper.eval()


def test_lpips_state_dict_layout(lpips):
    sd = lpips.state_dict()
    convs = [f"net.slice{k}.{i}" for k, idx in enumerate([(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)], 1)
             for i in idx]
    expected = {f"{c}.{p}" for c in convs for p in ("weight", "bias")}
    expected |= {f"lin{k}.model.1.weight" for k in range(5)} | {"scaling_layer.shift", "scaling_layer.scale"}
    assert set(sd) == expected
    assert len(list(lpips.parameters())) == 31 and len(sd) == 33
    assert sd["net.slice1.0.weight"].shape == (64, 3, 3, 3)
    assert sd["net.slice5.28.weight"].shape == (512, 512, 3, 3)
    assert sd["lin2.model.1.weight"].shape == (1, 256, 1, 1)
    assert torch.allclose(sd["scaling_layer.shift"].flatten(), torch.tensor([-0.030, -0.088, -0.188]))
    assert torch.allclose(sd["scaling_layer.scale"].flatten(), torch.tensor([0.458, 0.448, 0.450]))


def test_load_lpips_round_trip_and_missing_keys(tmp_path, lpips):
    sd = {k: v.clone() for k, v in lpips.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    sd["lin3.model.1.weight"] = torch.rand(sd["lin3.model.1.weight"].shape, generator=g)
    torch.save({"state_dict": sd}, tmp_path / "nested.pth")
    loaded = load_lpips(tmp_path / "nested.pth")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    assert not any(p.requires_grad for p in loaded.parameters())

    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_lpips(str(tmp_path / "w.safetensors")).lin3.model[1].weight, sd["lin3.model.1.weight"])

    partial = dict(sd)
    del partial["lin3.model.1.weight"]
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(PerceptualWeightsError, match=r"lin3\.model\.1\.weight"):
        load_lpips(tmp_path / "partial.pt")
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(PerceptualWeightsError, match="extra.weight"):
        load_lpips(tmp_path / "extra.pt")
    with pytest.raises(PerceptualWeightsError, match="not found"):
        load_lpips(tmp_path / "nope.pth")


def test_load_lpips_auto_without_packages_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import and find_spec both report it absent
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(PerceptualWeightsError) as err:
        load_lpips("auto")
    msg = str(err.value)
    assert "lpips" in msg and "torchvision" in msg and "loss.perceptual=ms_ssim" in msg and "loss.lpips_weights=" in msg


# ------------------------------------------------------------------ MS-SSIM
def test_msssim_loss_is_monotonic_on_small_crops():
    loss = MSSSIMLoss()
    x = _images(b=2, size=64, seed=0) * 0.5
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    assert loss(x, x).abs().max() < 1e-5
    values = [loss(x, x + s * noise).mean().item() for s in (0.05, 0.2, 0.5)]
    assert 0 < values[0] < values[1] < values[2] <= 1
    y = (x + 0.3 * noise).requires_grad_(True)
    out = loss(x, y)
    out.sum().backward()
    assert out.shape == (2, 1, 1, 1) and torch.isfinite(y.grad).all()
    assert loss(_images(size=8), _images(size=8, seed=1)).shape == (2, 1, 1, 1)  # tiny slices still work


# ------------------------------------------------------------------ per-slice rule
def test_over_slices_equals_per_slice_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 2, 3, 4, 5, generator=g), torch.randn(2, 2, 3, 4, 5, generator=g)
    conv = nn.Conv2d(2, 1, 2)

    def fn(u, v):
        return conv(u * v)  # a spatial map per slice: over_slices averages it per slice

    per_slice = []
    for axis in (2, 3, 4):
        for j in range(a.shape[axis]):
            per_slice.append(fn(a.select(axis, j), b.select(axis, j)).flatten(1).mean(1))
    expected = torch.stack(per_slice).mean(0)
    out = over_slices(fn, a, b)
    assert out.shape == (2, 1, 1, 1)
    assert torch.allclose(out.flatten(), expected, atol=1e-6)
    assert torch.allclose(over_slices(fn, a, b, chunk=3), out, atol=1e-6)
    assert torch.equal(over_slices(fn, a[:, :, 0], b[:, :, 0]), fn(a[:, :, 0], b[:, :, 0]))  # 2D: direct call


# ------------------------------------------------------------------ discriminator
def test_patch_discriminator_layout_and_init():
    d = PatchDiscriminator(1)
    assert d(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 6, 6)
    # Official NLayerDiscriminator(n_layers=3): convs at 0, 2, 5, 8, 11; BatchNorm at 3, 6, 9; biases only at 0, 11.
    params = {k for k, _ in d.named_parameters()}
    expected = {"main.0.weight", "main.0.bias", "main.11.weight", "main.11.bias"}
    expected |= {f"main.{i}.weight" for i in (2, 5, 8)}
    expected |= {f"main.{i}.{p}" for i in (3, 6, 9) for p in ("weight", "bias")}
    assert params == expected
    assert {"main.3.running_mean", "main.9.num_batches_tracked"} <= set(d.state_dict())
    shapes = [d.main[i].weight.shape for i in (0, 2, 5, 8, 11)]
    assert shapes == [(64, 1, 4, 4), (128, 64, 4, 4), (256, 128, 4, 4), (512, 256, 4, 4), (1, 512, 4, 4)]
    assert [d.main[i].stride[0] for i in (0, 2, 5, 8, 11)] == [2, 2, 2, 1, 1]
    bn_w = torch.cat([d.main[i].weight for i in (3, 6, 9)])
    assert abs(bn_w.mean().item() - 1) < 0.01 and torch.all(torch.cat([d.main[i].bias for i in (3, 6, 9)]) == 0)
    assert abs(d.main[5].weight.std().item() - 0.02) < 0.002
    small = PatchDiscriminator(3, n_layers=1)
    assert [type(m).__name__ for m in small.main] == ["Conv2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU",
                                                      "Conv2d"]
    assert small.main[2].weight.shape == (128, 64, 4, 4)


def test_hinge_d_loss_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert hinge_d_loss(torch.ones(3), -torch.ones(3)).item() == 0.0


# ------------------------------------------------------------------ CLIP consistency
def _tiny_clip(latent_scale=4.6) -> ClipConsistency:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 16, stride=16), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ClipConsistency(encoder, latent_scale=latent_scale)


def test_clip_preprocess_shapes_and_normalisation():
    clip = _tiny_clip()
    assert clip.preprocess(torch.rand(2, 1, 40, 60)).shape == (2, 3, 224, 224)
    assert clip.preprocess(torch.rand(1, 3, 300, 250)).shape == (1, 3, 224, 224)
    t = torch.full((1, 1, 224, 224), 0.5)
    out = clip.preprocess(t)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = (0.5 - mean) / std
    assert torch.allclose(out[0, :, 0, 0], expected)


def test_clip_reconstruction_and_latent_losses():
    clip = _tiny_clip()
    x = _images(size=32)
    assert torch.equal(clip.reconstruction_loss(x, x), torch.zeros(2))
    x_rec = (x + 0.3).requires_grad_(True)
    loss = clip.reconstruction_loss(x, x_rec)
    assert loss.shape == (2,) and (loss > 0).all()
    loss.sum().backward()
    assert x_rec.grad is not None and all(p.grad is None and not p.requires_grad for p in clip.encoder.parameters())

    xg = x.clone().requires_grad_(True)
    feats = torch.randn(2, 3, 8, 8, requires_grad=True)
    lat = clip.latent_loss(xg, feats)
    assert lat.shape == (2,)
    lat.sum().backward()
    assert feats.grad is not None and xg.grad is None
    t = torch.randn(2, 3, 8, 8)
    assert torch.allclose(clip.latent_loss(x, 4.6 * t), _tiny_clip(latent_scale=1.0).latent_loss(x, t), atol=1e-5)

    vol = torch.rand(1, 1, 4, 4, 4) * 2 - 1
    assert torch.equal(clip.reconstruction_loss(vol, vol), torch.zeros(1))
    assert clip.reconstruction_loss(vol, vol * 0.5).shape == (1,)


def test_load_biomedclip_without_open_clip(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ClipWeightsError, match="clip_weight=0"):
        load_biomedclip()


# ------------------------------------------------------------------ stage-1 criterion
def test_loss_config_validation():
    with pytest.raises(ValueError, match="perceptual"):
        LossConfig(perceptual="vgg")
    with pytest.raises(ValueError, match="kl_weight"):
        LossConfig(kl_weight=-1)
    with pytest.raises(ValueError, match="disc_start"):
        LossConfig(disc_start=1.5)
    assert LossConfig().kl_weight == 1e-6 and LossConfig().disc_weight == 0.5 and LossConfig().disc_start == 3125


def _model_and_batch(spatial_dims=2, size=32, batch=2):
    torch.manual_seed(0)
    model = MedVAE(tiny_config(spatial_dims)).train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand((batch, 1) + (size,) * spatial_dims, generator=g) * 2 - 1
    return model, x


class _PooledL1(nn.Module):
    """A cheap frozen stand-in for LPIPS (same call signature and output shape) to keep tests fast."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, 4, 1).requires_grad_(False)

    def forward(self, x, y):
        d = self.proj(nn.functional.avg_pool2d(x, 2)) - self.proj(nn.functional.avg_pool2d(y, 2))
        return d.abs().mean(dim=(1, 2, 3), keepdim=True)


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_stage1_before_disc_start(lpips):
    model, x = _model_and_batch(size=16)
    crit = Stage1Loss(LossConfig(disc_start=10, kl_weight=0.5), in_channels=1, perceptual=lpips)
    out = model(x, sample=True)
    total, logs = crit.generator_loss(x, out.reconstruction, out.posterior, step=9,
                                      last_layer=model.last_layer_weight())
    assert logs["g"] == 0.0 and logs["d_weight"] == 0.0
    kl = (out.posterior.kl().sum() / 2).item()
    assert logs["kl"] == pytest.approx(kl, rel=1e-5)
    assert logs["total"] == pytest.approx(logs["nll"] + 0.5 * kl, rel=1e-5)
    assert set(logs) == {"total", "nll", "rec", "kl", "g", "d_weight", "logvar", "perceptual"}
    total.backward()
    assert all(g is None for g in _grads(crit.discriminator)) and all(g is None for g in _grads(crit.perceptual_loss))
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0 and model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert crit.logvar.grad is None and not crit.logvar.requires_grad
    d_loss, d_logs = crit.discriminator_loss(x, out.reconstruction, step=9)
    assert not crit.discriminator_active(9) and d_loss.item() == 0.0 and not d_loss.requires_grad
    assert d_logs == {"disc": 0.0}


def test_stage1_adaptive_weight_matches_hand_computation():
    model, x = _model_and_batch(size=24)
    perceptual = _PooledL1()
    crit = Stage1Loss(LossConfig(disc_start=5), in_channels=1, perceptual=perceptual)
    out = model(x, sample=True)
    x_rec, last = out.reconstruction, model.last_layer_weight()
    total, logs = crit.generator_loss(x, x_rec, out.posterior, step=5, last_layer=last)
    nll = ((x - x_rec).abs() + perceptual(x, x_rec)).sum() / 2
    g = -crit.discriminator(x_rec).mean()
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    assert logs["nll"] == pytest.approx(nll.item(), rel=1e-5) and logs["g"] == pytest.approx(g.item(), rel=1e-5)
    assert logs["d_weight"] == pytest.approx(0.5 * (gn / (gg + 1e-4)).item(), rel=1e-4)
    total.backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert all(g is None for g in _grads(crit.perceptual_loss))

    crit.discriminator.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    d_loss, d_logs = crit.discriminator_loss(x, x_rec, step=5)
    assert set(d_logs) == {"disc", "logits_real", "logits_fake"} and d_loss.requires_grad
    d_loss.backward()
    assert all(g is not None for g in _grads(crit.discriminator))
    assert all(p.grad is None for p in model.parameters())

    with torch.no_grad():  # validation: no graph, eval mode → weight 0 like the official
        crit.eval()
        _, val_logs = crit.generator_loss(x, x_rec.detach(), out.posterior, step=5, last_layer=last)
    assert val_logs["d_weight"] == 0.0
    crit.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="adaptive"):
        crit.generator_loss(x, x_rec.detach(), out.posterior, step=5, last_layer=last)


def test_stage1_fixed_weight_and_other_perceptual_options():
    model, x = _model_and_batch(size=64, batch=1)
    out = model(x)
    fixed = Stage1Loss(LossConfig(perceptual="ms_ssim", adaptive_disc_weight=False, disc_start=0), in_channels=1)
    _, logs = fixed.generator_loss(x, out.reconstruction, out.posterior, step=0, last_layer=None)
    assert logs["d_weight"] == 1.0 and logs["perceptual"] > 0
    none = Stage1Loss(LossConfig(perceptual="none", disc_start=100), in_channels=1)
    _, logs = none.generator_loss(x, out.reconstruction, out.posterior, step=0, last_layer=None)
    assert none.perceptual_loss is None and logs["perceptual"] == 0.0
    assert logs["rec"] == pytest.approx((x - out.reconstruction).abs().mean().item(), rel=1e-5)


def test_stage1_volumes():
    model, x = _model_and_batch(spatial_dims=3, size=8, batch=1)
    # Fixed adversarial weight: one backward pass instead of three (3D convs are slow on CPU).
    cfg = LossConfig(disc_start=0, disc_layers=1, adaptive_disc_weight=False)
    crit = Stage1Loss(cfg, in_channels=1, perceptual=_PooledL1())
    out = model(x, sample=True)
    total, logs = crit.generator_loss(x, out.reconstruction, out.posterior, step=0, last_layer=None)
    assert torch.isfinite(total) and logs["d_weight"] == 1.0 and logs["perceptual"] > 0 and logs["g"] != 0
    total.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert crit.discriminator.main[0].weight.grad is not None  # the adversarial term reached D through the slices
    crit.discriminator.zero_grad(set_to_none=True)
    d_loss, _ = crit.discriminator_loss(x, out.reconstruction, step=0)
    d_loss.backward()
    assert torch.isfinite(d_loss) and crit.discriminator.main[0].weight.grad is not None


def test_stage1_clip_term_is_added_with_its_weight():
    model, x = _model_and_batch()
    model, x = model.double(), x.double()  # float64: the totals are large next to the term compared
    out = model(x)
    clip = _tiny_clip().double()
    base = Stage1Loss(LossConfig(perceptual="none", disc_start=100), in_channels=1)
    with_clip = Stage1Loss(LossConfig(perceptual="none", disc_start=100, clip_weight=2.0), in_channels=1, clip=clip)
    t0, _ = base.generator_loss(x, out.reconstruction, out.posterior, step=0, last_layer=None)
    t1, logs = with_clip.generator_loss(x, out.reconstruction, out.posterior, step=0, last_layer=None)
    c = clip.reconstruction_loss(x, out.reconstruction)
    assert (t1 - t0).item() == pytest.approx(2.0 * c.sum().item() / 2, rel=1e-9)
    assert logs["clip"] == pytest.approx(c.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="clip_weight"):
        Stage1Loss(LossConfig(perceptual="none"), in_channels=1, clip=clip)
