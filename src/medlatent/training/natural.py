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
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from medlatent.checkpoints import (
    CheckpointError,
    StateDict,
    attention_as_conv,
    convert_diffusers_state_dict,
    infer_config,
    is_diffusers_state_dict,
    keep_autoencoder_keys,
    load_state_dict_strict,
    merge_lora,
    read_state_dict,
    sha256_file,
    unwrap_state_dict,
)
from medlatent.model.autoencoder import MedVAE
from medlatent.model.config import MedVAEConfig
from medlatent.model.lora import inject_lora

logger = logging.getLogger(__name__)

_LDM_PREFIX = "first_stage_model."  # the autoencoder inside a full latent-diffusion checkpoint
_STAGE2_PREFIXES = ("channel_ds.", "channel_proj.")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")



def convert_ldm_state_dict(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """CompVis / latent-diffusion first-stage checkpoint → medlatent state dict.

    Accepts the KL-f4 / KL-f8 ``model.ckpt`` state dict (optionally still wrapped in ``{"state_dict": …}``)
    or a full LDM / Stable Diffusion checkpoint, whose autoencoder lives under ``first_stage_model.``.
    Training-only tensors (``loss.*``) and other models' tensors are dropped; the key names are already
    medlatent's. LoRA adapters, if any (a released multi-channel checkpoint, to train further), are merged.
    """
    sd = unwrap_state_dict(sd)
    if any(k.startswith(_LDM_PREFIX) for k in sd):
        sd = {k[len(_LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(_LDM_PREFIX)}
    return merge_lora(attention_as_conv(keep_autoencoder_keys(sd)))




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
