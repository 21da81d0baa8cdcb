"""The MedVAE autoencoder: one implementation for 2D images and 3D volumes.

Tensor layout: images are ``B×C×H×W``; volumes are ``B×C×X×Y×Z`` with the slice (through-plane) axis
last, as the released 3D weights expect (they were inflated from 2D kernels along that axis).

Names used throughout (paper §3): ``f`` is the downsizing factor of the area (2D) or volume (3D), ``C``
the number of latent channels. ``z`` is the posterior mean (the latent of record); the stage-2 features
are ``channel_proj(channel_ds(z) + z)``, the projected latent the paper used for CAD on 2D images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from medlatent.model.config import MedVAEConfig
from medlatent.model.layers import AttnBlock, Downsample, GroupNorm32, ResnetBlock, Upsample, conv_nd, swish
from medlatent.model.posterior import DiagonalGaussian

if TYPE_CHECKING:
    from medlatent.registry import ModelInfo

logger = logging.getLogger(__name__)


def _mid_block(spatial_dims: int, channels: int, dropout: float, groups: int, attention: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(spatial_dims, channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(spatial_dims, channels, groups) if attention else nn.Identity()
    mid.block_2 = ResnetBlock(spatial_dims, channels, channels, dropout, groups)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image → ``2·z_channels`` moment features at ``1/downsample_per_axis`` resolution."""

    def __init__(self, cfg: MedVAEConfig) -> None:
        super().__init__()
        d = cfg.spatial_dims
        self.conv_in = conv_nd(d, cfg.in_channels, cfg.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(d, block_in, block_out, cfg.dropout, cfg.norm_groups))
                block_in = block_out
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(d, block_in)
            self.down.append(stage)
        self.mid = _mid_block(d, block_in, cfg.dropout, cfg.norm_groups, cfg.mid_attention)
        self.norm_out = GroupNorm32(block_in, cfg.norm_groups)
        self.conv_out = conv_nd(d, block_in, 2 * cfg.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """``z_channels`` features → image; mirrors the encoder with one more ResnetBlock per level."""

    def __init__(self, cfg: MedVAEConfig) -> None:
        super().__init__()
        d = cfg.spatial_dims
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = conv_nd(d, cfg.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _mid_block(d, block_in, cfg.dropout, cfg.norm_groups, cfg.mid_attention)
        # `up[i]` works at the resolution of encoder level i; built from the bottom so widths chain.
        stages: list[nn.Module] = []
        for level in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(d, block_in, block_out, cfg.dropout, cfg.norm_groups))
                block_in = block_out
            if level != 0:
                stage.upsample = Upsample(d, block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = GroupNorm32(block_in, cfg.norm_groups)
        self.conv_out = conv_nd(d, block_in, cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoencoderOutput(NamedTuple):
    """Result of :meth:`MedVAE.forward`.

    Attributes:
        reconstruction: decoded image, same shape as the input.
        posterior: q(z|x).
        z: the latent that was decoded (posterior mean, or a sample when ``sample=True``).
    """

    reconstruction: torch.Tensor
    posterior: DiagonalGaussian
    z: torch.Tensor


class MedVAE(nn.Module):
    """A member of the MedVAE family (2D or 3D, chosen by ``config.spatial_dims``).

    State-dict keys match the released checkpoints (``encoder.*``, ``decoder.*``, ``quant_conv``,
    ``post_quant_conv``, ``channel_ds``, ``channel_proj``), so official weights load with ``strict=True``
    (LoRA adapters are merged first, see :func:`medlatent.checkpoints.merge_lora`).

    Grayscale input to a 3-channel model (``medvae_4_3_2d``, ``medvae_8_4_2d``) is replicated to three
    channels in :meth:`encode`; :meth:`decode` returns three channels unless ``grayscale=True``, which
    averages them back to one (what :meth:`reconstruct` does for one-channel input).
    """

    def __init__(self, config: MedVAEConfig) -> None:
        super().__init__()
        self.config = config
        d, c = config.spatial_dims, config.embed_dim
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = conv_nd(d, 2 * config.z_channels, 2 * c, kernel_size=1)
        self.post_quant_conv = conv_nd(d, c, config.z_channels, kernel_size=1)
        if config.stage2_head:
            # Stage-2 projection head (paper §3, "Stage 2"): a light residual 64-wide conv stack.
            self.channel_ds = nn.Sequential(
                conv_nd(d, c, 64, kernel_size=1),
                nn.ReLU(),
                conv_nd(d, 64, 64, kernel_size=3, padding="same"),
                nn.ReLU(),
                conv_nd(d, 64, c, kernel_size=1),
            )
            self.channel_proj = conv_nd(d, c, c, kernel_size=1)
        #: where the weights came from (model name, file, sha256); filled by the loaders.
        self.weights_info: dict[str, str] = {}
        #: largest image-space tile edge the tiling engine picks by itself for this model (``max_tile`` in
        #: ``config.json``; None: no limit). For members trained on small crops: their GroupNorm statistics over a
        #: whole large image lie outside what they were trained on, while tiles of the training scale do not.
        self.max_tile: int | None = None
        # Channels-last activations run the convolutions ~15-25% faster on CPU (oneDNN) and suit cuDNN;
        # weights in this layout make every conv produce it. Values are unchanged; state dicts are too.
        self.to(memory_format=torch.channels_last if d == 2 else torch.channels_last_3d)

    # ------------------------------------------------------------------ properties
    @property
    def spatial_dims(self) -> int:
        return self.config.spatial_dims

    @property
    def f(self) -> int:
        """Downsizing factor of the area (2D) or volume (3D)."""
        return self.config.f

    @property
    def C(self) -> int:  # noqa: N802 - the paper's name
        """Latent channels."""
        return self.config.embed_dim

    @property
    def downsample_per_axis(self) -> int:
        return self.config.downsample_per_axis

    def latent_shape(self, spatial_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape ``C×…`` of ``z`` for an image of the given spatial shape."""
        return self.config.latent_shape(tuple(spatial_shape))

    # ------------------------------------------------------------------ checks
    def _cast_in(self, t: torch.Tensor) -> torch.Tensor:
        """Match the weights' dtype, unless autocast chooses the compute dtype."""
        dev = t.device.type
        if dev in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(dev):
            return t
        return t.to(self.quant_conv.weight.dtype)

    def _check(self, x: torch.Tensor, what: str, channels: tuple[int, ...], multiple: int) -> None:
        rank = self.spatial_dims + 2
        layout = "B×C×H×W" if self.spatial_dims == 2 else "B×C×X×Y×Z"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != rank:
            raise ValueError(
                f"{what} must be a {rank}-D tensor {layout} for this {self.spatial_dims}D model, "
                f"got shape {tuple(x.shape)}"
                + (" (add a batch axis with x[None])" if x.ndim == rank - 1 else "")
            )
        if x.shape[1] not in channels:
            raise ValueError(f"{what} must have {' or '.join(map(str, channels))} channel(s), got {x.shape[1]}")
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}; convert and scale it first")
        bad = [n for n in x.shape[2:] if n % multiple or n < multiple]
        if bad:
            raise ValueError(
                f"{what} spatial sizes {tuple(x.shape[2:])} must be positive multiples of {multiple}; "
                "pad the input first (medlatent's preprocessing pads and records the padding)"
            )
        if x.device.type != "meta" and not torch.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or infinite values")

    # ------------------------------------------------------------------ inference API
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Encode images to the posterior q(z|x).

        Args:
            x: ``B×in_channels×H×W`` (2D) or ``B×in_channels×X×Y×Z`` (3D), intensities in [-1, 1],
                sizes multiples of ``downsample_per_axis``. One-channel input to a 3-channel model is
                replicated to three channels.

        Returns:
            The posterior; ``.mean`` is ``z`` (``B×C×H/s×W/s``), the deterministic latent of record.
        """
        allowed = (self.config.in_channels, 1) if self.config.in_channels == 3 else (self.config.in_channels,)
        self._check(x, "image", allowed, self.downsample_per_axis)
        if x.shape[1] != self.config.in_channels:
            x = x.expand(-1, self.config.in_channels, *x.shape[2:])
        x = self._cast_in(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, grayscale: bool = False) -> torch.Tensor:
        """Decode a latent ``z`` (``B×C×…``) to an image ``B×out_channels×…`` in [-1, 1] (not clamped).

        Args:
            z: posterior mean or a sample, ``B×C×H/s×W/s`` (2D) or ``B×C×X/s×Y/s×Z/s`` (3D).
            grayscale: average the output channels to one (for grayscale use of 3-channel models).
        """
        self._check(z, "latent z", (self.C,), 1)
        z = self._cast_in(z)
        out = self.decoder(self.post_quant_conv(z))
        return out.mean(dim=1, keepdim=True) if grayscale and out.shape[1] > 1 else out

    def stage2_features(self, z: torch.Tensor) -> torch.Tensor:
        """Stage-2 features ``channel_proj(channel_ds(z) + z)`` of a latent ``z``; same shape as ``z``.

        These projected latents are what the paper feeds to CAD classifiers (2D models).
        """
        if not self.config.stage2_head:
            raise RuntimeError("this model was built without the stage-2 projection head (stage2_head=False)")
        self._check(z, "latent z", (self.C,), 1)
        z = self._cast_in(z)
        return self.channel_proj(self.channel_ds(z) + z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Encode to the posterior mean and decode; returns as many channels as ``x`` has."""
        z = self.encode(x).mean
        return self.decode(z, grayscale=x.shape[1] == 1)

    def forward(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> AutoencoderOutput:
        """Encode, take the posterior mean (or a sample when ``sample=True``), decode.

        Training uses ``sample=True``; inference keeps the deterministic default.
        """
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mean
        return AutoencoderOutput(self.decode(z, grayscale=x.shape[1] == 1), posterior, z)

    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's last conv (for the GAN loss's adaptive weight)."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: "str | MedVAEConfig | ModelInfo") -> "MedVAE":
        """Build a model with random weights from a registry name, a ``ModelInfo`` or a config."""
        from medlatent.registry import ModelInfo, get_model_info

        info = get_model_info(config) if isinstance(config, str) else config
        cfg = info.config if isinstance(info, ModelInfo) else info
        model = cls(cfg)
        if isinstance(info, ModelInfo):
            model.weights_info = {"model": info.name, "weights": "random"}
        return model

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: "str | Path",
        checkpoint: "str | Path | None" = None,
        *,
        revision: str | None = None,
        cache_dir: "str | Path | None" = None,
        local_files_only: bool | None = None,
        map_location: "str | torch.device" = "cpu",
    ) -> "MedVAE":
        """Load a model with trained weights. See :func:`medlatent.checkpoints.load_pretrained`."""
        from medlatent.checkpoints import load_pretrained

        return load_pretrained(
            name_or_dir,
            checkpoint,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            map_location=map_location,
        )

    def save_pretrained(self, directory: "str | Path", name: str | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (see :func:`medlatent.checkpoints.save_pretrained`)."""
        from medlatent.checkpoints import save_pretrained

        return save_pretrained(self, directory, name=name)
