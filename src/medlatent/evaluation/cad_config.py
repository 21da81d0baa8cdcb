"""CAD settings: how inputs are prepared and classifiers trained (:class:`CADConfig`, with App. B.1's defaults),
and the names a method and a setting may take (kinds of input, latent channel modes, resize modes, epoch
selection). docs/paper-protocol.md lists each default beside the paper."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from medlatent.evaluation.classifiers import PAPER_CLASSIFIER

KINDS = ("image", "latent", "interp", "stitched", "natural")
#: kinds whose input is an autoencoder's latent (their rows carry f and C, and the channel mode)
LATENT_KINDS = ("latent", "stitched", "natural")
LATENT_CHANNELS = ("mean", "all")
RESIZE_MODES = ("nearest", "bilinear", "bicubic", "area")
#: ``last``: test the final epoch's classifier (App. B.1); ``best``: the epoch of the best validation AUROC
SELECT_RULES = ("last", "best")
#: the paper's input sizes: 2D 1024×512 (the FFDM and wrist tasks; bone age used 1024×1024); 3D, in the axis
#: order of medlatent's volumes (X×Y×Z, slices along Z), 224×224×160 (spine CT; head CT 224×224×44, knee MRI
#: 56×256×256)
PAPER_SIZE = {2: (1024, 512), 3: (224, 224, 160)}


def paper_batch_size(spatial_dims: int, kind: str) -> int:
    """App. B.1's batch sizes: 256 in 2D; in 3D 20 for latents (and inputs of their size), 10 for original images."""
    if spatial_dims == 2:
        return 256
    return 10 if kind == "image" else 20


@dataclass(frozen=True)
class CADConfig:
    """How inputs are prepared and classifiers trained (defaults follow App. B.1 where it says).

    Attributes:
        classifier: ``"hrnet_w64"``, ``"seresnet152"``, ``"tiny"``; ``None`` = the paper's choice
            (HRNet-w64 in 2D, SEResNet-152 in 3D).
        size: high-resolution input size: one int (all axes) or one per axis (e.g. ``(1024, 512)``); ``None`` =
            the paper's (:data:`PAPER_SIZE`: 1024×512 in 2D, 224×224×160 in 3D).
        epochs: training epochs (paper: 100).
        batch_size: training batch size; ``None`` = the paper's (:func:`paper_batch_size`: 256 in 2D; 3D 20 for
            latents and interpolated volumes, 10 for full-resolution ones).
        lr: AdamW learning rate (paper: 1e-4).
        weight_decay: AdamW weight decay.
        seeds: one classifier is trained per seed (paper: three).
        balanced: class-weighted sampling (each class drawn equally often); ``None`` = the paper's: on for 3D
            tasks, off for 2D ones.
        select: ``"last"`` tests the final epoch's classifier (the paper's rule); ``"best"`` keeps the epoch with
            the best validation AUROC (the last epoch when the CSV has no usable val split).
        resize: interpolation to the fixed input size: nearest, bilinear, bicubic or area.
        modality: passed to :func:`~medlatent.preprocessing.preprocess` (``auto``: from the file).
        device: where classifiers train (``"cpu"``, ``"cuda"``, ``"cuda:1"``, …); models encode where they are.
        pretrained: ImageNet weights for ``hrnet_w64`` (the paper used a pretrained HRNet).
        pretrained_weights: a local file of those weights (default: the Hugging Face cache, where timm keeps
            them, or a download; offline without them the run stops before any work, saying how to get them).
        preload_gb: inputs of one method are held in memory when they fit in this much; else read per batch.
        num_workers: DataLoader workers.
    """

    classifier: str | None = None
    size: int | tuple[int, ...] | None = None
    epochs: int = 100
    batch_size: int | None = None
    lr: float = 1e-4
    weight_decay: float = 1e-2
    seeds: tuple[int, ...] = (0, 1, 2)
    balanced: bool | None = None
    select: str = "last"
    resize: str = "bicubic"
    modality: str = "auto"
    device: str = "cpu"
    pretrained: bool = False
    pretrained_weights: str | None = None
    preload_gb: float = 2.0
    num_workers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if self.size is not None:
            if not isinstance(self.size, int):
                object.__setattr__(self, "size", tuple(int(n) for n in self.size))
            sizes = (self.size,) if isinstance(self.size, int) else self.size
            if not sizes or min(sizes) < 2:
                raise ValueError(f"size must be ≥ 2 per axis, got {self.size}")
        if self.epochs < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError(f"epochs and batch_size must be ≥ 1, got {self.epochs} and {self.batch_size}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.select not in SELECT_RULES:
            raise ValueError(f"select must be one of {', '.join(SELECT_RULES)}, got {self.select!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay ≥ 0, got {self.lr} and {self.weight_decay}")

    def size_for(self, spatial_dims: int) -> tuple[int, ...]:
        if self.size is None:
            return PAPER_SIZE[spatial_dims]
        if isinstance(self.size, int):
            return (self.size,) * spatial_dims
        if len(self.size) != spatial_dims:
            raise ValueError(f"size {self.size} has {len(self.size)} axes; the task is {spatial_dims}D")
        return self.size

    def classifier_for(self, spatial_dims: int) -> str:
        return self.classifier or PAPER_CLASSIFIER[spatial_dims]

    def batch_size_for(self, spatial_dims: int, kind: str) -> int:
        """The batch size of a method's classifier: ``batch_size``, else the paper's."""
        return self.batch_size or paper_batch_size(spatial_dims, kind)

    def balanced_for(self, spatial_dims: int) -> bool:
        """Class-weighted sampling: ``balanced``, else the paper's (3D tasks only)."""
        return self.balanced if self.balanced is not None else spatial_dims == 3

    @property
    def initialisation(self) -> str:
        """How the classifier starts: ``ImageNet-pretrained (FILE)`` or ``from scratch``."""
        if not self.pretrained:
            return "from scratch"
        return f"ImageNet-pretrained ({self.pretrained_weights})" if self.pretrained_weights else "ImageNet-pretrained"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        d["size"] = self.size if self.size is None or isinstance(self.size, int) else list(self.size)
        return d


def resolved_settings(config: CADConfig, dims: int) -> dict[str, Any]:
    """The settings a run used, defaults resolved (size, sampling) and how the classifier started."""
    return {**config.to_dict(), "size": list(config.size_for(dims)), "balanced": config.balanced_for(dims),
            "classifier_init": config.initialisation}
