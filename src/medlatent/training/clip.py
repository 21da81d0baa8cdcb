"""BiomedCLIP embedding consistency (paper §3): an L2 penalty between image embeddings of a frozen
medical vision-language encoder.

* Stage 1 (optional term): embeddings of the input ``x`` and of the reconstruction ``x̂``.
* Stage 2 (2D): embeddings of ``x`` and of the projected latent ``z̄`` shown to the encoder as an image.

Preprocessing reproduces the official criterion (torchvision ``Resize(224, bicubic, antialias)`` +
``CenterCrop(224)`` + CLIP normalisation) with ``torch.nn.functional.interpolate``, so torchvision is not
needed. ``open_clip`` is imported only by :func:`load_biomedclip`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from medlatent.optional import PRETRAINED_EXTRA, OptionalDependencyError, import_optional
from medlatent.training.perceptual import over_slices

logger = logging.getLogger(__name__)

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipWeightsError(RuntimeError):
    """The BiomedCLIP encoder cannot be loaded; the message lists the ways out."""


class ClipConsistency(nn.Module):
    """Squared-L2 distance between embeddings of a frozen image encoder.

    Args:
        encoder: any module mapping normalised ``B×3×S×S`` images to ``B×E`` embeddings; it is frozen and
            kept in eval mode.
        latent_scale: stage 2 divides features by this before showing them to the encoder (official 4.6).
        image_size: encoder input side ``S`` (224 for BiomedCLIP).
        chunk: at most this many slices per encoder call for volumes (memory bound); None = one axis at once.
    """

    def __init__(self, encoder: nn.Module, latent_scale: float = 4.6, image_size: int = 224,
                 chunk: int | None = 64) -> None:
        super().__init__()
        if latent_scale <= 0 or image_size < 1:
            raise ValueError(f"latent_scale and image_size must be positive, got {latent_scale}, {image_size}")
        self.encoder = encoder.requires_grad_(False).eval()
        self.latent_scale = float(latent_scale)
        self.image_size = int(image_size)
        self.chunk = chunk
        self.register_buffer("mean", torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ClipConsistency:
        super().train(mode)
        self.encoder.eval()  # frozen network: no dropout / batch statistics, whatever the caller's mode
        return self

    def preprocess(self, t: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side to ``S`` (bicubic, antialiased), centre-crop ``S×S``, CLIP-normalise.

        Args:
            t: ``B×C×H×W`` with C = 1 (repeated to 3) or 3, values already in the encoder's [0, 1] range.

        Returns:
            ``B×3×S×S``.
        """
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"expected B×C×H×W with C in (1, 3), got shape {tuple(t.shape)}")
        s = self.image_size
        h, w = t.shape[-2:]
        if min(h, w) != s:
            # torchvision's rule: the shorter side becomes S, the longer one S·long/short, truncated.
            size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
            t = F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=True)
        h, w = t.shape[-2:]
        top, left = round((h - s) / 2), round((w - s) / 2)  # torchvision's CenterCrop offsets
        t = t[..., top : top + s, left : left + s]
        t = t.expand(-1, 3, -1, -1)  # after the resize: one channel is cheaper to interpolate
        return (t - self.mean.to(t.dtype)) / self.std.to(t.dtype)

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        """Encoder embeddings ``B×E`` of ``t`` (``B×C×H×W`` in [0, 1]) after :meth:`preprocess`."""
        return self.encoder(self.preprocess(t))

    @staticmethod
    def _to_unit(x: torch.Tensor) -> torch.Tensor:
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def _pair_distance(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the input side is a fixed target
            target = self.embed(self._to_unit(x))
        return ((target - self.embed(self._to_unit(x_rec))) ** 2).sum(dim=1)

    def reconstruction_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """Stage-1 term: ``‖b(x) − b(x̂)‖²`` per sample, shape ``B``.

        Args:
            x, x_rec: ``B×C×H×W`` images or ``B×C×D×H×W`` volumes in [-1, 1]; both are mapped to [0, 1]
                and clamped. Volumes use every slice along all three axes, averaged (as the official 3D
                branch; the paper does not use this term in 3D).
        """
        if x.shape != x_rec.shape:
            raise ValueError(f"x and x_rec must have the same shape, got {tuple(x.shape)} and {tuple(x_rec.shape)}")
        return over_slices(self._pair_distance, x, x_rec, chunk=self.chunk)

    def latent_loss(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Stage-2 term (2D): ``‖b(x) − b(z̄)‖²`` per sample, shape ``B``.

        Args:
            x: ``B×C×H×W`` images in [-1, 1] (mapped and clamped to [0, 1]; no gradient).
            features: projected latents ``B×c×h×w``; divided by ``latent_scale``, averaged over channels and
                shown to the encoder as a grey image without clamping, as the official code does.
        """
        if x.ndim != 4 or features.ndim != 4 or x.shape[0] != features.shape[0]:
            raise ValueError(
                f"latent_loss is 2D: x B×C×H×W and features B×c×h×w, got {tuple(x.shape)} and {tuple(features.shape)}"
            )
        with torch.no_grad():
            target = self.embed(self._to_unit(x))
        grey = (features / self.latent_scale).mean(dim=1, keepdim=True)
        return ((target - self.embed(grey)) ** 2).sum(dim=1)


class _VisualTower(nn.Module):
    """The image tower of an open_clip model; ``visual(x)`` is what ``encode_image(x)`` returns."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def load_biomedclip(source: str = BIOMEDCLIP, latent_scale: float = 4.6) -> ClipConsistency:
    """BiomedCLIP's frozen image tower wrapped as a :class:`ClipConsistency` (the text tower is dropped).

    Args:
        source: an open_clip model name; the default downloads from the Hugging Face hub (or reads its cache).
        latent_scale: see :class:`ClipConsistency`.

    Raises:
        ClipWeightsError: open_clip is not installed, or the model cannot be built or fetched (offline).
    """
    ways_out = (
        "Options: install open_clip_torch (pip install 'medlatent[pretrained]', with a torchvision matching "
        "your torch); "
        "fetch the model once with network access, or point HF_HOME / HF_HUB_CACHE at a Hugging Face cache "
        "that already holds it (HF_HUB_OFFLINE=1 to stay offline), or give another open_clip source with "
        "loss.clip_model=...; or turn the term off with loss.clip_weight=0."
    )
    try:
        open_clip = import_optional("open_clip", "the BiomedCLIP consistency loss", PRETRAINED_EXTRA)
    except OptionalDependencyError as e:
        raise ClipWeightsError(f"{e}. {ways_out}") from e
    try:
        model, _ = open_clip.create_model_from_pretrained(source)
    except Exception as e:  # hub, network and config failures come in many types; all mean the same here
        raise ClipWeightsError(f"cannot load {source} with open_clip: {e}. {ways_out}") from e
    logger.info("BiomedCLIP image encoder loaded from %s", source)
    return ClipConsistency(_VisualTower(model.visual), latent_scale=latent_scale)
