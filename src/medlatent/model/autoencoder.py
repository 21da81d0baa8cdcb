"""The MedVAE autoencoder: one implementation for 2D images and 3D volumes.

Tensor layout: images are ``B×C×H×W``; volumes are ``B×C×X×Y×Z`` with the slice (through-plane) axis
last, as the released 3D weights expect (they were inflated from 2D kernels along that axis).

Names used throughout (paper §3): ``f`` is the downsizing factor of the area (2D) or volume (3D), ``C``
the number of latent channels. ``z`` is the posterior mean (the latent of record); the stage-2 features
are ``channel_proj(channel_ds(z) + z)``, the projected latent the paper used for CAD on 2D images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import nn

from medlatent.model.config import MedVAEConfig
from medlatent.model.layers import AttnBlock, Downsample, GroupNorm32, ResnetBlock, Upsample, conv_nd, swish
from medlatent.model.posterior import DiagonalGaussian

if TYPE_CHECKING:
    from medlatent.registry import ModelInfo

logger = logging.getLogger(__name__)


class MidBlock(nn.Module):
    """ResnetBlock → self-attention (``nn.Identity`` when the model has no mid attention) → ResnetBlock, at the
    lowest resolution. Keys ``mid.block_1``, ``mid.attn_1``, ``mid.block_2`` as in the released weights."""

    def __init__(self, spatial_dims: int, channels: int, dropout: float, groups: int, attention: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(spatial_dims, channels, channels, dropout, groups)
        self.attn_1: AttnBlock | nn.Identity = AttnBlock(spatial_dims, channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(spatial_dims, channels, channels, dropout, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class DownStage(nn.Module):
    """One encoder level: ``block`` (ResnetBlocks at one resolution), then a stride-2 ``downsample`` on every
    level but the last (``None`` there, which adds no state-dict key)."""

    def __init__(self, spatial_dims: int, block_in: int, block_out: int, blocks: int, dropout: float, groups: int,
                 downsample: bool) -> None:
        super().__init__()
        widths = [block_in] + [block_out] * blocks
        self.block = nn.ModuleList(ResnetBlock(spatial_dims, widths[i], block_out, dropout, groups)
                                   for i in range(blocks))
        self.downsample = Downsample(spatial_dims, block_out) if downsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        return h if self.downsample is None else self.downsample(h)


class UpStage(nn.Module):
    """One decoder level: ``block`` (ResnetBlocks at one resolution), then a ×2 ``upsample`` on every level but
    level 0 (``None`` there, which adds no state-dict key)."""

    def __init__(self, spatial_dims: int, block_in: int, block_out: int, blocks: int, dropout: float, groups: int,
                 upsample: bool) -> None:
        super().__init__()
        widths = [block_in] + [block_out] * blocks
        self.block = nn.ModuleList(ResnetBlock(spatial_dims, widths[i], block_out, dropout, groups)
                                   for i in range(blocks))
        self.upsample = Upsample(spatial_dims, block_out) if upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        return h if self.upsample is None else self.upsample(h)


class Encoder(nn.Module):
    """Image → ``2·z_channels`` moment features at ``1/downsample_per_axis`` resolution."""

    def __init__(self, cfg: MedVAEConfig) -> None:
        super().__init__()
        d = cfg.spatial_dims
        self.conv_in = conv_nd(d, cfg.in_channels, cfg.ch, kernel_size=3, padding=1)
        widths = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]  # input width, then each level's
        last = len(cfg.ch_mult) - 1
        self.down = nn.ModuleList(
            DownStage(d, widths[level], widths[level + 1], cfg.num_res_blocks, cfg.dropout, cfg.norm_groups,
                      downsample=level != last)
            for level in range(len(cfg.ch_mult))
        )
        self.mid = MidBlock(d, widths[-1], cfg.dropout, cfg.norm_groups, cfg.mid_attention)
        self.norm_out = GroupNorm32(widths[-1], cfg.norm_groups)
        self.conv_out = conv_nd(d, widths[-1], 2 * cfg.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """``z_channels`` features → image; mirrors the encoder with one more ResnetBlock per level."""

    def __init__(self, cfg: MedVAEConfig) -> None:
        super().__init__()
        d = cfg.spatial_dims
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = conv_nd(d, cfg.z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(d, widths[-1], cfg.dropout, cfg.norm_groups, cfg.mid_attention)
        # `up[i]` works at the resolution of encoder level i and takes the width of level i + 1 (the bottom level
        # its own); it runs from the bottom, so level i's output feeds level i - 1.
        # built from the bottom (the order the parameters are drawn in from the random generator)
        stages = [UpStage(d, widths[min(level + 1, len(widths) - 1)], widths[level], cfg.num_res_blocks + 1,
                          cfg.dropout, cfg.norm_groups, upsample=level != 0)
                  for level in reversed(range(len(cfg.ch_mult)))]
        self.up = nn.ModuleList(stages[::-1])
        self.norm_out = GroupNorm32(widths[0], cfg.norm_groups)
        self.conv_out = conv_nd(d, widths[0], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage(h)
        return self.conv_out(swish(self.norm_out(h)))


def require_finite(t: torch.Tensor, what: str) -> None:
    """Refuse a tensor holding NaN or infinite values (the one place that words the error). Meta tensors pass."""
    if t.device.type != "meta" and not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or infinite values")


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

    State besides the weights, all of it set at construction, none of it read by the forward pass:

    * ``config``: the architecture (:class:`MedVAEConfig`).
    * ``max_tile``: an inference default, the largest image-space tile edge the tiling engine
      (:class:`medlatent.engine.tiled.TiledAutoencoder`) picks by itself for this model; ``None``: no limit. For
      members trained on small crops: their GroupNorm statistics over a whole large image lie outside what they
      were trained on, while tiles of the training scale do not. Declared in the registry
      (:attr:`medlatent.registry.ModelInfo.max_tile`) and persisted in a model folder's ``config.json``, so
      ``from_config(name)`` and ``from_pretrained(name)`` tile alike.
    * ``weights_info``: where the weights came from (model name, file, SHA-256), filled by the loaders; it is
      provenance written into latent files and exports, never read by the computation.
    """

    def __init__(self, config: MedVAEConfig, *, max_tile: int | None = None) -> None:
        super().__init__()
        self.config = config
        s = config.downsample_per_axis
        if max_tile is not None and (isinstance(max_tile, bool) or not isinstance(max_tile, int)
                                     or max_tile < 2 * s or max_tile % s):
            raise ValueError(f"max_tile must be a multiple of {s} (at least twice that), got {max_tile!r}")
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
        self.weights_info: dict[str, str] = {}
        self.max_tile: int | None = max_tile
        # Channels-last activations run the convolutions ~15-25% faster on CPU (oneDNN) and suit cuDNN;
        # weights in this layout make every conv produce it. Values are unchanged; state dicts are too.
        self.to(memory_format=torch.channels_last if d == 2 else torch.channels_last_3d)  # type: ignore[call-overload]  # noqa: E501 - Module.to takes it; its stubs omit it

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

    @property
    def device(self) -> torch.device:
        """Where the weights are (all of them: a model is moved as a whole)."""
        return self.quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype; inputs are cast to it unless autocast chooses the compute dtype."""
        return self.quant_conv.weight.dtype

    def latent_shape(self, spatial_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape ``C×…`` of ``z`` for an image of the given spatial shape."""
        return self.config.latent_shape(tuple(spatial_shape))

    # ------------------------------------------------------------------ checks
    def _cast_in(self, t: torch.Tensor) -> torch.Tensor:
        """Match the weights' dtype, unless autocast chooses the compute dtype."""
        dev = t.device.type
        if dev in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(dev):
            return t
        return t.to(self.dtype)

    def _check(self, x: torch.Tensor, what: str, channels: tuple[int, ...], multiple: int, finite: bool) -> None:
        """Refuse what the model cannot take, in one line; ``finite`` also scans the values (a device sync)."""
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
        if finite:
            require_finite(x, what)

    # ------------------------------------------------------------------ inference API
    def encode(self, x: torch.Tensor, *, check_finite: bool = True) -> DiagonalGaussian:
        """Encode images to the posterior q(z|x).

        Args:
            x: ``B×in_channels×H×W`` (2D) or ``B×in_channels×X×Y×Z`` (3D), intensities in [-1, 1],
                sizes multiples of ``downsample_per_axis``. One-channel input to a 3-channel model is
                replicated to three channels.
            check_finite: refuse NaN or infinite values. The scan waits for the device, so callers that
                checked the input where it entered (the tiling engine per image, not per tile; training, whose
                readers check every image) pass ``False``.

        Returns:
            The posterior; ``.mean`` is ``z`` (``B×C×H/s×W/s``), the deterministic latent of record.
        """
        allowed = (self.config.in_channels, 1) if self.config.in_channels == 3 else (self.config.in_channels,)
        self._check(x, "image", allowed, self.downsample_per_axis, check_finite)
        if x.shape[1] != self.config.in_channels:
            x = x.expand(-1, self.config.in_channels, *x.shape[2:])
        x = self._cast_in(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, grayscale: bool = False, *, check_finite: bool = True) -> torch.Tensor:
        """Decode a latent ``z`` (``B×C×…``) to an image ``B×out_channels×…`` in [-1, 1] (not clamped).

        Args:
            z: posterior mean or a sample, ``B×C×H/s×W/s`` (2D) or ``B×C×X/s×Y/s×Z/s`` (3D).
            grayscale: average the output channels to one (for grayscale use of 3-channel models).
            check_finite: refuse NaN or infinite values (see :meth:`encode`).
        """
        self._check(z, "latent z", (self.C,), 1, check_finite)
        z = self._cast_in(z)
        out = self.decoder(self.post_quant_conv(z))
        return out.mean(dim=1, keepdim=True) if grayscale and out.shape[1] > 1 else out

    def stage2_features(self, z: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """Stage-2 features ``channel_proj(channel_ds(z) + z)`` of a latent ``z``; same shape as ``z``.

        These projected latents are what the paper feeds to CAD classifiers (2D models). ``check_finite``: see
        :meth:`encode`.
        """
        if not self.config.stage2_head:
            raise RuntimeError("this model was built without the stage-2 projection head (stage2_head=False)")
        self._check(z, "latent z", (self.C,), 1, check_finite)
        z = self._cast_in(z)
        return self.channel_proj(self.channel_ds(z) + z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Encode to the posterior mean and decode; returns as many channels as ``x`` has."""
        z = self.encode(x).mean
        return self.decode(z, grayscale=x.shape[1] == 1)

    def forward(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None, *,
        check_finite: bool = True,
    ) -> AutoencoderOutput:
        """Encode, take the posterior mean (or a sample when ``sample=True``), decode.

        Training uses ``sample=True`` (and ``check_finite=False``: its readers check every image); inference keeps
        the deterministic default.
        """
        posterior = self.encode(x, check_finite=check_finite)
        z = posterior.sample(generator) if sample else posterior.mean
        return AutoencoderOutput(self.decode(z, grayscale=x.shape[1] == 1, check_finite=check_finite), posterior, z)

    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's last conv (for the GAN loss's adaptive weight)."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: "str | MedVAEConfig | ModelInfo") -> "MedVAE":
        """Build a model with random weights from a registry name, a ``ModelInfo`` (with its inference defaults)
        or a config."""
        from medlatent.registry import ModelInfo, get_model_info

        info = get_model_info(config) if isinstance(config, str) else config
        if not isinstance(info, ModelInfo):
            return cls(info)
        model = cls(info.config, max_tile=info.max_tile)
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
        return _installed_weight_files().load_pretrained(
            name_or_dir,
            checkpoint,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            map_location=map_location,
        )

    def save_pretrained(self, directory: "str | Path", name: str | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (see :func:`medlatent.checkpoints.save_pretrained`)."""
        return _installed_weight_files().save_pretrained(self, directory, name=name)


# ---------------------------------------------------------------------------------------------- weight files
class WeightFiles(Protocol):
    """What reads and writes a model's weight files: the :mod:`medlatent.checkpoints` module, one layer above the
    model. The model imports nothing above itself, so :meth:`MedVAE.from_pretrained` and
    :meth:`MedVAE.save_pretrained` call whatever :func:`set_weight_files` installed; the package root installs
    ``medlatent.checkpoints`` when it is imported, which is before any of its modules is."""

    # the signatures are those of medlatent.checkpoints.load_pretrained / save_pretrained (model first)
    load_pretrained: Callable[..., MedVAE]
    save_pretrained: Callable[..., Path]


_weight_files: WeightFiles | None = None


def set_weight_files(weight_files: WeightFiles) -> None:
    """Install the weight-file layer behind :meth:`MedVAE.from_pretrained` / :meth:`MedVAE.save_pretrained`."""
    global _weight_files
    _weight_files = weight_files


def _installed_weight_files() -> WeightFiles:
    if _weight_files is None:  # only while the package root is still being imported
        raise RuntimeError("MedVAE.from_pretrained/save_pretrained need medlatent.checkpoints, which importing "
                           "medlatent installs (medlatent.model.autoencoder.set_weight_files)")
    return _weight_files
