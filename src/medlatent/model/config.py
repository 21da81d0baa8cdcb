"""Architecture configuration of a MedVAE model as a small frozen dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MedVAEConfig:
    """Architecture of one MedVAE autoencoder (Stable-Diffusion-style KL-VAE + stage-2 projection head).

    Attributes:
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: image channels the encoder takes (1, or 3 for models started from natural-image VAEs).
        out_channels: image channels the decoder returns.
        ch: base width of the encoder/decoder.
        ch_mult: width multiplier per resolution level; ``len(ch_mult) - 1`` stride-2 downsamplings.
        num_res_blocks: ResnetBlocks per encoder level (the decoder uses one more).
        z_channels: channels at the encoder output (before ``quant_conv``).
        embed_dim: latent channels ``C`` of the posterior (after ``quant_conv``).
        dropout: dropout inside ResnetBlocks (0 in all released models).
        stage2_head: whether the model carries the stage-2 projection head (``channel_ds``/``channel_proj``).
        mid_attention: whether the encoder's and decoder's mid blocks hold the self-attention layer (every
            released member does). Without it the model is fully convolutional: its receptive field is bounded,
            so tiles with enough overlap give the whole image's result, and the cost grows linearly with the
            image (dense attention grows with its square: a 2048² image has 512² attention positions at f=16).
        norm_groups: GroupNorm groups (32 in every released model, whose widths give ≥4 channels per group).
            A narrow model should keep several channels per group: with one channel per group GroupNorm becomes
            instance norm, which erases each feature map's mean — the decoder then cannot set an image's global
            intensity.
    """

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 1
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 1
    embed_dim: int = 1
    dropout: float = 0.0
    stage2_head: bool = True
    norm_groups: int = 32
    mid_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "z_channels", "embed_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty list of positive integers, got {self.ch_mult}")
        if int(self.norm_groups) < 1:
            raise ValueError(f"norm_groups must be a positive integer, got {self.norm_groups}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(f"every level width ch*ch_mult must be divisible by norm_groups={self.norm_groups} "
                             f"(GroupNorm groups); got {bad}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsample_per_axis(self) -> int:
        """Spatial reduction per axis: 4 for ch_mult of length 3, 8 for length 4."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def f(self) -> int:
        """The paper's downsizing factor: reduction of the image area (2D) or volume (3D)."""
        return self.downsample_per_axis**self.spatial_dims

    @property
    def C(self) -> int:  # noqa: N802 - the paper's name
        """Latent channels."""
        return self.embed_dim

    def latent_shape(self, spatial_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(C, *spatial/stride)`` for an input of the given spatial shape (which must divide evenly)."""
        s = self.downsample_per_axis
        if len(spatial_shape) != self.spatial_dims:
            raise ValueError(f"expected {self.spatial_dims} spatial sizes, got {tuple(spatial_shape)}")
        bad = [n for n in spatial_shape if n % s or n < s]
        if bad:
            raise ValueError(
                f"spatial sizes {tuple(spatial_shape)} must be positive multiples of {s} for this model; "
                f"pad the input (medlatent's preprocessing pads and records it for you)"
            )
        return (self.embed_dim, *(n // s for n in spatial_shape))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MedVAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MedVAEConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)
