"""Building blocks of the MedVAE encoder/decoder, written once for 2D and 3D.

Every block takes ``spatial_dims`` (2 or 3) and picks ``Conv2d``/``Conv3d`` from a tiny lookup, so the
same code serves both dimensionalities. Attribute names (``norm1``, ``conv1``, ``nin_shortcut``, ``q``,
``k``, ``v``, ``proj_out``, ``conv``) follow the released MedVAE / latent-diffusion weights so that
official state dicts load with ``strict=True``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_CONV: dict[int, type[nn.Conv2d] | type[nn.Conv3d]] = {2: nn.Conv2d, 3: nn.Conv3d}


def conv_nd(spatial_dims: int, *args, **kwargs) -> nn.Conv2d | nn.Conv3d:
    """``nn.Conv2d`` or ``nn.Conv3d`` depending on ``spatial_dims``."""
    try:
        return _CONV[spatial_dims](*args, **kwargs)
    except KeyError:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}") from None


#: normalises a GroupNorm32's input in its place: ``(layer, x) → y`` (see :func:`routed_group_norms`)
GroupNormHook = Callable[["GroupNorm32", torch.Tensor], torch.Tensor]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, eps=1e-6) whose statistics are computed in float32.

    Under bf16/fp16 autocast the mean/variance over large images lose precision; computing the
    normalisation in float32 and casting back keeps reduced-precision inference close to float32.
    In float32 this is exactly ``nn.GroupNorm``.

    ``shared``: state of this layer alone, ``None`` except inside :func:`routed_group_norms`, which sets it to the
    hook that normalises instead (tiled inference with image-wide statistics, :mod:`medlatent.engine.imagenorm`).
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__(num_groups=num_groups, num_channels=num_channels, eps=eps, affine=True)
        self.shared: GroupNormHook | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.shared(self, x)
        if x[0, 0].numel() * (self.num_channels // self.num_groups) == 1:
            # one value per group (a 1-pixel map with a group per channel): PyTorch refuses it, yet the
            # normalised value is exactly 0, so the output is the bias
            return self.bias.to(x.dtype).view(1, -1, *[1] * (x.ndim - 2)).expand_as(x).contiguous()
        if x.dtype == torch.float32:
            return super().forward(x)
        y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


_ROUTING = threading.Lock()


@contextmanager
def routed_group_norms(model: nn.Module, hook: GroupNormHook) -> Iterator[None]:
    """Normalise with ``hook`` in every :class:`GroupNorm32` of ``model`` (itself one, or holding some) for the
    duration of the block.

    The routing is state of these layers only: another model, in this thread or another, is unaffected. One
    routing per model at a time: a second, e.g. two threads running image-wide tiled inference on one model
    instance, is refused rather than mixing their statistics. While routed, every call of ``model`` goes through
    ``hook``, so a routed model must not also be run by another thread (loader threads only preprocess).
    """
    layers = [m for m in model.modules() if isinstance(m, GroupNorm32)]
    with _ROUTING:
        if any(m.shared is not None for m in layers):
            raise RuntimeError("this model's GroupNorm layers are already routed (one image-wide tiled run per "
                               "model instance at a time)")
        for m in layers:
            m.shared = hook
    try:
        yield
    finally:
        for m in layers:
            m.shared = None


def resolve_fused(fused: bool | None) -> bool:
    """``fused`` of a layer, ``None`` (auto) meaning: exactly when autograd is off (see :class:`ResnetBlock`)."""
    return not torch.is_grad_enabled() if fused is None else fused


def swish(x: torch.Tensor, inplace: bool | None = None) -> torch.Tensor:
    """SiLU; ``inplace`` (default: when autograd is off) overwrites ``x``, which saves one activation-sized buffer
    per call but destroys the input that SiLU's gradient needs."""
    return F.silu(x, inplace=resolve_fused(inplace))


class ResnetBlock(nn.Module):
    """GroupNorm → swish → conv3 → GroupNorm → swish → dropout → conv3, plus a (1×1) shortcut.

    ``fused`` chooses the algorithm, not the result: fused, the activations and the residual sum are computed in
    place (one activation-sized buffer fewer each), which autograd cannot differentiate, since SiLU's gradient
    needs its input. ``None`` (default): fused exactly when autograd is off (inference), unfused when it is on
    (training); ``True``/``False`` force one (``True`` only without autograd). The two give identical values.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, dropout: float = 0.0,
                 groups: int = 32) -> None:
        super().__init__()
        self.fused: bool | None = None
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = GroupNorm32(in_channels, groups)
        self.conv1 = conv_nd(spatial_dims, in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = GroupNorm32(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(spatial_dims, out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = conv_nd(spatial_dims, in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = resolve_fused(self.fused)
        h = self.conv1(swish(self.norm1(x), fused))
        h = self.conv2(self.dropout(swish(self.norm2(h), fused)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return h.add_(x) if fused else x + h


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_scores: int | None = None) -> torch.Tensor:
    """Single-head softmax attention over tokens, memory linear in the number of tokens.

    Args:
        q, k, v: ``B×N×C`` token tensors.
        max_scores: process queries in chunks so that at most ``max_scores`` query–key scores exist at once,
            should the backend materialise them. Default: no chunking on CPU (PyTorch's fused flash kernel
            never materialises the scores there), ``2**28`` (1 GiB of float32 scores) on other devices.

    Uses ``scaled_dot_product_attention`` instead of the dense ``N×N`` matrix of the official code; the
    scale is ``C**-0.5`` as in the released models.
    """
    n = k.shape[1]
    if max_scores is None:
        max_scores = n * q.shape[1] if q.device.type == "cpu" else 2**28
    rows = max(1, max_scores // max(n, 1))
    q4, k4, v4 = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)  # B×1×N×C: one head
    if q.shape[1] <= rows:
        return F.scaled_dot_product_attention(q4, k4, v4).squeeze(1)
    out = torch.empty_like(q4)
    for start in range(0, q.shape[1], rows):
        sl = slice(start, start + rows)
        out[:, :, sl] = F.scaled_dot_product_attention(q4[:, :, sl], k4, v4)
    return out.squeeze(1)


class AttnBlock(nn.Module):
    """Self-attention over all spatial positions (the mid-block attention), residual.

    The released models use 1×1 convolutions for q/k/v/proj_out and one head of width C.
    """

    def __init__(self, spatial_dims: int, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = GroupNorm32(channels, groups)
        self.q = conv_nd(spatial_dims, channels, channels, kernel_size=1)
        self.k = conv_nd(spatial_dims, channels, channels, kernel_size=1)
        self.v = conv_nd(spatial_dims, channels, channels, kernel_size=1)
        self.proj_out = conv_nd(spatial_dims, channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c = h.shape[:2]
        spatial = h.shape[2:]
        # B×C×(spatial) → B×N×C tokens
        q, k, v = (t.reshape(b, c, -1).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))
        out = attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, c, *spatial)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3×3 convolution after zero padding of one voxel on the high side of every axis.

    The asymmetric (0, 1) padding is what the released weights were trained with.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.pad = (0, 1) * spatial_dims
        self.conv = conv_nd(spatial_dims, channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


# Per axis, a 3-tap kernel applied after ×2 nearest upsampling reads two low-resolution voxels: output phase 0
# (even voxels) reads offsets (-1, 0) with taps (k0, k1 + k2); phase 1 (odd voxels) reads (0, +1) with (k0 + k1, k2).
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))  # phase × low tap × 3-tap


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """The 3×3(×3) kernel of a convolution applied after ×2 nearest upsampling, as the ``2**d`` equivalent
    2×2(×2) kernels on the low-resolution input, one per output phase, stacked phase-major as output channels."""
    d = weight.ndim - 2
    m = torch.tensor(_PHASE_TAPS, dtype=weight.dtype, device=weight.device)  # 2 × 2 × 3
    if d == 2:
        k = torch.einsum("aik,bjl,ockl->abocij", m, m, weight)
    else:
        k = torch.einsum("aik,bjl,cmn,oqkln->abcoqijm", m, m, m, weight)
    return k.reshape(-1, weight.shape[1], *(2,) * d)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling followed by a 3×3 convolution.

    Fused, the two run as a sub-pixel convolution: each output phase is a 2×2(×2) convolution of the
    low-resolution input, with 4/9 (2D) or 8/27 (3D) of the multiply-adds and no upsampled copy of the input. The
    result equals the unfused one up to float rounding, so ``fused`` (``None``, the default: exactly when autograd
    is off) keeps training on the reference algorithm, whose gradients the released weights were trained with,
    and gives inference the fast one. A convolution wrapped by adapters (``medlatent.model.lora``) has no single
    kernel to split into phases and always runs unfused.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.fused: bool | None = None
        self.conv: nn.Module = conv_nd(spatial_dims, channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        # a subclass (adapters, parametrisations) may not compute with `weight` alone: the reference path
        if resolve_fused(self.fused) and (type(conv) is nn.Conv2d or type(conv) is nn.Conv3d):
            return self._subpixel(x, conv)
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def _subpixel(self, x: torch.Tensor, base: nn.Conv2d | nn.Conv3d) -> torch.Tensor:
        d, w = self.spatial_dims, base.weight
        conv = F.conv2d if d == 2 else F.conv3d
        bias = None if base.bias is None else base.bias.repeat(2**d)
        y = conv(F.pad(x, (1, 1) * d), phase_kernels(w).to(x.dtype), None if bias is None else bias.to(x.dtype))
        y = y.unflatten(1, (*(2,) * d, w.shape[0]))  # B × 2 × 2 (× 2) × C_out × (n+1)…
        size = x.shape[2:]
        last = torch.channels_last if d == 2 else torch.channels_last_3d  # keep the model's layout
        fmt = last if x.is_contiguous(memory_format=last) and not x.is_contiguous() else torch.contiguous_format
        out = torch.empty((x.shape[0], w.shape[0], *(2 * n for n in size)), dtype=y.dtype, device=y.device,
                          memory_format=fmt)
        for phase in itertools.product((0, 1), repeat=d):
            dst = (slice(None), slice(None), *(slice(a, None, 2) for a in phase))
            src = (slice(None), *phase, slice(None), *(slice(a, a + n) for a, n in zip(phase, size)))
            out[dst] = y[src]
        return out


__all__ = [
    "AttnBlock",
    "Downsample",
    "GroupNorm32",
    "ResnetBlock",
    "Upsample",
    "attention",
    "conv_nd",
    "routed_group_norms",
    "swish",
]
