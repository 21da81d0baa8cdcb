"""Rank-r LoRA adapters inside convolutions, in the key layout of the released MedVAE weights.

A wrapped layer ``<name>`` becomes ``<name>.conv`` (the frozen base conv), ``<name>.lora_down`` (a conv
with the base kernel, ``in → r``) and ``<name>.lora_up`` (1×1, ``r → out``, zero-initialised), computing
``conv(x) + scale · lora_up(dropout(lora_down(x)))``. Used to train the multi-channel members from a
natural-image VAE (paper §3, stage 1); :func:`merge_lora_modules` folds them back for inference.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from medlatent.model.layers import AttnBlock, ResnetBlock, conv_nd


def merged_weight(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``W + scale · up ∘ down``: an adapter folded into the weight it wraps, summed in float64 and returned in
    ``weight``'s dtype. ``weight`` is ``out×in×k…``, ``down`` ``r×in×k…`` and ``up`` ``out×r×1…``."""
    r = down.shape[0]
    delta = up.reshape(up.shape[0], r).double() @ down.reshape(r, -1).double()
    return (weight.double() + scale * delta.reshape(weight.shape)).to(weight.dtype)


class LoRAConv(nn.Module):
    """A convolution plus a trainable low-rank update."""

    def __init__(self, base: nn.Conv2d | nn.Conv3d, rank: int = 4, dropout: float = 0.1, scale: float = 1.0) -> None:
        super().__init__()
        if rank < 1 or rank > min(base.in_channels, base.out_channels):
            raise ValueError(f"LoRA rank must be in [1, {min(base.in_channels, base.out_channels)}], got {rank}")
        dims = base.weight.ndim - 2
        self.conv = base
        self.lora_down = conv_nd(dims, base.in_channels, rank, kernel_size=base.kernel_size, stride=base.stride,
                                 padding=base.padding, dilation=base.dilation, bias=False)
        self.lora_up = conv_nd(dims, rank, base.out_channels, kernel_size=1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.normal_(self.lora_down.weight, std=1.0 / rank)
        nn.init.zeros_(self.lora_up.weight)  # the wrapped model starts exactly as the base model
        self.lora_down.to(base.weight)
        self.lora_up.to(base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.scale * self.lora_up(self.dropout(self.lora_down(x)))

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """A plain conv whose weight includes the update."""
        w = self.conv.weight
        conv = conv_nd(w.ndim - 2, self.conv.in_channels, self.conv.out_channels, kernel_size=self.conv.kernel_size,
                       stride=self.conv.stride, padding=self.conv.padding, dilation=self.conv.dilation,
                       bias=self.conv.bias is not None).to(w)
        conv.weight.copy_(merged_weight(w, self.lora_down.weight, self.lora_up.weight, self.scale))
        if self.conv.bias is not None:
            cast(torch.Tensor, conv.bias).copy_(self.conv.bias)
        return conv


def inject_lora(model: nn.Module, rank: int = 4, dropout: float = 0.1) -> list[nn.Parameter]:
    """Wrap every conv of every ResnetBlock and AttnBlock in :class:`LoRAConv`, freeze everything else.

    Returns the trainable adapter parameters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for block in [m for m in model.modules() if isinstance(m, (ResnetBlock, AttnBlock))]:
        for name, child in list(block.named_children()):
            if isinstance(child, (nn.Conv2d, nn.Conv3d)):
                wrapped = LoRAConv(child, rank=rank, dropout=dropout)
                setattr(block, name, wrapped)
                params += [cast(nn.Parameter, wrapped.lora_down.weight), cast(nn.Parameter, wrapped.lora_up.weight)]
    return params


def merge_lora_modules(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRAConv` by its merged plain conv (in place); returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRAConv):
                setattr(parent, name, child.merged())
    return model
