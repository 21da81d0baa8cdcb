"""Start the multi-channel members from a natural-image KL-VAE (paper §3, "2D Base Autoencoder (Stage 1)").

``medvae_4_3_2d`` (f=16, C=3) and ``medvae_8_4_2d`` (f=64, C=4) were initialised from the latent-diffusion
KL-f4 / KL-f8 autoencoders (Rombach et al., 2022) and trained with rank-4 LoRA adapters. medlatent's
module names are those of latent diffusion, so a CompVis checkpoint needs little more than its training
keys dropped; the diffusers ``AutoencoderKL`` layout is renamed key by key. Both conversions are pure
``state_dict → state_dict`` functions; the model is then loaded with ``strict=True``.

Which convolutions get adapters, matched against the official code: ``medvae/utils/factory.py`` calls
``inject_trainable_lora_extended(model, {"ResnetBlock", "AttnBlock"}, r=4)``, which wraps every
``nn.Conv2d`` found anywhere inside a ``ResnetBlock`` or ``AttnBlock`` (``conv1``, ``conv2``,
``nin_shortcut``; ``q``, ``k``, ``v``, ``proj_out``) with dropout 0.1 and scale 1. ``conv_in``,
``conv_out``, the down/upsampling convs, ``quant_conv``, ``post_quant_conv`` and the stage-2 head are not
wrapped (the paper's "all 2D convolutional layers" is looser than the code). The released checkpoints
agree: ``medvae_4_3_2d`` holds 50 adapters and ``medvae_8_4_2d`` 60, exactly those convs.
:func:`medlatent.model.lora.inject_lora` wraps the same set under the same key names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from medlatent.checkpoints import (
    CheckpointError,
    StateDict,
    infer_config,
    load_state_dict_strict,
    merge_lora,
    read_state_dict,
    sha256_file,
)
from medlatent.model.autoencoder import MedVAE
from medlatent.model.config import MedVAEConfig
from medlatent.model.lora import inject_lora

logger = logging.getLogger(__name__)

#: the modules of an autoencoder; everything else in a training checkpoint (``loss.*``: discriminator,
#: LPIPS, learned log-variance; a full LDM's UNet and text encoder) is dropped.
_MODEL_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "channel_ds.", "channel_proj.")
_LDM_PREFIX = "first_stage_model."  # the autoencoder inside a full latent-diffusion checkpoint
_STAGE2_PREFIXES = ("channel_ds.", "channel_proj.")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v",
               "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _unwrap(sd: Mapping[str, object]) -> dict[str, torch.Tensor]:
    inner = sd.get("state_dict")
    return dict(inner) if isinstance(inner, Mapping) else dict(sd)  # type: ignore[arg-type]


def _keep_model_keys(sd: Mapping[str, torch.Tensor]) -> StateDict:
    kept = {k: v for k, v in sd.items() if k.startswith(_MODEL_PREFIXES)}
    if not kept:
        raise CheckpointError(
            f"no autoencoder weights (encoder.*, decoder.*, quant_conv.*) among the {len(sd)} tensors "
            f"(first keys: {', '.join(list(sd)[:4])}); is this a KL-VAE checkpoint?"
        )
    dropped = sorted(set(sd) - set(kept))
    if dropped:
        logger.info("ignoring %d tensors that are not part of the autoencoder (%s…)", len(dropped), dropped[0])
    return kept


def _attention_as_conv(sd: StateDict) -> StateDict:
    """Attention projections stored as ``Linear`` (``C×C``) become 1×1 convs (``C×C×1×1``)."""
    return {k: v[..., None, None] if v.ndim == 2 and _ATTN_WEIGHT.search(k) else v for k, v in sd.items()}


def convert_ldm_state_dict(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """CompVis / latent-diffusion first-stage checkpoint → medlatent state dict.

    Accepts the KL-f4 / KL-f8 ``model.ckpt`` state dict (optionally still wrapped in ``{"state_dict": …}``)
    or a full LDM / Stable Diffusion checkpoint, whose autoencoder lives under ``first_stage_model.``.
    Training-only tensors (``loss.*``) and other models' tensors are dropped; the key names are already
    medlatent's. LoRA adapters, if any (a released multi-channel checkpoint, to train further), are merged.
    """
    sd = _unwrap(sd)
    if any(k.startswith(_LDM_PREFIX) for k in sd):
        sd = {k[len(_LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(_LDM_PREFIX)}
    return merge_lora(_attention_as_conv(_keep_model_keys(sd)))


def _diffusers_key(key: str, num_up: int) -> str:
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        key = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        key = f"encoder.down.{m[1]}.downsample.{m[2]}"
    # diffusers numbers the decoder's up blocks from the bottom (lowest resolution first); LDM's
    # `up.N` is indexed by the encoder level it mirrors.
    elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        key = f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        key = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.{m[2]}"
    elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.*)", key):
        key = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key):
        name = _ATTN_NAMES.get(m[2])
        if name is None:
            raise CheckpointError(f"unknown attention parameter {key!r} in a diffusers AutoencoderKL state dict")
        key = f"{m[1]}.mid.attn_1.{name}.{m[3]}"
    elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
        key = f"{m[1]}.norm_out.{m[2]}"
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def convert_diffusers_state_dict(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers ``AutoencoderKL`` state dict → medlatent state dict.

    ``down_blocks.i.resnets.j`` → ``down.i.block.j``, ``downsamplers.0`` → ``downsample``,
    ``up_blocks.i`` → ``up.(n-1-i)`` (diffusers counts the decoder's levels from the bottom),
    ``mid_block.resnets.{0,1}`` → ``mid.block_{1,2}``, ``mid_block.attentions.0.{group_norm, to_q, to_k,
    to_v, to_out.0}`` (or the older ``query/key/value/proj_attn``) → ``mid.attn_1.{norm, q, k, v,
    proj_out}`` with the ``Linear`` weights reshaped to 1×1 convs, ``conv_shortcut`` → ``nin_shortcut``,
    ``conv_norm_out`` → ``norm_out``.
    """
    sd = _keep_model_keys(_unwrap(sd))
    ups = {int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    num_up = max(ups) + 1 if ups else 0
    out: StateDict = {}
    for key, value in sd.items():
        new = _diffusers_key(key, num_up)
        if new in out:
            raise CheckpointError(f"two diffusers tensors map to {new!r} (the second is {key!r})")
        out[new] = value
    return _attention_as_conv(out)


def is_diffusers_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``sd`` uses diffusers' ``AutoencoderKL`` names (``down_blocks``, ``mid_block``, …)."""
    return any(re.search(r"(^|\.)(down_blocks|up_blocks|mid_block|conv_norm_out)\.", k) for k in _unwrap(sd))


def convert_natural_state_dict(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A natural-image KL-VAE state dict in either layout (detected) → medlatent state dict.

    Idempotent: a state dict already in medlatent's layout comes back unchanged (minus non-model keys).
    """
    return convert_diffusers_state_dict(sd) if is_diffusers_state_dict(sd) else convert_ldm_state_dict(sd)


def adapt_input_conv(sd: Mapping[str, torch.Tensor], in_channels: int) -> StateDict:
    """Give ``encoder.conv_in`` ``in_channels`` input channels (the idea of timm's ``adapt_input_conv``).

    One channel: the RGB kernels are summed, which is exact for a grayscale image replicated to RGB
    (what :meth:`MedVAE.encode` does for a 3-channel model). Other counts: the kernels are tiled and
    rescaled by ``old/new`` so the activation scale is kept (an approximation).
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    out = dict(sd)
    w = out["encoder.conv_in.weight"]
    old = w.shape[1]
    if in_channels == old:
        return out
    if in_channels == 1:
        out["encoder.conv_in.weight"] = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_channels // old)
        out["encoder.conv_in.weight"] = w.repeat(1, reps, *(1,) * (w.ndim - 2))[:, :in_channels] * (old / in_channels)
    return out


def config_from_natural(
    sd: Mapping[str, torch.Tensor], in_channels: int | None = None, *, stage2_head: bool = True
) -> MedVAEConfig:
    """The :class:`MedVAEConfig` of a natural-image KL-VAE state dict (either layout).

    Args:
        sd: the state dict, raw or already converted.
        in_channels: image channels of the model; default the checkpoint's (3). A different count needs
            the checkpoint's ``conv_in`` adapted with :func:`adapt_input_conv` (:func:`load_natural_vae`
            does this).
        stage2_head: give the model the stage-2 projection head (as every released member has); it is
            not in a natural-image checkpoint and starts from PyTorch's default initialisation.
    """
    config = infer_config(convert_natural_state_dict(sd))
    changes: dict[str, object] = {"stage2_head": stage2_head}
    if in_channels is not None:
        changes["in_channels"] = int(in_channels)
    return dataclasses.replace(config, **changes)


def _diffusers_directory(directory: Path) -> Path:
    """The weights file of a diffusers ``AutoencoderKL`` directory (or of a pipeline's ``vae/``), checked."""
    if not (directory / "config.json").is_file() and (directory / "vae" / "config.json").is_file():
        directory = directory / "vae"
    cfg_path = directory / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{directory}: not a diffusers model directory (cannot read config.json: {e}); pass the "
            "directory written by AutoencoderKL.save_pretrained, or a .ckpt/.safetensors/.bin file"
        ) from e
    cls = cfg.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise CheckpointError(f"{cfg_path}: a {cls}, not an AutoencoderKL; only KL-VAEs can start a MedVAE")
    groups = cfg.get("norm_num_groups", 32)
    if groups != 32:
        raise CheckpointError(f"{cfg_path}: norm_num_groups={groups}, but MedVAE's GroupNorms have 32 groups")
    for name in _DIFFUSERS_WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(f"{directory}: no {' or '.join(_DIFFUSERS_WEIGHTS)} (found: {', '.join(found)})")


def load_natural_vae(
    source: str | Path,
    *,
    lora_rank: int | None = 4,
    lora_dropout: float = 0.1,
    in_channels: int | None = None,
    stage2_head: bool = True,
) -> tuple[MedVAE, list[nn.Parameter]]:
    """Build a MedVAE from a natural-image KL-VAE, frozen, with trainable LoRA adapters (paper §3, stage 1).

    Nothing is downloaded: ``source`` is a local file or directory.

    Args:
        source: a CompVis/LDM ``.ckpt`` (e.g. KL-f4/KL-f8 ``model.ckpt``, or a full LDM/Stable Diffusion
            checkpoint), a ``.safetensors``/``.bin`` state dict in either layout, or a diffusers
            ``AutoencoderKL`` directory (``config.json`` + ``diffusion_pytorch_model.safetensors``/``.bin``;
            a pipeline directory's ``vae/`` is found too).
        lora_rank: rank of the adapters wrapped around every conv of every ResnetBlock and AttnBlock (the
            official set, see the module docstring); ``None`` for no adapters, i.e. full fine-tuning.
        lora_dropout: dropout inside the adapters (0.1, the official default).
        in_channels: image channels (default the checkpoint's 3); see :func:`adapt_input_conv`.
        stage2_head: include the (freshly initialised, frozen) stage-2 projection head, so the key layout
            is that of the released members.

    Returns:
        The model (in training mode) and the parameters to optimise: the adapters' ``lora_down``/``lora_up``
        weights, everything else frozen; with ``lora_rank=None``, all autoencoder parameters (the stage-2
        head stays frozen: it is trained in stage 2). The official fine-tuning script also leaves
        ``quant_conv``/``post_quant_conv`` trainable; training's ``build_model`` adds them unless
        ``model.lora_train_quant`` is false.
    """
    path = Path(source)
    weights = _diffusers_directory(path) if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(
            f"natural-image VAE not found: {path} (expected a .ckpt/.safetensors/.bin file or a diffusers "
            "AutoencoderKL directory)"
        )
    try:
        sd = convert_natural_state_dict(read_state_dict(weights))
        config = config_from_natural(sd, in_channels, stage2_head=stage2_head)
        sd = adapt_input_conv(sd, config.in_channels)
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {e}") from e
    model = MedVAE(config)
    if stage2_head:  # not part of a natural-image VAE: keep the fresh initialisation
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith(_STAGE2_PREFIXES)}
        sd = {**fresh, **sd}
    load_state_dict_strict(model, sd, str(weights))
    model.weights_info = {"model": "", "init": "natural-image KL-VAE", "file": str(weights),
                          "sha256": sha256_file(weights)}
    if lora_rank is None:
        params = [p for name, p in model.named_parameters() if not name.startswith(_STAGE2_PREFIXES)]
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(_STAGE2_PREFIXES))
    else:
        params = inject_lora(model, rank=lora_rank, dropout=lora_dropout)
    logger.info("initialised %s from %s; %d trainable tensors (%d values)", config, weights, len(params),
                sum(p.numel() for p in params))
    return model.train(), params


__all__ = [
    "adapt_input_conv",
    "config_from_natural",
    "convert_diffusers_state_dict",
    "convert_ldm_state_dict",
    "convert_natural_state_dict",
    "is_diffusers_state_dict",
    "load_natural_vae",
]
