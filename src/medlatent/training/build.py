"""Build the network a training run starts from: architecture, initial weights, LoRA, 2D→3D inflation."""

from __future__ import annotations

import dataclasses

from torch import nn

from medlatent.checkpoints import (
    LINEAR_RESAMPLE_TAPS,
    inflate_2d_to_3d,
    load_pretrained,
    load_state_dict_strict,
    strip_training_keys,
)
from medlatent.model import MedVAE, MedVAEConfig
from medlatent.model.lora import inject_lora
from medlatent.model.residual_init import zero_init_residual
from medlatent.registry import get_model_info
from medlatent.training.config import INFLATE_RESAMPLE, ConfigError, TrainConfig


def architecture(cfg: TrainConfig) -> MedVAEConfig:
    """The MedVAEConfig of the run: the registry member ``model.name`` with ``model.arch`` overrides."""
    m = cfg.model
    try:
        if m.name:
            base = get_model_info(m.name).config
            arch = dataclasses.replace(base, **m.arch) if m.arch else base
        else:
            arch = MedVAEConfig(**m.arch)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.train.stage == "stage2_3d" and arch.spatial_dims != 3:
        arch = dataclasses.replace(arch, spatial_dims=3)
    if arch.spatial_dims != cfg.data.spatial_dims:
        raise ConfigError(f"model is {arch.spatial_dims}D but data.spatial_dims is {cfg.data.spatial_dims}; "
                          f"set data.spatial_dims={arch.spatial_dims}")
    return arch


def _load(source: str) -> MedVAE:
    from medlatent.hub import WeightsNotFoundError

    try:
        return load_pretrained(source)
    except WeightsNotFoundError as e:  # its own message names options of other commands (--checkpoint)
        raise ConfigError(
            f"the released weights of {source} are not available here: {e.summary}. Download them where the Hub "
            f"is reachable (`{e.download_command}`) and start from the file: model.init=PATH with `medlatent "
            "train`, or `medlatent finetune PATH DATA -o RUN_DIR`; or copy a Hugging Face cache (HF_HOME) that "
            "holds them to this machine"
        ) from e
    except KeyError as e:
        raise ConfigError(f"cannot load {source!r}: {e.args[0]}") from e
    except Exception as e:
        raise ConfigError(f"cannot load {source!r}: {e}") from e


def inflate(model2d: MedVAE, arch: MedVAEConfig, resample: str = "centre") -> MedVAE:
    """A 3D model whose kernels are the 2D kernels in the centre slice (zeros elsewhere); with ``resample="linear"``
    the down/upsampling kernels are spread along the new axis instead (:data:`LINEAR_RESAMPLE_TAPS`)."""
    if resample not in INFLATE_RESAMPLE:  # checked with the config too; this is a library entry point
        raise ValueError(f"resample must be one of {', '.join(INFLATE_RESAMPLE)}, got {resample!r}")
    sd = strip_training_keys(model2d.state_dict())
    model = MedVAE(arch)
    taps = LINEAR_RESAMPLE_TAPS if resample == "linear" else None
    load_state_dict_strict(model, inflate_2d_to_3d(sd, resample_taps=taps), "inflated 2D model")
    return model


def _quant_params(model: MedVAE) -> list[nn.Parameter]:
    """``quant_conv`` and ``post_quant_conv``, made trainable: the official LoRA fine-tuning optimises them in full
    beside the adapters (its optimiser holds them and nothing freezes them)."""
    params = [*model.quant_conv.parameters(), *model.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def build_model(cfg: TrainConfig, weights_follow: bool = False) -> tuple[MedVAE, list[nn.Parameter]]:
    """The model and the parameters the stage trains.

    * stage 1 — every autoencoder weight, or the LoRA adapters when ``model.lora_rank > 0`` (plus
      ``quant_conv``/``post_quant_conv`` unless ``model.lora_train_quant`` is false); the stage-2 head is frozen.
    * stage 2 (2D) — only the stage-2 projection head (``channel_ds``/``channel_proj``); the VAE is frozen.
    * stage 2 (3D) — the inflated 3D autoencoder, trained like stage 1 on 3D patches.
    """
    arch = architecture(cfg)
    m, stage = cfg.model, cfg.train.stage
    lora_params: list[nn.Parameter] | None = None
    if m.init.startswith("natural:"):
        from medlatent.training.natural import load_natural_vae

        model, lora_params = load_natural_vae(m.init.split(":", 1)[1], lora_rank=m.lora_rank or None)
        if model.config != arch:
            raise ConfigError(f"model.init {m.init}: the natural-image VAE has architecture {model.config}, "
                              f"the config asks for {arch}")
    elif stage == "stage2_3d" and m.inflate_from:
        model = inflate(_load(m.inflate_from), arch, m.inflate_resample)
    elif m.init == "random":
        model = MedVAE(arch)
        if m.zero_init_residual:
            zero_init_residual(model)
    elif m.init == "codec":
        from medlatent.training.codec_init import codec_from_data

        # ``weights_follow``: a checkpoint overwrites the weights next (a resumed run), so skip the fit
        model = MedVAE(arch) if weights_follow else codec_from_data(arch, cfg.data, seed=cfg.train.seed)
    else:
        model = _load(m.name if m.init == "pretrained" else m.init)
        if model.config != arch:
            raise ConfigError(f"model.init {m.init!r} has architecture {model.config.to_dict()}, "
                              f"which differs from the config's {arch.to_dict()}")
    started = model.weights_info
    model.weights_info = {"model": cfg.export_name(), "weights": m.init}
    if "sha256" in started:  # where a fine-tuned model came from, recorded in its config.json
        model.weights_info.update(init_model=started.get("model", ""), init_sha256=started["sha256"])

    if stage == "stage2":
        if not arch.stage2_head:
            raise ConfigError("stage2 trains the stage-2 head; the architecture has stage2_head: false")
        model.requires_grad_(False)
        params = [*model.channel_ds.parameters(), *model.channel_proj.parameters()]
        for p in params:
            p.requires_grad_(True)
        return model, params
    if lora_params is None and m.lora_rank > 0:
        lora_params = inject_lora(model, rank=m.lora_rank)
    if lora_params is not None:
        return model, lora_params + (_quant_params(model) if m.lora_train_quant else [])
    if arch.stage2_head:  # untouched by the stage-1 losses; frozen so DDP sees no unused parameters
        model.channel_ds.requires_grad_(False)
        model.channel_proj.requires_grad_(False)
    return model, [p for p in model.parameters() if p.requires_grad]

