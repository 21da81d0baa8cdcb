"""Start a member of the family as an interpolation codec ("linear-path" initialisation).

Before any training, the network built here stores a low-pass, downsampled copy of the image in latent channel 0
and enlarges it again with learned linear filters. Every residual branch and attention block starts as the
identity (last convolution zeroed), and the convolutions on the main path — ``conv_in``, the stride-2
downsamplers, the 1×1 shortcuts, the upsampling convolutions, ``conv_out``, ``quant_conv``/``post_quant_conv`` —
carry the image as a pair of channels ``(s, −s)``. Training then learns corrections on top of a codec that is
already about as good as interpolation, instead of learning the identity map from noise; the other latent
channels start as random features of the image and are free for detail.

The filters of that linear path are fitted first, by least squares on training images (:func:`fit_linear_path`):
a single-channel copy of the main path (same padding, strides and nearest upsampling), so the full network
reproduces it exactly.

Two non-linear layers sit on the main path, the last GroupNorm + swish of the encoder and of the decoder. The pair
crosses them almost linearly:

* GroupNorm: the pair shares its group with constant channels ``±K`` (the biases of the last residual conv
  before the norm). The group mean is then exactly zero and the variance ``(2·E[s²] + n·K²)/g`` is dominated by
  ``K²``, so the norm divides the pair by a near-constant (relative error ``E[s²]/(n·K²)``, below 1e-4 here).
* swish: the norm's affine shift moves the pair to ``±s + B`` with ``B = 12``, where ``swish(u) = u·sigmoid(u)``
  is the identity to 1e-4. The next convolution reads the two channels with weights ``+½`` and ``−½``, so ``B``
  cancels, in the zero padding at the borders as well.

Used by ``model.init: codec`` in training configs (``data`` gives the fitting images).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medlatent.model.autoencoder import MedVAE

#: constant channels that share the GroupNorm group of the image pair
NORM_CONSTANT = 100.0
#: shift of the pair into swish's linear regime
SWISH_SHIFT = 12.0
#: Adam steps of the least-squares fit (about a minute for 2D 128² crops on a CPU)
FIT_STEPS = 300


def _delta(d: int) -> torch.Tensor:
    k = torch.zeros((3,) * d)
    k[(1,) * d] = 1.0
    return k


def _outer(taps: list[float], d: int) -> torch.Tensor:
    t = torch.tensor(taps)
    k = t
    for _ in range(d - 1):
        k = k[..., None] * t
    return k


@dataclass
class LinearPath:
    """The single-channel kernels of the main path (each ``3×3`` or ``3×3×3``).

    ``down[i]`` follows the asymmetric (0, 1) padding of :class:`~medlatent.model.layers.Downsample`; ``up[i]``
    follows ×2 nearest upsampling (decoder order: lowest resolution first).
    """

    spatial_dims: int
    enc_in: torch.Tensor
    down: list[torch.Tensor]
    enc_out: torch.Tensor
    dec_in: torch.Tensor
    up: list[torch.Tensor]
    dec_out: torch.Tensor
    history: list[float] = field(default_factory=list)

    @classmethod
    def interpolation(cls, spatial_dims: int, levels: int) -> LinearPath:
        """Box averaging down, bilinear (trilinear) up: the starting point of the fit."""
        d = spatial_dims
        box = torch.zeros((3,) * d)
        box[(slice(0, 2),) * d] = 0.5**d
        lin = _outer([0.25, 0.5, 0.25], d)  # after nearest ×2: taps (¼, ¾) per phase and axis, i.e. bilinear
        return cls(d, _delta(d), [box.clone() for _ in range(levels)], _delta(d), _delta(d),
                   [lin.clone() for _ in range(levels)], _delta(d))

    def parameters(self) -> list[torch.Tensor]:
        return [self.enc_in, *self.down, self.enc_out, self.dec_in, *self.up, self.dec_out]

    def _conv(self, x: torch.Tensor, k: torch.Tensor, stride: int = 1, padding: int = 1) -> torch.Tensor:
        conv = F.conv2d if self.spatial_dims == 2 else F.conv3d
        return conv(x, k[None, None], stride=stride, padding=padding)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``B×1×…`` image → ``B×1×…/2**levels`` (what latent channel 0 holds at initialisation)."""
        h = self._conv(x, self.enc_in)
        for k in self.down:
            h = self._conv(F.pad(h, (0, 1) * self.spatial_dims), k, stride=2, padding=0)
        return self._conv(h, self.enc_out)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self._conv(z, self.dec_in)
        for k in self.up:
            h = self._conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), k)
        return self._conv(h, self.dec_out)


def fit_linear_path(batches, spatial_dims: int, levels: int, steps: int = 300, lr: float = 2e-3) -> LinearPath:
    """Least-squares fit of the main-path kernels: minimise ``‖decode(encode(x)) − x‖²`` with Adam.

    Args:
        batches: an iterator of ``B×C×…`` image batches in [-1, 1] (channels are averaged to one).
        levels: downsampling steps (``len(ch_mult) − 1``).
    """
    path = LinearPath.interpolation(spatial_dims, levels)
    params = path.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(steps):
            x = next(batches).float().mean(1, keepdim=True)
            loss = F.mse_loss(path.decode(path.encode(x)), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            path.history.append(loss.item())
    for p in params:
        p.requires_grad_(False)
    return path


def _group_size(channels: int, groups: int, where: str) -> int:
    g = channels // groups
    if g < 4 or g % 2:
        raise ValueError(f"codec initialisation needs an even number (≥ 4) of channels per GroupNorm group at the "
                         f"{where}; it has {channels} channels in {groups} groups")
    return g


@torch.no_grad()
def _route(conv: nn.Module, kernel: torch.Tensor | None, source: str = "pair", reserved: range = range(0)) -> None:
    """Make ``conv`` carry the pair: outputs 0/1 = ``±kernel`` applied to inputs 0/1 (``source="pair"``), to the
    mean of all inputs (``"mean"``: the image's channels) or to input 0 (``"first"``: latent channel 0). Nothing
    else flows into the pair; ``reserved`` outputs start at zero. The other outputs keep their random
    initialisation (features of the image, pair included)."""
    w, b = conv.weight, conv.bias
    w[:2] = 0
    b[:2] = 0
    w[reserved.start:reserved.stop] = 0
    b[reserved.start:reserved.stop] = 0
    if kernel is None:  # 1×1 shortcut: identity on the pair
        kernel = torch.ones((1,) * (w.ndim - 2))
    kernel = kernel.to(w.dtype).reshape(w.shape[2:])
    if source == "pair":
        w[0, 0] = kernel
        w[1, 1] = kernel
    elif source == "first":
        w[0, 0] = kernel
        w[1, 0] = -kernel
    else:
        n = w.shape[1]
        w[0, :] = kernel / n
        w[1, :] = -kernel / n


@torch.no_grad()
def _norm_pass(norm: nn.GroupNorm, last_conv: nn.Module, g: int) -> None:
    """Constants ±K in channels 2…g−1 (bias of ``last_conv``), and the norm's affine map that sends the pair to
    ``±s + B``."""
    n = g - 2
    signs = torch.tensor([1.0, -1.0] * (n // 2))
    last_conv.bias[2:g] = NORM_CONSTANT * signs
    sigma = NORM_CONSTANT * (n / g) ** 0.5  # the group's standard deviation for s = 0
    norm.weight[:2] = sigma
    norm.bias[:2] = SWISH_SHIFT
    norm.weight[2:g] = 1.0
    norm.bias[2:g] = 0.0


@torch.no_grad()
def _read_pair(conv: nn.Module, kernel: torch.Tensor, rows: range, g: int) -> None:
    """``conv`` reads the shifted pair as ``½·k*(s + B) − ½·k*(−s + B) = k*s`` into ``rows``; the constant
    channels are read by nothing."""
    w, b = conv.weight, conv.bias
    w[:, :g] = 0
    k = kernel.to(w.dtype).reshape(w.shape[2:])
    for r in rows:
        w[r] = 0
        w[r, 0] = 0.5 * k
        w[r, 1] = -0.5 * k
        b[r] = 0


@torch.no_grad()
def init_as_codec(model: MedVAE, path: LinearPath, logvar: float = -14.0) -> MedVAE:
    """Set ``model``'s weights so that it runs ``path`` on latent channel 0 (see the module docstring).

    Weights off the main path keep their random initialisation; residual branches and attention blocks start as
    the identity. ``logvar`` is the posterior's initial log-variance (small: training samples the posterior).
    """
    from medlatent.training.build import zero_init_residual

    cfg = model.config
    if cfg.spatial_dims != path.spatial_dims or len(cfg.ch_mult) - 1 != len(path.down):
        raise ValueError(f"linear path for {path.spatial_dims}D with {len(path.down)} levels does not fit the model "
                         f"({cfg.spatial_dims}D, ch_mult {cfg.ch_mult})")
    enc, dec = model.encoder, model.decoder
    top = cfg.ch * cfg.ch_mult[-1]
    bottom = cfg.ch * cfg.ch_mult[0]
    ge = _group_size(top, cfg.norm_groups, "encoder output")
    gd = _group_size(bottom, cfg.norm_groups, "decoder output")
    zero_init_residual(model)

    # encoder: conv_in, per level its shortcuts and downsampler, then the constants before norm_out
    _route(enc.conv_in, path.enc_in, "mean", reserved=range(2, ge) if cfg.ch == top else range(0))
    for level, stage in enumerate(enc.down):
        width = cfg.ch * cfg.ch_mult[level]
        keep = range(2, ge) if width == top else range(0)
        for block in stage.block:
            if hasattr(block, "nin_shortcut"):
                _route(block.nin_shortcut, None, reserved=keep)
        if hasattr(stage, "downsample"):  # keeps the level's width
            _route(stage.downsample.conv, path.down[level], reserved=keep)
    _norm_pass(enc.norm_out, enc.mid.block_2.conv2, ge)
    c = cfg.z_channels
    enc.conv_out.weight[:, :ge] = 0
    enc.conv_out.weight[c:] = 0
    enc.conv_out.bias[c:] = logvar
    _read_pair(enc.conv_out, path.enc_out, range(1), ge)
    for q in (model.quant_conv, model.post_quant_conv):
        q.weight.zero_()
        q.bias.zero_()
        n = min(q.weight.shape[:2])
        q.weight[range(n), range(n)] = 1.0

    # decoder: conv_in reads latent channel 0 into the pair; upsamplers and shortcuts carry it
    keep_dec = range(2, gd)
    _route(dec.conv_in, path.dec_in, "first", reserved=keep_dec if top == bottom else range(0))
    for level in reversed(range(len(cfg.ch_mult))):
        stage = dec.up[level]
        keep = keep_dec if cfg.ch * cfg.ch_mult[level] == bottom else range(0)
        for block in stage.block:
            if hasattr(block, "nin_shortcut"):
                _route(block.nin_shortcut, None, reserved=keep)
        if hasattr(stage, "upsample"):  # keeps the level's width
            _route(stage.upsample.conv, path.up[len(cfg.ch_mult) - 1 - level], reserved=keep)
    _norm_pass(dec.norm_out, dec.up[0].block[-1].conv2, gd)
    _read_pair(dec.conv_out, path.dec_out, range(cfg.out_channels), gd)
    return model


def codec_from_data(arch, data, *, seed: int = 0, steps: int = FIT_STEPS, batch: int = 8) -> MedVAE:
    """A new model of architecture ``arch`` initialised as the codec fitted to the training views of ``data``
    (a :class:`~medlatent.training.data.DataConfig`; the same crops, flips and inversions training uses).
    Deterministic given ``seed``, so every rank of a distributed run builds the same weights."""
    from medlatent.training.data import build_datasets

    ds, _ = build_datasets(data, downsample=2 ** (len(arch.ch_mult) - 1))
    rng = torch.Generator().manual_seed(seed)

    def batches():
        for n in itertools.count():
            idx = torch.randint(len(ds), (batch,), generator=rng).tolist()
            yield torch.stack([ds[(i, 10_000 + n * batch + j)]["image"] for j, i in enumerate(idx)])

    path = fit_linear_path(batches(), arch.spatial_dims, len(arch.ch_mult) - 1, steps=steps)
    return init_as_codec(MedVAE(arch), path)


__all__ = ["LinearPath", "codec_from_data", "fit_linear_path", "init_as_codec"]
