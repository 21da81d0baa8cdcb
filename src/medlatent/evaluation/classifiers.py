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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medlatent.names import did_you_mean
from medlatent.optional import PRETRAINED_EXTRA, import_optional

EVAL_EXTRA = "pip install 'medlatent[eval]'"
PAPER_CLASSIFIER = {2: "hrnet_w64", 3: "seresnet152"}  # App. B.1


class PretrainedWeightsError(ValueError):
    """Pretrained classifier weights cannot be had; the one-line message says how to provide them."""


@dataclass(frozen=True)
class HubWeights:
    """Where a classifier's pretrained weights live on the Hugging Face Hub (what timm downloads)."""

    name: str
    repo_id: str
    filename: str


@dataclass(frozen=True)
class ClassifierInfo:
    """One classifier family member.

    Attributes:
        name: the registry name.
        spatial_dims: the dimensionalities it supports.
        build: ``(spatial_dims, in_channels, num_classes, weights) → nn.Module``; ``weights`` is a local file of
            pretrained weights or ``None`` (random initialisation).
        source: where the implementation comes from (for reports).
        needs: the optional module it imports and how to install it, checked before any work starts.
        pretrained: its pretrained weights on the Hub (``None``: it has none).
    """

    name: str
    spatial_dims: tuple[int, ...]
    build: Callable[[int, int, int, "Path | None"], nn.Module]
    source: str
    needs: tuple[str, str] | None = None
    pretrained: HubWeights | None = None


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


def _tiny(spatial_dims: int, in_channels: int, num_classes: int, weights: Path | None) -> nn.Module:
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


def _hrnet_w64(spatial_dims: int, in_channels: int, num_classes: int, weights: Path | None) -> nn.Module:
    import timm

    # from a local file only: resolve_pretrained has found it (timm would otherwise retry the Hub at length);
    # timm adapts the pretrained stem to in_channels (sums/repeats the RGB filters) and drops the ImageNet head
    overlay = {"file": str(weights)} if weights is not None else None
    try:
        net = timm.create_model("hrnet_w64", pretrained=weights is not None, pretrained_cfg_overlay=overlay,
                                in_chans=in_channels, num_classes=num_classes)
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        if weights is None:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedWeightsError(f"{weights}: not hrnet_w64 ImageNet weights timm can load ({first})") from e
    return PadToMultiple(net, 32)


def _seresnet152(spatial_dims: int, in_channels: int, num_classes: int, weights: Path | None) -> nn.Module:
    from monai.networks.nets import SEResNet152

    return SEResNet152(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes)


CLASSIFIERS: dict[str, ClassifierInfo] = {
    info.name: info
    for info in (
        ClassifierInfo("tiny", (2, 3), _tiny, "medlatent's TinyCNN, for tests and CPU smoke runs"),
        ClassifierInfo("hrnet_w64", (2,), _hrnet_w64, "HRNet-w64 from timm, the paper's 2D CAD network",
                       needs=("timm", PRETRAINED_EXTRA),
                       pretrained=HubWeights("hrnet_w64", "timm/hrnet_w64.ms_in1k", "model.safetensors")),
        ClassifierInfo("seresnet152", (2, 3), _seresnet152, "SEResNet-152 from MONAI, the paper's 3D CAD network",
                       needs=("monai", EVAL_EXTRA)),
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


def check_classifier(name: str, spatial_dims: int, pretrained: bool = False,
                     weights: str | Path | None = None) -> Path | None:
    """Everything a classifier needs, checked before any input is prepared: its dimensionality, its optional
    dependency and, with ``pretrained``, a local file of its weights (:func:`resolve_pretrained`).

    Returns:
        The weights file (``None`` without ``pretrained``).

    Raises:
        ValueError: unknown name, unsupported dimensionality, or no pretrained weights for this classifier.
        ImportError: the optional dependency is missing; the message says how to install it.
        PretrainedWeightsError: the weights are neither at ``weights``, nor cached, nor downloadable.
    """
    info = get_classifier_info(name)
    if spatial_dims not in info.spatial_dims:
        other = [n for n, i in CLASSIFIERS.items() if spatial_dims in i.spatial_dims]
        raise ValueError(f"classifier {name!r} supports {'/'.join(map(str, info.spatial_dims))}D inputs, not "
                         f"{spatial_dims}D; use one of {', '.join(other)}")
    if info.needs is not None:  # missing, or installed but broken (a torchvision built for another torch)
        module, install = info.needs
        import_optional(module, f"the {name!r} classifier ({info.source})",
                        f"{install}, or use --classifier tiny, which needs nothing")
    if weights is not None and not pretrained:
        raise ValueError("pretrained weights were given without pretrained (--pretrained)")
    return resolve_pretrained(name, weights) if pretrained else None


def resolve_pretrained(name: str, weights: str | Path | None = None) -> Path:
    """A local file of ``name``'s pretrained weights: ``weights`` when given, else the Hugging Face cache
    (where timm keeps them), else a download — one short request, never timm's minute of retries.

    Offline (``HF_HUB_OFFLINE=1``) with an empty cache, or with the Hub unreachable, this fails at once with a
    one-line :class:`PretrainedWeightsError` naming the repository and file and the ways to provide them.
    """
    info = get_classifier_info(name)
    hub = info.pretrained
    if hub is None:
        raise ValueError(f"the {name!r} classifier has no pretrained weights; drop --pretrained")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(f"{path}: no such file; give the {hub.filename} of {hub.repo_id} "
                                         "(pretrained weights of " + name + ")")
        return path
    from medlatent.hub import WeightsNotFoundError, hub_download

    try:
        return hub_download(hub, hub.filename)  # type: ignore[arg-type] - needs only .name and .repo_id
    except WeightsNotFoundError as e:
        raise PretrainedWeightsError(
            f"--pretrained: {e.summary}. Either download it where the Hub is reachable "
            f"(`{e.download_command}`) and pass the file with --pretrained-weights FILE, or run once online "
            "without HF_HUB_OFFLINE so that it lands in the Hugging Face cache (HF_HOME), or drop --pretrained"
        ) from e


def build_classifier(name: str, spatial_dims: int, in_channels: int, num_classes: int,
                     pretrained: bool = False, weights: str | Path | None = None) -> nn.Module:
    """Build a CAD classifier.

    Args:
        name: ``"hrnet_w64"`` (timm, 2D; the paper's 2D network), ``"seresnet152"`` (MONAI; the paper's 3D
            network) or ``"tiny"``.
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for images and channel-averaged latents; ``C`` for all latent channels).
        num_classes: logits out; 1 for binary tasks (sigmoid + BCE, as in the paper).
        pretrained: load ImageNet weights (``hrnet_w64`` only), from ``weights`` or the Hugging Face cache
            (see :func:`resolve_pretrained`).
        weights: a local file of those weights.

    Raises:
        ValueError: unknown name, unsupported dimensionality, or non-positive sizes.
        ImportError: the optional dependency (timm/MONAI) is missing; the message says what to install.
        PretrainedWeightsError: pretrained weights cannot be had or loaded.
    """
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be ≥ 1, got {in_channels} and {num_classes}")
    file = check_classifier(name, spatial_dims, pretrained, weights)
    return get_classifier_info(name).build(spatial_dims, in_channels, num_classes, file)
