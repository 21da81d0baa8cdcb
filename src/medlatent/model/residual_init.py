"""Starting residual branches as the identity (SkipInit/Fixup): shared by the training layer's random
initialisation (``model.zero_init_residual``) and its codec initialisation, which both build on it."""

from __future__ import annotations

import torch
from torch import nn

from medlatent.model.layers import AttnBlock, ResnetBlock


@torch.no_grad()
def zero_init_residual(model: nn.Module) -> None:
    """Zero the last conv of every residual branch, so each block starts as the identity (SkipInit/Fixup)."""
    for block in model.modules():
        last = block.conv2 if isinstance(block, ResnetBlock) else block.proj_out if isinstance(block, AttnBlock) \
            else None
        if last is not None:
            last.weight.zero_()
            if last.bias is not None:  # always there (conv_nd's default); for the type checker
                last.bias.zero_()
