"""Perceptual distances for stage-1 training (paper §3, "Stage 1"), and the per-slice rule for volumes.

* :class:`LPIPS` — the learned perceptual distance of Zhang et al. (2018) on a VGG16 trunk written out by
  hand (no torchvision), with the state-dict layout of the official MedVAE / taming-transformers criterion
  (``net.sliceK.N.*``, ``linK.model.1.weight``, ``scaling_layer.*``), so their weights load unchanged.
* :func:`load_lpips` — LPIPS with weights from a local file or, when available, the ``lpips`` and
  ``torchvision`` packages; fails with :class:`PerceptualWeightsError` saying what to do otherwise.
* :class:`MSSSIMLoss` — 1 − MS-SSIM, an offline alternative that needs no pretrained weights.
* :func:`over_slices` — a 2D loss applied to every slice of a volume along all three axes (paper §3,
  "Stage 2", 3D): the slices of one axis are folded into the batch instead of looped over.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from medlatent.metrics import MS_SSIM_BETAS, ms_ssim_scales, ms_ssim_window
from medlatent.optional import PRETRAINED_EXTRA, OptionalDependencyError, import_optional

logger = logging.getLogger(__name__)

# VGG16 ``features``: conv widths with "M" for a 2×2 max-pool, in torchvision's index order (0…29).
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: slice k holds features[start_k:start_{k+1}].
_SLICE_STARTS = (0, 4, 9, 16, 23, 30)
_TAP_CHANNELS = (64, 128, 256, 512, 512)

_HELP = (
    "Options: pass a local LPIPS weights file in medlatent's layout (net.sliceK.N.*, linK.model.1.weight; "
    ".pth/.pt/.safetensors) with loss.lpips_weights=PATH; install the `lpips` package (it brings torchvision: "
    "pip install 'medlatent[pretrained]' with a torchvision matching your torch) and allow one download of the "
    "VGG16 ImageNet weights; or choose the offline perceptual loss loss.perceptual=ms_ssim (no pretrained weights "
    "needed)."
)


class PerceptualWeightsError(RuntimeError):
    """Pretrained LPIPS weights cannot be obtained or do not fit; the message lists the ways out."""


class _ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the ImageNet statistics the VGG trunk was trained with (LPIPS constants)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class _VGG16Trunk(nn.Module):
    """VGG16 conv features up to relu5_3, split into the five LPIPS slices (torchvision's indices kept)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, item, kernel_size=3, padding=1), nn.ReLU()]
                in_ch = item
        for k in range(5):
            part = nn.Sequential()
            for i in range(_SLICE_STARTS[k], _SLICE_STARTS[k + 1]):
                part.add_module(str(i), layers[i])  # index names give the keys ``sliceK.N``
            setattr(self, f"slice{k + 1}", part)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            taps.append(x)
        return taps


class _LinearHead(nn.Module):
    """Per-channel weighting of squared feature differences: Dropout (index 0, as trained) + 1×1 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


class LPIPS(nn.Module):
    """Learned perceptual image patch similarity with a VGG16 trunk (Zhang et al., 2018).

    Frozen and always in eval mode (``train()`` does not switch it, so the heads' dropout never fires);
    gradients flow to the inputs only. Built directly it has random weights: the trunk gets PyTorch's
    default init and each head weighs channels equally (1/C), which keeps distances non-negative — fine
    for tests, meaningless for training. Use :func:`load_lpips` for pretrained weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _VGG16Trunk()
        for k, ch in enumerate(_TAP_CHANNELS):
            head = _LinearHead(ch)
            nn.init.constant_(head.model[1].weight, 1.0 / ch)
            setattr(self, f"lin{k}", head)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LPIPS:
        return self  # frozen metric network: stays in eval mode whatever the surrounding module does

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance between two image batches.

        Args:
            x, y: ``B×C×H×W`` in [-1, 1] with C = 1 (repeated to 3) or 3; H, W ≥ 16 (four max-pools).

        Returns:
            ``B×1×1×1`` distances (0 for identical images).
        """
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"LPIPS takes two B×C×H×W batches with C in (1, 3), got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        b = x.shape[0]
        # One pass through the trunk for both batches: half the kernel launches.
        taps = self.net(self.scaling_layer(torch.cat([x, y])))
        total = 0.0
        for k, feat in enumerate(taps):
            fx, fy = _unit_channels(feat[:b]), _unit_channels(feat[b:])
            head = getattr(self, f"lin{k}").model
            total = total + head((fx - fy) ** 2).mean(dim=(2, 3), keepdim=True)
        return total


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale each feature vector (over channels) to unit length, as LPIPS does."""
    return f / (torch.sqrt((f**2).sum(dim=1, keepdim=True)) + eps)


def load_lpips(weights: str | Path | None = "auto") -> LPIPS:
    """An :class:`LPIPS` network with pretrained weights.

    Args:
        weights: path to a state dict in this module's layout (``.pth``/``.pt`` read with
            ``torch.load(weights_only=True)``, or ``.safetensors``; a full dict or one nested under
            ``"state_dict"``); ``"auto"`` to assemble it from the ``lpips`` package's heads
            (``weights/v0.1/vgg.pth``) and torchvision's ImageNet VGG16 trunk; ``None`` for random weights
            (tests only — a warning is logged).

    Raises:
        PerceptualWeightsError: packages or downloads unavailable for ``"auto"``, the file is missing, or
            its keys do not match exactly (missing and unexpected keys are listed).
    """
    model = LPIPS()
    if weights is None:
        logger.warning("LPIPS with random weights: only meaningful for tests")
        return model
    if str(weights) == "auto":
        state, source = _state_from_packages(model), "the lpips + torchvision packages"
    else:
        state, source = _read_state_dict(Path(weights)), str(weights)
    _load_exact(model, state, source)
    logger.info("LPIPS weights loaded from %s", source)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PerceptualWeightsError(f"LPIPS weights file not found: {path}. {_HELP}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure: name the file, keep the cause
        raise PerceptualWeightsError(f"cannot read LPIPS weights from {path}: {e}") from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise PerceptualWeightsError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return dict(state)


def _load_exact(model: LPIPS, state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            trunk = [k for k in missing if k.startswith("net.")]
            hint = " (the VGG16 trunk is absent: the file holds only the LPIPS heads)" if len(trunk) == 26 else ""
            parts.append(f"missing keys {missing}{hint}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise PerceptualWeightsError(f"LPIPS weights from {source} do not fit: {'; '.join(parts)}. {_HELP}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatches; the message names the parameter and both shapes
        raise PerceptualWeightsError(f"LPIPS weights from {source} do not fit: {e}") from e


def _state_from_packages(model: LPIPS) -> dict[str, torch.Tensor]:
    """Trunk from torchvision's ImageNet VGG16, heads from the lpips package, constants from ``model``."""
    missing = [name for name in ("lpips", "torchvision") if importlib.util.find_spec(name) is None]
    if missing:
        names = " and ".join(missing)
        raise PerceptualWeightsError(f"pretrained LPIPS (weights='auto') needs {names}, not installed. {_HELP}")
    try:
        lpips = import_optional("lpips", "pretrained LPIPS (weights='auto')", PRETRAINED_EXTRA)
        models = import_optional("torchvision.models", "pretrained LPIPS (weights='auto')", PRETRAINED_EXTRA)
    except OptionalDependencyError as e:
        raise PerceptualWeightsError(f"{e}. {_HELP}") from e
    vgg16, VGG16_Weights = models.vgg16, models.VGG16_Weights  # noqa: N806 (torchvision's names)

    heads_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    if not heads_file.is_file():
        raise PerceptualWeightsError(f"the lpips package has no bundled heads at {heads_file}. {_HELP}")
    try:
        features = vgg16(weights=VGG16_Weights.IMAGENET1K_V1).features.state_dict()
    except (OSError, RuntimeError) as e:  # offline, or a corrupt download
        raise PerceptualWeightsError(f"cannot obtain torchvision's VGG16 ImageNet weights ({e}). {_HELP}") from e
    state: dict[str, torch.Tensor] = {}
    for key, value in features.items():
        index, param = key.split(".", 1)
        k = next(k for k in range(5) if int(index) < _SLICE_STARTS[k + 1]) + 1
        state[f"net.slice{k}.{index}.{param}"] = value
    heads = torch.load(heads_file, map_location="cpu", weights_only=True)
    state.update({k: v for k, v in heads.items() if k.startswith("lin")})
    state.update({f"scaling_layer.{k}": v for k, v in model.scaling_layer.state_dict().items()})
    return state


def _msssim_plan(smallest: int) -> tuple[int, tuple[float, ...]]:
    """Gaussian window size and scale weights for images whose smaller side is ``smallest`` pixels: as many of
    the five standard scales as fit the window (:func:`medlatent.metrics.ms_ssim_scales`, the metric's rule)."""
    kernel = ms_ssim_window(smallest)
    used = MS_SSIM_BETAS[: ms_ssim_scales(smallest, kernel)]
    return kernel, tuple(b / sum(used) for b in used)  # renormalised so exponents still sum to 1


class MSSSIMLoss(nn.Module):
    """1 − MS-SSIM per sample; an offline perceptual term that needs no pretrained network.

    Images in [-1, 1] are mapped to [0, 1] by ``(x + 1) / 2`` (not clamped, so out-of-range
    reconstructions still get gradients) and compared with data range 1, in float32. For small inputs
    the coarsest of the five standard scales are dropped (64×64 uses three; 176+ pixels use all five)
    and the remaining weights renormalised; below 11 pixels the window shrinks. torchmetrics'
    ``normalize="simple"`` maps similarities to [0, 1] before the per-scale powers, which keeps
    gradients finite where a similarity reaches 0 (with ``relu`` they become NaN).
    """

    def __init__(self) -> None:
        super().__init__()
        try:
            from torchmetrics.functional.image import multiscale_structural_similarity_index_measure
        except ImportError as e:
            raise ImportError("loss.perceptual=ms_ssim needs torchmetrics: pip install 'medlatent[train]'") from e
        self._msssim = multiscale_structural_similarity_index_measure

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``B×C×H×W`` pairs in [-1, 1] → ``B×1×1×1`` values in [0, 1] (0 for identical images)."""
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"MSSSIMLoss takes two B×C×H×W batches, got {tuple(x.shape)} and {tuple(y.shape)}")
        kernel, betas = _msssim_plan(min(x.shape[-2:]))
        with torch.autocast(device_type=x.device.type, enabled=False):
            sim = self._msssim(
                (x.float() + 1) / 2, (y.float() + 1) / 2, data_range=1.0, kernel_size=kernel,
                betas=betas, reduction="none", normalize="simple",
            )
        return (1.0 - sim).view(-1, 1, 1, 1)


def over_slices(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Apply a 2D per-sample function to volumes slice by slice along all three axes and average.

    For 4D inputs ``fn(*tensors)`` is returned unchanged. For 5D inputs ``B×C×D×H×W`` (same ``B`` and
    spatial shape for every tensor), the slices along each axis are folded into the batch
    (``B·D×C×H×W`` …) and ``fn`` is called once per axis (or per ``chunk`` slices). Each slice's output is
    averaged over its non-batch elements, then all ``D + H + W`` slices of a sample are averaged with equal
    weight — exactly the mean of per-slice values, as the paper's 3D losses and the official loop define.

    Note that a module with batch statistics (BatchNorm in train mode) sees all slices of an axis as one
    batch, rather than ``B`` images at a time as the official per-slice loop did.

    Returns:
        ``B×1×…×1`` with the rank of ``fn``'s output (``B×1×1×1`` for LPIPS, ``B`` for a ``B`` output).
    """
    first = tensors[0]
    if first.ndim == 4:
        return fn(*tensors)
    if first.ndim != 5:
        raise ValueError(f"over_slices takes B×C×H×W images or B×C×D×H×W volumes, got shape {tuple(first.shape)}")
    b, spatial = first.shape[0], first.shape[2:]
    if any(t.ndim != 5 or t.shape[0] != b or t.shape[2:] != spatial for t in tensors):
        raise ValueError(f"over_slices needs matching volumes, got shapes {[tuple(t.shape) for t in tensors]}")
    total, count, rank = None, 0, 1
    for axis in (2, 3, 4):
        n = first.shape[axis]
        # B×C×D×H×W → B×D×C×H×W → (B·D)×C×H×W: sample-major, so row b·n + j is slice j of sample b.
        folded = [t.movedim(axis, 1).reshape(b * n, t.shape[1], *(s for i, s in enumerate(spatial) if i != axis - 2))
                  for t in tensors]
        step = chunk or b * n
        outs = [fn(*(f[i : i + step] for f in folded)) for i in range(0, b * n, step)]
        out = torch.cat(outs)
        rank = out.ndim
        per_slice = out.reshape(b, n, -1).mean(dim=2)
        axis_sum = per_slice.sum(dim=1)
        total = axis_sum if total is None else total + axis_sum
        count += n
    return (total / count).view(b, *([1] * (rank - 1)))
