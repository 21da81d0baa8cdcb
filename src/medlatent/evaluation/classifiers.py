"""CAD classifiers used to judge latent quality (paper §4.1, App. B.1).

The paper trains HRNet-w64 (timm) on 2D inputs and MONAI's SEResNet-152 on 3D inputs, the same network on
high-resolution images, interpolated images and latents, with no architectural change. ``tiny`` is a small
N-D CNN written here for tests and CPU smoke runs. Each family member is declared once in
:data:`CLASSIFIERS`; unknown names answer with the closest valid ones.

Every classifier maps ``B×in_channels×H×W`` (2D) or ``B×in_channels×D×H×W`` (3D) to logits
``B×num_classes`` (binary tasks use ``num_classes=1`` and a sigmoid, as in the paper).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medlatent.names import did_you_mean

EVAL_EXTRA = "pip install 'medlatent[eval]'"
PAPER_CLASSIFIER = {2: "hrnet_w64", 3: "seresnet152"}  # App. B.1


@dataclass(frozen=True)
class ClassifierInfo:
    """One classifier family member.

    Attributes:
        name: the registry name.
        spatial_dims: the dimensionalities it supports.
        build: ``(spatial_dims, in_channels, num_classes, pretrained) → nn.Module``.
        source: where the implementation comes from (for reports).
    """

    name: str
    spatial_dims: tuple[int, ...]
    build: Callable[[int, int, int, bool], nn.Module]
    source: str


# ------------------------------------------------------------------------------------------ tiny
_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class TinyCNN(nn.Module):
    """A small N-D CNN: ``depth`` conv–BN–ReLU blocks (stride 2 after the first), then global average and
    global max pooling concatenated (max pooling keeps small bright findings visible) and a linear head.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: logits out (1 for binary tasks).
        width: channels of the first block (doubled at each stride-2 block).
        depth: number of conv blocks.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv, norm = _CONV[spatial_dims], _NORM[spatial_dims]
        layers: list[nn.Module] = []
        ch_in = in_channels
        for i in range(depth):
            ch_out = width * 2 ** max(0, i - 1)
            layers += [conv(ch_in, ch_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       norm(ch_out), nn.ReLU(inplace=True)]
            ch_in = ch_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * ch_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(2)
        return self.head(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1))


def _tiny(spatial_dims: int, in_channels: int, num_classes: int, pretrained: bool) -> nn.Module:
    if pretrained:
        raise ValueError("the 'tiny' classifier has no pretrained weights")
    return TinyCNN(spatial_dims, in_channels, num_classes)


# ------------------------------------------------------------------------------------------ paper networks
class PadToMultiple(nn.Module):
    """Replicate-pad the spatial axes up to a multiple of ``multiple`` before ``net``.

    HRNet fuses branches at strides 4…32 by adding upsampled maps, which fails unless every side is a multiple
    of 32; latents of small images (e.g. 16² for a 64² patch at f=16) are not.
    """

    def __init__(self, net: nn.Module, multiple: int) -> None:
        super().__init__()
        self.net = net
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad: list[int] = []
        for n in reversed(x.shape[2:]):
            pad += [0, -n % self.multiple]
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        return self.net(x)


def _hrnet_w64(spatial_dims: int, in_channels: int, num_classes: int, pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise ImportError(f"the 'hrnet_w64' classifier needs timm: {EVAL_EXTRA}") from e
    # timm adapts the pretrained stem to in_channels (sums/repeats the RGB filters)
    net = timm.create_model("hrnet_w64", pretrained=pretrained, in_chans=in_channels, num_classes=num_classes)
    return PadToMultiple(net, 32)


def _seresnet152(spatial_dims: int, in_channels: int, num_classes: int, pretrained: bool) -> nn.Module:
    try:
        from monai.networks.nets import SEResNet152
    except ImportError as e:
        raise ImportError(f"the 'seresnet152' classifier needs MONAI: {EVAL_EXTRA}") from e
    if pretrained:
        raise ValueError("MONAI's SEResNet-152 has no pretrained weights for medical volumes; drop pretrained")
    return SEResNet152(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes)


CLASSIFIERS: dict[str, ClassifierInfo] = {
    info.name: info
    for info in (
        ClassifierInfo("tiny", (2, 3), _tiny, "medlatent TinyCNN (tests, CPU smoke runs)"),
        ClassifierInfo("hrnet_w64", (2,), _hrnet_w64, "timm hrnet_w64 (paper: 2D CAD)"),
        ClassifierInfo("seresnet152", (2, 3), _seresnet152, "MONAI SEResNet152 (paper: 3D CAD)"),
    )
}


def list_classifiers() -> list[str]:
    return sorted(CLASSIFIERS)


def get_classifier_info(name: str) -> ClassifierInfo:
    """Look up a classifier; unknown names answer with the closest valid names."""
    try:
        return CLASSIFIERS[name]
    except KeyError:
        raise ValueError(f"unknown classifier {name!r}.{did_you_mean(name, CLASSIFIERS)} "
                         f"Available: {', '.join(list_classifiers())}") from None


def build_classifier(name: str, spatial_dims: int, in_channels: int, num_classes: int,
                     pretrained: bool = False) -> nn.Module:
    """Build a CAD classifier.

    Args:
        name: ``"hrnet_w64"`` (timm, 2D; the paper's 2D network), ``"seresnet152"`` (MONAI; the paper's 3D
            network) or ``"tiny"``.
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for images and channel-averaged 2D latents; ``C`` for 3D latents).
        num_classes: logits out; 1 for binary tasks (sigmoid + BCE, as in the paper).
        pretrained: load ImageNet weights (``hrnet_w64`` only; downloads through timm).

    Raises:
        ValueError: unknown name, unsupported dimensionality, or non-positive sizes.
        ImportError: the optional dependency (timm/MONAI) is missing; the message says what to install.
    """
    info = get_classifier_info(name)
    if spatial_dims not in info.spatial_dims:
        other = [n for n, i in CLASSIFIERS.items() if spatial_dims in i.spatial_dims]
        raise ValueError(f"classifier {name!r} supports {'/'.join(map(str, info.spatial_dims))}D inputs, not "
                         f"{spatial_dims}D; use one of {', '.join(other)}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be ≥ 1, got {in_channels} and {num_classes}")
    return info.build(spatial_dims, in_channels, num_classes, pretrained)
