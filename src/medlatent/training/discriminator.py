"""The patch-based adversarial critic of stage-1 training (paper §3; Isola et al., pix2pix PatchGAN).

Layer order and indices follow the official MedVAE criterion (``NLayerDiscriminator``), so its
checkpoints' ``loss.discriminator.main.*`` tensors load with ``strict=True`` after stripping the prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN: a map of real/fake logits, one per overlapping receptive-field patch (2D only).

    Layers of ``main`` for ``n_layers=3`` (the default): 0 conv s2 (in→64, bias), 1 LeakyReLU;
    2 conv s2 (64→128), 3 BatchNorm, 4 LeakyReLU; 5 conv s2 (128→256), 6 BN, 7 LeakyReLU;
    8 conv s1 (256→512), 9 BN, 10 LeakyReLU; 11 conv s1 (512→1, bias). All convs 4×4, padding 1; the
    convs before a BatchNorm have no bias. A 64×64 input gives a ``B×1×6×6`` logit map; each stride-2
    block halves the size and the two stride-1 convs each remove one pixel, so sides must be at least
    ``3·2^n_layers`` (24 for ``n_layers=3``, 6 for ``n_layers=1``).

    Args:
        in_channels: image channels.
        ndf: width of the first conv; block ``n`` has ``ndf·min(2^n, 8)`` channels.
        n_layers: number of stride-2 convs.
    """

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if in_channels < 1 or ndf < 1 or n_layers < 1:
            raise ValueError(f"in_channels, ndf and n_layers must be positive, got {in_channels}, {ndf}, {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last widening block keeps the resolution
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),  # BatchNorm supplies the shift
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DCGAN init, as the official code: conv weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
        for m in self.main:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×C×H×W`` image → ``B×1×h×w`` logits (high = judged real)."""
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the critic: ``0.5·(mean relu(1 − real) + mean relu(1 + fake))``; a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
