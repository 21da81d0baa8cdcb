"""Start a member of the family as an interpolation codec ("linear-path" initialisation).

Before any training, the network built here is a linear codec: ``M`` linear feature maps of the image travel down
the encoder's main path to the ``C`` latent channels, and the decoder's main path enlarges them back to the image.
Every residual branch and attention block starts as the identity (last convolution zeroed); the convolutions on
the main path — ``conv_in``, the stride-2 downsamplers, the 1×1 shortcuts, the upsampling convolutions,
``conv_out``, ``quant_conv``/``post_quant_conv`` — carry each map as a pair of channels ``(s, −s)``; their other
channels keep random weights (features for the residual branches). Training then learns corrections on top of a
codec that is already close to interpolation quality, instead of learning the identity map from noise.

The kernels of that linear path are fitted first, by least squares on training images (:func:`fit_linear_path`):
a copy of the main path with ``M`` channels (same padding, strides and nearest upsampling), which the full network
then reproduces to float precision.

Two non-linear layers sit on the main path, the last GroupNorm + swish of the encoder and of the decoder. The pairs
cross them linearly:

* GroupNorm: the pair shares its group with constant channels ``±K`` (the biases of the last residual conv
  before the norm). The group mean is then exactly zero and the variance ``(2·E[s²] + n·K²)/g`` is dominated by
  ``K²``, so the norm divides the pair by a near-constant (relative error ``E[s²]/(n·K²)``, below 1e-6 here).
* swish: ``swish(s) − swish(−s) = s·(sigmoid(s) + sigmoid(−s)) = s`` exactly, so the next convolution reads the
  two channels with weights ``+1`` and ``−1``. The pair stays at the image's scale, so Adam's steps on the
  weights that read it do not turn into large output offsets.

Used by ``model.init: codec`` in training configs (``data`` gives the fitting images).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medlatent.model.autoencoder import MedVAE
from medlatent.model.residual_init import zero_init_residual

logger = logging.getLogger(__name__)

#: constant channels that share the GroupNorm group of the image pair
NORM_CONSTANT = 1000.0
#: Adam steps of the least-squares fit (2–3 minutes for 2D crops of 128² on a 2-core CPU)
FIT_STEPS = 1000
#: unit kernels evaluated together when the alternating least squares builds a kernel's design matrix
BASIS_CHUNK = 48


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
    """The kernels of the linear main path, ``out × in × 3×3(×3)`` each.

    ``M`` linear feature maps travel through the encoder's levels; the latent holds ``C`` linear maps; the
    decoder carries ``M`` maps up to its last upsampling, which makes the one output map. ``down[i]`` follows the
    asymmetric (0, 1) padding of :class:`~medlatent.model.layers.Downsample`; ``up[i]`` follows ×2 nearest
    upsampling (decoder order: lowest resolution first).
    """

    spatial_dims: int
    enc_in: torch.Tensor  # M × 1
    down: list[torch.Tensor]  # M × M each
    enc_out: torch.Tensor  # C × M
    dec_in: torch.Tensor  # M × C
    up: list[torch.Tensor]  # M × M each, the last 1 × M
    dec_out: torch.Tensor  # 1 × 1
    history: list[float] = field(default_factory=list)

    @property
    def maps(self) -> int:
        return self.enc_in.shape[0]

    @classmethod
    def interpolation(cls, spatial_dims: int, levels: int, maps: int = 1, latent: int = 1,
                      noise: float = 0.01, seed: int = 0) -> LinearPath:
        """Box averaging down and bilinear (trilinear) up on the first map; the others start as small random
        mixtures (``noise``) so that the fit can put them to use. The starting point of :func:`fit_linear_path`."""
        d, m = spatial_dims, maps
        g = torch.Generator().manual_seed(seed)
        box = torch.zeros((3,) * d)
        box[(slice(0, 2),) * d] = 0.5**d
        lin = _outer([0.25, 0.5, 0.25], d)  # after nearest ×2: taps (¼, ¾) per phase and axis, i.e. bilinear

        def k(out: int, inp: int, base: torch.Tensor) -> torch.Tensor:
            w = noise * torch.randn((out, inp, *(3,) * d), generator=g)
            for i in range(min(out, inp)):
                w[i, i] += base
            return w

        up = [k(m, m, lin) for _ in range(levels - 1)] + [k(1, m, lin)] if levels else []
        return cls(d, k(m, 1, _delta(d)), [k(m, m, box) for _ in range(levels)], k(latent, m, _delta(d)),
                   k(m, latent, _delta(d)), up, k(1, 1, _delta(d)))

    def parameters(self) -> list[torch.Tensor]:
        return [self.enc_in, *self.down, self.enc_out, self.dec_in, *self.up, self.dec_out]

    def _conv(self, x: torch.Tensor, k: torch.Tensor, stride: int = 1, padding: int = 1) -> torch.Tensor:
        conv = F.conv2d if self.spatial_dims == 2 else F.conv3d
        return conv(x, k, stride=stride, padding=padding)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``B×1×…`` image → ``B×C×…/2**levels``: the latent ``z`` of the initialised network."""
        h = self._conv(x, self.enc_in)
        for k in self.down:
            h = self._conv(F.pad(h, (0, 1) * self.spatial_dims), k, stride=2, padding=0)
        return self._conv(h, self.enc_out)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self._conv(z, self.dec_in)
        for k in self.up:
            h = self._conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), k)
        return self._conv(h, self.dec_out)


def fit_linear_path(batches, spatial_dims: int, levels: int, *, maps: int = 1, latent: int = 1,
                    steps: int = 300, lr: float = 1e-2) -> LinearPath:
    """Least-squares fit of the main-path kernels: minimise ``‖decode(encode(x)) − x‖²`` with Adam (cosine
    learning-rate decay).

    Args:
        batches: an iterator of ``B×C×…`` image batches in [-1, 1] (channels are averaged to one).
        levels: downsampling steps (``len(ch_mult) − 1``).
        maps, latent: linear feature maps inside the network (``M``) and in the latent (``C``).
    """
    path = LinearPath.interpolation(spatial_dims, levels, maps, latent)
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


def _layer_design(path: LinearPath, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction's derivative with respect to kernel ``k`` (a tensor of ``path``), one column per weight:
    ``N × k.numel()`` for the ``N`` output values of ``x``. The path is linear in each kernel (no biases), so the
    reconstruction is exactly ``design @ k.flatten()``: evaluate it with each unit kernel (vectorised)."""
    kernels = path.parameters()
    which = next(i for i, t in enumerate(kernels) if t is k)
    n = len(path.down)

    def recon(unit: torch.Tensor) -> torch.Tensor:
        ks = list(kernels)
        ks[which] = unit.view_as(k)
        other = LinearPath(path.spatial_dims, ks[0], ks[1:1 + n], ks[1 + n], ks[2 + n], ks[3 + n:-1], ks[-1])
        return other.decode(other.encode(x)).flatten()

    eye = torch.eye(k.numel(), dtype=k.dtype)
    return torch.func.vmap(recon, chunk_size=BASIS_CHUNK)(eye).T


@torch.no_grad()
def fit_linear_path_als(crops: torch.Tensor, spatial_dims: int, levels: int, *, maps: int = 1, latent: int = 1,
                        max_sweeps: int = 30, als_sweeps: int = 3, tol: float = 1e-5, chunk: int = 4,
                        ridge: float = 1e-7, start: LinearPath | None = None) -> LinearPath:
    """Least-squares fit of the main-path kernels, to convergence: alternating least squares, then joint
    Levenberg–Marquardt steps.

    The reconstruction ``decode(encode(x))`` is linear in each kernel when the others are fixed. The first
    ``als_sweeps`` sweeps give each kernel in turn its exact least-squares solution (normal equations over
    ``crops``, float64, a ``ridge`` relative to their trace for the scale consecutive kernels share). Block
    updates then crawl (the kernels are coupled), so the remaining sweeps solve for all kernels together: the
    Jacobian of the reconstruction is the side-by-side design matrices of the kernels, and a Levenberg–Marquardt
    step on it is accepted only when it lowers the error (else the damping grows). The error never increases;
    the fit stops when a sweep lowers it by less than ``tol`` (relative) or after ``max_sweeps``. ``history``
    holds the mean squared error before the first and after each sweep.

    Args:
        crops: ``N×C×…`` fitting images in [-1, 1] (channels are averaged to one); the fit is exact on them.
        levels: downsampling steps (``len(ch_mult) − 1``).
        maps, latent: linear feature maps inside the network (``M``) and in the latent (``C``).
        start: the path to start from (default: box averaging down, bilinear up); it is updated in place.
    """
    x_all = crops.float().mean(1, keepdim=True).split(chunk)
    path = start or LinearPath.interpolation(spatial_dims, levels, maps, latent)
    kernels = path.parameters()
    path.history = []

    def mse() -> float:
        total = sum(float(((path.decode(path.encode(x)) - x) ** 2).sum()) for x in x_all)
        return total / sum(x.numel() for x in x_all)

    def normal_equations(ks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(AᵀA, Aᵀ(x − recon))`` for the design ``A`` of kernels ``ks`` side by side (for one kernel:
        ``Aᵀx``, as its solution replaces it)."""
        n = sum(k.numel() for k in ks)
        gram = torch.zeros(n, n, dtype=torch.float64)
        rhs = torch.zeros(n, dtype=torch.float64)
        for x in x_all:
            a = torch.cat([_layer_design(path, k, x) for k in ks], 1).double()
            target = x.flatten().double()
            if len(ks) > 1:
                target = target - path.decode(path.encode(x)).flatten().double()
            gram += a.T @ a
            rhs += a.T @ target
        return gram, rhs

    def assign(values: torch.Tensor) -> None:
        for k, v in zip(kernels, values.split([k.numel() for k in kernels])):
            k.copy_(v.view_as(k).to(k.dtype))

    err = mse()
    path.history.append(err)
    damping = 1e-3
    for sweep in range(max_sweeps):
        prev = err
        if sweep < als_sweeps:
            for k in kernels:
                gram, rhs = normal_equations([k])
                gram += ridge * gram.diagonal().mean() * torch.eye(len(rhs), dtype=torch.float64)
                k.copy_(torch.linalg.solve(gram, rhs).view_as(k).to(k.dtype))
            err = mse()
        else:
            gram, rhs = normal_equations(kernels)
            w0 = torch.cat([k.flatten() for k in kernels]).double()
            scale = gram.diagonal() + ridge * gram.diagonal().mean()
            for _ in range(12):  # grow the damping until the step helps
                assign(w0 + torch.linalg.solve(gram + damping * torch.diag(scale), rhs))
                trial = mse()
                if trial < err:
                    err, damping = trial, max(damping / 3, 1e-9)
                    break
                damping *= 10
            else:
                assign(w0)
        path.history.append(err)
        logger.info("codec least squares, sweep %d: mse %.4e", sweep + 1, err)
        if prev - err <= tol * prev:
            break
    return path


def _group_size(channels: int, groups: int, pairs: int, where: str) -> int:
    g = channels // groups
    if g < 2 * pairs + 2 or g % 2:
        raise ValueError(f"codec initialisation needs an even number of channels per GroupNorm group, at least "
                         f"{2 * pairs + 2}, at the {where} ({pairs} linear map(s) and their negatives, plus "
                         "constants); "
                         f"it has {channels} channels in {groups} groups")
    return g


@torch.no_grad()
def _route(conv: nn.Module, kernel: torch.Tensor | None, source: str = "pairs", reserved: range = range(0),
           maps: int = 1) -> None:
    """Make ``conv`` carry the linear maps as pairs: output ``o`` = ``kernel[o]`` applied to the input maps and
    output ``M + o`` its negative, where the input maps are the pairs' positive halves (``source="pairs"``), the
    mean of all input channels (``"image"``) or the first input channels (``"latent"``). ``kernel=None`` is the
    identity on ``maps`` maps (1×1 shortcuts). Nothing else flows into the pairs; ``reserved`` outputs start at
    zero; the other outputs keep their random initialisation (features of the image)."""
    w, b = conv.weight, conv.bias
    if kernel is None:
        kernel = torch.zeros((maps, maps, *w.shape[2:]))
        kernel[range(maps), range(maps)] = 1.0
    kernel = kernel.to(w.dtype)
    mo, mi = kernel.shape[:2]
    w[:2 * mo] = 0
    b[:2 * mo] = 0
    w[reserved.start:reserved.stop] = 0
    b[reserved.start:reserved.stop] = 0
    if source == "image":
        n = w.shape[1]
        w[:mo] = kernel[:, :1] / n
        w[mo:2 * mo] = -kernel[:, :1] / n
    else:
        w[:mo, :mi] = kernel
        w[mo:2 * mo, :mi] = -kernel if source == "latent" else 0
        if source == "pairs":
            w[mo:2 * mo, mi:2 * mi] = kernel


@torch.no_grad()
def _norm_pass(norm: nn.GroupNorm, last_conv: nn.Module, g: int, maps: int) -> None:
    """Constants ±K in channels 2M…g−1 (bias of ``last_conv``), and the norm's scale that gives the pairs back
    their own values."""
    n = g - 2 * maps
    last_conv.bias[2 * maps:g] = NORM_CONSTANT * torch.tensor([1.0, -1.0] * (n // 2))
    norm.weight[:2 * maps] = NORM_CONSTANT * (n / g) ** 0.5  # the group's standard deviation for s = 0
    norm.bias[:2 * maps] = 0.0
    norm.weight[2 * maps:g] = 1.0
    norm.bias[2 * maps:g] = 0.0


@torch.no_grad()
def _read_pairs(conv: nn.Module, kernel: torch.Tensor, g: int) -> None:
    """``conv`` reads the pairs after swish as ``k*swish(s) − k*swish(−s) = k*s`` into its first outputs (one per
    kernel row); nothing reads the constant channels."""
    w, b = conv.weight, conv.bias
    k = kernel.to(w.dtype)
    mo, mi = k.shape[:2]
    w[:, :g] = 0
    w[:mo] = 0
    b[:mo] = 0
    w[:mo, :mi] = k
    w[:mo, mi:2 * mi] = -k


@torch.no_grad()
def init_as_codec(model: MedVAE, path: LinearPath, logvar: float = -14.0) -> MedVAE:
    """Set ``model``'s weights so that it runs ``path`` (see the module docstring): ``z`` (the posterior mean)
    is ``path.encode(x)`` and the decoder returns ``path.decode(z)``.

    Weights off the main path keep their random initialisation; residual branches and attention blocks start as
    the identity. ``logvar`` is the posterior's initial log-variance (small: training samples the posterior).
    """
    cfg = model.config
    m, levels = path.maps, len(cfg.ch_mult) - 1
    if (cfg.spatial_dims, levels, cfg.z_channels, cfg.embed_dim) != (path.spatial_dims, len(path.down),
                                                                       path.enc_out.shape[0], path.enc_out.shape[0]):
        raise ValueError(f"a linear path for {path.spatial_dims}D, {len(path.down)} levels and "
                         f"{path.enc_out.shape[0]} latent channels does not fit the model ({cfg.spatial_dims}D, "
                         f"ch_mult {cfg.ch_mult}, z_channels {cfg.z_channels}, embed_dim {cfg.embed_dim})")
    enc, dec = model.encoder, model.decoder
    widths = [cfg.ch * k for k in cfg.ch_mult]
    top, bottom = widths[-1], widths[0]
    ge = _group_size(top, cfg.norm_groups, m, "encoder output")
    gd = _group_size(bottom, cfg.norm_groups, 1, "decoder output")
    if 2 * m > bottom:
        raise ValueError(f"{m} linear maps need {2 * m} channels; the first level has {bottom}")
    zero_init_residual(model)

    # encoder: conv_in, per level its shortcuts and downsampler; the constants and norm_out; conv_out
    def enc_keep(width: int) -> range:
        return range(2 * m, ge) if width == top else range(0)

    _route(enc.conv_in, path.enc_in, "image", reserved=enc_keep(bottom))
    for level, stage in enumerate(enc.down):
        for block in stage.block:
            if hasattr(block, "nin_shortcut"):
                _route(block.nin_shortcut, None, reserved=enc_keep(widths[level]), maps=m)
        if stage.downsample is not None:  # keeps the level's width
            _route(stage.downsample.conv, path.down[level], reserved=enc_keep(widths[level]))
    _norm_pass(enc.norm_out, enc.mid.block_2.conv2, ge, m)
    c = cfg.z_channels
    enc.conv_out.weight[c:] = 0  # log-variance: constant
    enc.conv_out.bias[c:] = logvar
    _read_pairs(enc.conv_out, path.enc_out, ge)
    for q in (model.quant_conv, model.post_quant_conv):
        q.weight.zero_()
        q.bias.zero_()
        n = min(q.weight.shape[:2])
        q.weight[range(n), range(n)] = 1.0

    # decoder: conv_in reads the latent into M pairs; the last upsampler makes the one output pair
    def dec_keep(width: int, pairs: int) -> range:
        return range(2 * pairs, gd) if width == bottom else range(0)

    _route(dec.conv_in, path.dec_in, "latent", reserved=dec_keep(top, m))
    for level in reversed(range(len(cfg.ch_mult))):
        stage = dec.up[level]
        pairs = 1 if level == 0 else m  # level 0 comes after the last upsampling
        for block in stage.block:
            if hasattr(block, "nin_shortcut"):
                _route(block.nin_shortcut, None, reserved=dec_keep(widths[level], pairs), maps=pairs)
        if stage.upsample is not None:  # keeps the level's width; its output is at level − 1's resolution
            k = path.up[levels - level]
            _route(stage.upsample.conv, k, reserved=dec_keep(widths[level], k.shape[0]))
    _norm_pass(dec.norm_out, dec.up[0].block[-1].conv2, gd, 1)
    _read_pairs(dec.conv_out, path.dec_out.expand(cfg.out_channels, 1, *path.dec_out.shape[2:]), gd)
    return model


def codec_from_data(arch, data, *, seed: int = 0, steps: int = FIT_STEPS, batch: int = 8,
                    maps: int | None = None) -> MedVAE:
    """A new model of architecture ``arch`` initialised as the codec fitted to the training views of ``data``
    (a :class:`~medlatent.training.data.DataConfig`; the same crops, flips and inversions training uses).
    Deterministic given ``seed``, so every rank of a distributed run builds the same weights."""
    from medlatent.training.data import build_datasets

    ds, _ = build_datasets(data, downsample=2 ** (len(arch.ch_mult) - 1), seed=seed)  # the run's held-out split
    rng = torch.Generator().manual_seed(seed)

    def batches():
        for n in itertools.count():
            idx = torch.randint(len(ds), (batch,), generator=rng).tolist()
            yield torch.stack([ds[(i, 10_000 + n * batch + j)]["image"] for j, i in enumerate(idx)])

    maps = maps or arch.z_channels
    path = fit_linear_path(batches(), arch.spatial_dims, len(arch.ch_mult) - 1, maps=maps,
                           latent=arch.z_channels, steps=steps)
    return init_as_codec(MedVAE(arch), path)


__all__ = ["LinearPath", "codec_from_data", "fit_linear_path", "fit_linear_path_als", "init_as_codec"]
