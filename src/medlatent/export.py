"""Write a MedVAE in other frameworks' formats: a diffusers ``AutoencoderKL`` folder, a MONAI ``AutoencoderKL`` state
dict with its constructor arguments, or ONNX encoder/decoder graphs (``medlatent export MODEL --to … -o DIR``).

Every target gives the posterior mean ``z`` and the decoding of medlatent to float rounding (checked in
``tests/test_export.py``). What a target cannot express is refused or named:

* diffusers: 2D only (its AutoencoderKL has 2D convolutions); ``z_channels`` must equal ``embed_dim`` (it has one
  ``latent_channels``); the stage-2 head has no place in it and is written beside it (``medlatent_stage2.safetensors``),
  which :meth:`MedVAE.from_pretrained` reads back.
* MONAI: its AutoencoderKL applies no SiLU between the last GroupNorm and the output convolution of the encoder and
  the decoder (medlatent, latent diffusion and diffusers do); no weights can make up for a missing nonlinearity, so
  :func:`load_monai` adds it back with two forward hooks (keys and class unchanged). Its encoder outputs
  ``latent_channels`` (not ``2·C``) features, from which the mean and the log-variance each take a 1×1 conv: the mean
  is exact (``quant_conv`` folded into the output conv), the variance cannot be expressed and is set to the clamp
  floor (σ = e⁻¹⁵), so MONAI's sampling returns the mean, medlatent's latent of record. MONAI shares
  ``num_res_blocks`` between encoder and decoder, while the decoder has one block more per level: the encoder gets one
  extra residual block per level whose residual branch is zero, an exact identity. A model without mid-block
  attention has no mid block in MONAI (``with_*_nonlocal_attn=False`` drops the two residual blocks around the
  attention too): its two mid blocks become two more blocks of the lowest-resolution level, same width.
* ONNX: the encoder (``image`` → ``z``, plus ``stage2`` with a stage-2 head) and the decoder (``z`` → ``image``) as
  two graphs with dynamic batch and spatial axes, traced with the standard ops (nearest upsampling + convolution, one
  attention call) rather than the inference-time sub-pixel convolution, which computes the same values.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from medlatent.checkpoints import (
    DIFFUSERS_META_KEY,
    DIFFUSERS_STAGE2_FILE,
    StateDict,
    diffusers_to_medlatent_key,
)
from medlatent.model.autoencoder import MedVAE
from medlatent.optional import import_optional

logger = logging.getLogger(__name__)

TARGETS = ("diffusers", "monai", "onnx")
EXPORT_INSTALL = "pip install 'medlatent[export]'"
MONAI_ARGS_FILE = "monai_autoencoderkl.json"
MONAI_WEIGHTS_FILE = "monai_autoencoderkl.safetensors"
ONNX_ENCODER_FILE = "encoder.onnx"
ONNX_DECODER_FILE = "decoder.onnx"
_STAGE2_PREFIXES = ("channel_ds.", "channel_proj.")
_LOGVAR_FLOOR = -30.0  # the posterior's log-variance clamp: σ = e^-15


class ExportError(ValueError):
    """The model cannot be written in the requested format; the message says why."""


# ---------------------------------------------------------------------------------------------- scaling factor
@dataclass
class ScalingMeasurement:
    """``scaling_factor = 1 / std(z)`` over the latents of real images (how Stable Diffusion's 0.18215 was set)."""

    scaling_factor: float
    std: float
    mean: float
    channel_std: list[float]
    channel_mean: list[float]
    images: list[str] = field(default_factory=list)
    latent_values: int = 0
    how: str = ""


@torch.inference_mode()
def measure_scaling_factor(model: MedVAE, files: Iterable[str | Path] | None = None) -> ScalingMeasurement:
    """Measure ``1 / std(z)`` over the posterior means of real images, preprocessed as ``medlatent encode`` does.

    Args:
        model: the model whose latents are measured.
        files: images of the model's dimensionality; default: the offline sample set of ``medlatent samples``
            (pydicom's CT/MR slices, pydicom-data radiographs, CBIS-DDSM mammograms; a T1 volume for 3D models),
            block-averaged to at most 256 pixels (2D) or 64 voxels (3D) per axis.
    """
    from medlatent.io.readers import read_image
    from medlatent.pipeline import prepare

    with tempfile.TemporaryDirectory(prefix="medlatent-scale-") as tmp:
        if files is None:
            from medlatent.samples import gather

            files = [s.path for s in gather(tmp).written if s.dims == model.spatial_dims]
            how = "the offline sample images of `medlatent samples` (block-averaged to ≤256 px 2D, ≤64 voxels 3D)"
        else:
            how = "the given images"
        files = [Path(f) for f in files]
        if not files:
            raise ExportError(f"no {model.spatial_dims}D sample image to measure the scaling factor on "
                              "(pip install 'medlatent[samples]'), or pass --scaling-factor")
        dev = model.device
        zs, names = [], []
        for path in files:
            item = prepare(model, read_image(path))
            zs.append(model.encode(torch.from_numpy(item.x)[None].to(dev)).mean[0].float().cpu())
            names.append(path.name)
    flat = torch.cat([z.flatten() for z in zs]).double()
    per_channel = torch.cat([z.flatten(1) for z in zs], dim=1).double()
    std = float(flat.std())
    if not math.isfinite(std) or std <= 0:
        raise ExportError(f"the latents of {len(files)} images have standard deviation {std}; pass --scaling-factor")
    return ScalingMeasurement(
        scaling_factor=1.0 / std, std=std, mean=float(flat.mean()), channel_std=per_channel.std(dim=1).tolist(),
        channel_mean=per_channel.mean(dim=1).tolist(), images=names, latent_values=flat.numel(),
        how=f"1/std of the posterior mean z over all {flat.numel()} latent values of {len(names)} images: {how}, "
            "preprocessed as `medlatent encode` does (intensities to [-1, 1], padded to the model's stride)")


def _scaling(model: MedVAE, scaling_factor: float | None) -> ScalingMeasurement:
    if scaling_factor is None:
        return measure_scaling_factor(model)
    if not math.isfinite(scaling_factor) or scaling_factor <= 0:
        raise ExportError(f"the scaling factor must be a positive number, got {scaling_factor}")
    return ScalingMeasurement(scaling_factor=float(scaling_factor), std=1.0 / scaling_factor, mean=float("nan"),
                              channel_std=[], channel_mean=[], how="given by the user (--scaling-factor)")


# ---------------------------------------------------------------------------------------------- output folder
def _check_target(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ExportError(f"output {directory}: exists and is not an empty folder; choose a new folder for -o")


def _publish(tmp: Path, directory: Path) -> Path:
    """Move the finished export into place whole (no partial folder is ever left at ``directory``)."""
    if directory.exists():
        directory.rmdir()  # empty, checked before
    directory.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), str(directory))
    return directory


def _staging(directory: Path) -> tempfile.TemporaryDirectory:
    directory.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{directory.name}.", dir=directory.parent)


def _model_name(model: MedVAE) -> str:
    return model.weights_info.get("model") or "medvae"


def _state_dict(model: MedVAE) -> StateDict:
    # a model on the meta device maps its architecture alone (shapes, no values), e.g. to check a member cheaply
    dev = "meta" if model.device.type == "meta" else "cpu"
    return {k: v.detach().to(dev, torch.float32).contiguous() for k, v in model.state_dict().items()}


def _stage2(sd: StateDict) -> StateDict:
    return {k: v for k, v in sd.items() if k.startswith(_STAGE2_PREFIXES)}


def _require_one_latent_width(model: MedVAE, target: str) -> None:
    cfg = model.config
    if cfg.z_channels != cfg.embed_dim:
        raise ExportError(f"{target}'s AutoencoderKL has one latent width, but this model has z_channels="
                          f"{cfg.z_channels} and embed_dim={cfg.embed_dim} (no released member does)")


# ---------------------------------------------------------------------------------------------- diffusers
def diffusers_config(model: MedVAE, scaling_factor: float) -> dict[str, Any]:
    """Constructor arguments of the diffusers ``AutoencoderKL`` with this model's architecture."""
    cfg = model.config
    if cfg.spatial_dims != 2:
        raise ExportError("diffusers' AutoencoderKL is 2D only (Conv2d throughout); export a 3D model with "
                          "--to monai or --to onnx")
    _require_one_latent_width(model, "diffusers")
    levels = len(cfg.ch_mult)
    return {
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu", "latent_channels": cfg.embed_dim, "norm_num_groups": cfg.norm_groups,
        "sample_size": model.max_tile or 512, "scaling_factor": scaling_factor, "force_upcast": True,
        "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": cfg.mid_attention,
    }


def to_diffusers_state_dict(sd: StateDict, diffusers_keys: dict[str, torch.Size], levels: int) -> StateDict:
    """medlatent state dict → diffusers ``AutoencoderKL`` state dict, by inverting
    :func:`medlatent.checkpoints.diffusers_to_medlatent_key` over the diffusers model's own keys (and shapes: the
    attention projections are ``Linear`` there, 1×1 convs here)."""
    out: StateDict = {}
    for key, shape in diffusers_keys.items():
        ours = diffusers_to_medlatent_key(key, levels)
        if ours not in sd:
            raise ExportError(f"diffusers parameter {key!r} (medlatent {ours!r}) has no counterpart in the model")
        out[key] = sd[ours].reshape(shape)
    unused = sorted(set(sd) - {diffusers_to_medlatent_key(k, levels) for k in diffusers_keys} - set(_stage2(sd)))
    if unused:
        raise ExportError(f"medlatent parameters with no place in diffusers' AutoencoderKL: {', '.join(unused[:6])}")
    return out


def _diffusers_readme(model: MedVAE, scale: ScalingMeasurement) -> str:
    name = _model_name(model)
    lines = [
        f"# {name} as a diffusers AutoencoderKL",
        "",
        "Written by `medlatent export`. Load it with `diffusers.AutoencoderKL.from_pretrained(THIS_FOLDER)`, or back",
        "into medlatent with `MedVAE.from_pretrained(THIS_FOLDER)`. The posterior mean (`encode(x).latent_dist.mean`)",
        "and `decode(z).sample` equal medlatent's to float rounding. Images: "
        f"{model.config.in_channels} channel(s), intensities in [-1, 1] as medlatent's preprocessing makes them, "
        f"sizes multiples of {model.downsample_per_axis}. On a CPU, run it channels-last as medlatent does",
        "(`vae.to(memory_format=torch.channels_last)`): a model whose activations reach the hundreds (the bundled",
        "default carries a ~1000-valued channel through its encoder's mid block) loses ~1e-3 in z to the rounding of",
        "PyTorch's contiguous-format CPU convolution.",
        "",
        f"## scaling_factor = {scale.scaling_factor:.6g}",
        "",
        f"Latents are multiplied by `scaling_factor` before a diffusion model sees them: {scale.how}.",
    ]
    if scale.images:
        lines += [f"std(z) = {scale.std:.6g}, mean(z) = {scale.mean:.6g}; per channel std "
                  f"{[round(s, 5) for s in scale.channel_std]}, mean {[round(m, 5) for m in scale.channel_mean]}.",
                  f"Images: {', '.join(scale.images)}."]
    if model.config.stage2_head:
        lines += ["", f"The stage-2 head (`channel_ds`, `channel_proj`) has no place in diffusers' AutoencoderKL; it "
                      f"is in `{DIFFUSERS_STAGE2_FILE}` (medlatent's key names), which `MedVAE.from_pretrained` reads."]
    return "\n".join(lines) + "\n"


def to_diffusers(model: MedVAE, directory: str | Path, *, scaling_factor: float | None = None) -> Path:
    """Write a folder that ``diffusers.AutoencoderKL.from_pretrained`` loads (2D members only).

    Args:
        model: a 2D MedVAE.
        directory: a new (or empty) folder.
        scaling_factor: the config's ``scaling_factor``; default measured on real images
            (:func:`measure_scaling_factor`), and how it was measured is written to ``README.md`` and
            ``config.json`` (key ``_medlatent``).
    """
    directory = Path(directory)
    config = diffusers_config(model, 1.0)
    _check_target(directory)
    diffusers = import_optional("diffusers", "export to diffusers", EXPORT_INSTALL)
    scale = _scaling(model, scaling_factor)
    config["scaling_factor"] = scale.scaling_factor
    net = diffusers.AutoencoderKL(**config)
    sd = _state_dict(model)
    keys = {k: v.shape for k, v in net.state_dict().items()}
    net.load_state_dict(to_diffusers_state_dict(sd, keys, len(model.config.ch_mult)), strict=True)
    with _staging(directory) as tmp:
        staged = Path(tmp) / "out"
        net.save_pretrained(staged, safe_serialization=True)
        cfg_path = staged / "config.json"
        meta = json.loads(cfg_path.read_text())
        meta[DIFFUSERS_META_KEY] = {"model": _model_name(model), "max_tile": model.max_tile,
                                    "source": {k: v for k, v in model.weights_info.items() if k != "model"},
                                    "scaling_factor": asdict(scale)}
        cfg_path.write_text(json.dumps(meta, indent=2) + "\n")
        if model.config.stage2_head:
            from safetensors.torch import save_file

            save_file(_stage2(sd), str(staged / DIFFUSERS_STAGE2_FILE), metadata={"format": "pt"})
        (staged / "README.md").write_text(_diffusers_readme(model, scale))
        return _publish(staged, directory)


# ---------------------------------------------------------------------------------------------- MONAI
def monai_arguments(model: MedVAE) -> dict[str, Any]:
    """Constructor arguments of ``monai.networks.nets.AutoencoderKL`` for this model (2D or 3D)."""
    cfg = model.config
    _require_one_latent_width(model, "MONAI")
    levels, attn = len(cfg.ch_mult), cfg.mid_attention
    return {
        "spatial_dims": cfg.spatial_dims, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        # MONAI's encoder and decoder share this count; the decoder needs one more (see the module docstring)
        # without mid attention MONAI has no mid block: the lowest level takes our two mid ResnetBlocks
        "num_res_blocks": [cfg.num_res_blocks + 1] * (levels - 1) + [cfg.num_res_blocks + 1 + 2 * (not attn)],
        "channels": [cfg.ch * m for m in cfg.ch_mult],
        "attention_levels": [False] * levels, "latent_channels": cfg.embed_dim, "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-6, "with_encoder_nonlocal_attn": cfg.mid_attention,
        "with_decoder_nonlocal_attn": cfg.mid_attention,
        "use_convtranspose": False, "include_fc": True, "use_combined_linear": False, "use_flash_attention": True,
    }


def _resblock(sd: StateDict, src: str, dst: str) -> StateDict:
    out = {f"{dst}.norm1.{p}": sd[f"{src}.norm1.{p}"] for p in ("weight", "bias")}
    out |= {f"{dst}.norm2.{p}": sd[f"{src}.norm2.{p}"] for p in ("weight", "bias")}
    for conv in ("conv1", "conv2", "nin_shortcut"):
        if f"{src}.{conv}.weight" in sd:
            out |= {f"{dst}.{conv}.conv.{p}": sd[f"{src}.{conv}.{p}"] for p in ("weight", "bias")}
    return out


def _identity_resblock(sd: StateDict, like: str, dst: str) -> StateDict:
    """A residual block whose residual branch is zero: ``x + 0``, exactly the identity."""
    out = {}
    for name in ("norm1", "norm2"):  # the level's width: norm2 of the level's last block
        out[f"{dst}.{name}.weight"] = torch.ones_like(sd[f"{like}.norm2.weight"])
        out[f"{dst}.{name}.bias"] = torch.zeros_like(sd[f"{like}.norm2.bias"])
    for name in ("conv1", "conv2"):
        out[f"{dst}.{name}.conv.weight"] = torch.zeros_like(sd[f"{like}.conv2.weight"])
        out[f"{dst}.{name}.conv.bias"] = torch.zeros_like(sd[f"{like}.conv2.bias"])
    return out


def _mid_blocks(sd: StateDict, src: str, dst: str, first: int) -> StateDict:
    """``mid.block_1``, ``mid.block_2`` as MONAI's level blocks ``first``, ``first + 1`` (an attention-free model)."""
    return _resblock(sd, f"{src}.mid.block_1", f"{dst}.blocks.{first}") | \
        _resblock(sd, f"{src}.mid.block_2", f"{dst}.blocks.{first + 1}")


def _mid(sd: StateDict, src: str, dst: str, first: int) -> StateDict:
    out = _resblock(sd, f"{src}.mid.block_1", f"{dst}.blocks.{first}")
    attn = f"{dst}.blocks.{first + 1}"
    out |= {f"{attn}.norm.{p}": sd[f"{src}.mid.attn_1.norm.{p}"] for p in ("weight", "bias")}
    for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "out_proj")):
        w = sd[f"{src}.mid.attn_1.{ours}.weight"]
        out[f"{attn}.attn.{theirs}.weight"] = w.reshape(w.shape[0], w.shape[1])
        out[f"{attn}.attn.{theirs}.bias"] = sd[f"{src}.mid.attn_1.{ours}.bias"]
    return out | _resblock(sd, f"{src}.mid.block_2", f"{dst}.blocks.{first + 2}")


def _folded_mean_conv(sd: StateDict, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant_conv``'s mean rows applied after ``encoder.conv_out``, as one conv (a 1×1 after a 3×3 is exact)."""
    w, b = sd["encoder.conv_out.weight"].double(), sd["encoder.conv_out.bias"].double()
    q = sd["quant_conv.weight"].double().flatten(1)[:c]  # C × 2z
    qb = sd["quant_conv.bias"].double()[:c]
    folded = torch.einsum("cj,j...->c...", q, w)
    return folded.float(), (q @ b + qb).float()


def to_monai_state_dict(model: MedVAE) -> tuple[StateDict, list[str]]:
    """The state dict of ``monai.networks.nets.AutoencoderKL(**monai_arguments(model))``, and the names of the two
    GroupNorms after which MONAI lacks the SiLU that :func:`load_monai` adds back."""
    cfg, sd = model.config, _state_dict(model)
    n, levels, c, attn = cfg.num_res_blocks, len(cfg.ch_mult), cfg.embed_dim, cfg.mid_attention
    out: StateDict = {f"encoder.blocks.0.conv.{p}": sd[f"encoder.conv_in.{p}"] for p in ("weight", "bias")}
    i = 1
    for level in range(levels):
        for j in range(n):
            out |= _resblock(sd, f"encoder.down.{level}.block.{j}", f"encoder.blocks.{i}")
            i += 1
        if level == levels - 1 and not attn:
            out |= _mid_blocks(sd, "encoder", "encoder", i)
            i += 2
        out |= _identity_resblock(sd, f"encoder.down.{level}.block.{n - 1}", f"encoder.blocks.{i}")
        i += 1
        if level != levels - 1:
            out |= {f"encoder.blocks.{i}.conv.conv.{p}": sd[f"encoder.down.{level}.downsample.conv.{p}"]
                    for p in ("weight", "bias")}
            i += 1
    if attn:
        out |= _mid(sd, "encoder", "encoder", i)
        i += 3
    encoder_norm = f"encoder.blocks.{i}"
    out |= {f"{encoder_norm}.{p}": sd[f"encoder.norm_out.{p}"] for p in ("weight", "bias")}
    out[f"encoder.blocks.{i + 1}.conv.weight"], out[f"encoder.blocks.{i + 1}.conv.bias"] = _folded_mean_conv(sd, c)
    eye = torch.eye(c).reshape(c, c, *(1,) * cfg.spatial_dims)
    out |= {"quant_conv_mu.conv.weight": eye, "quant_conv_mu.conv.bias": torch.zeros(c),
            "quant_conv_log_sigma.conv.weight": torch.zeros_like(eye),
            "quant_conv_log_sigma.conv.bias": torch.full((c,), _LOGVAR_FLOOR),
            "post_quant_conv.conv.weight": sd["post_quant_conv.weight"],
            "post_quant_conv.conv.bias": sd["post_quant_conv.bias"]}
    out |= {f"decoder.blocks.0.conv.{p}": sd[f"decoder.conv_in.{p}"] for p in ("weight", "bias")}
    if attn:
        out |= _mid(sd, "decoder", "decoder", 1)
        i = 4
    else:
        out |= _mid_blocks(sd, "decoder", "decoder", 1)
        i = 3
    for level in reversed(range(levels)):
        for j in range(n + 1):
            out |= _resblock(sd, f"decoder.up.{level}.block.{j}", f"decoder.blocks.{i}")
            i += 1
        if level != 0:
            out |= {f"decoder.blocks.{i}.postconv.conv.{p}": sd[f"decoder.up.{level}.upsample.conv.{p}"]
                    for p in ("weight", "bias")}
            i += 1
    decoder_norm = f"decoder.blocks.{i}"
    out |= {f"{decoder_norm}.{p}": sd[f"decoder.norm_out.{p}"] for p in ("weight", "bias")}
    out |= {f"decoder.blocks.{i + 1}.conv.{p}": sd[f"decoder.conv_out.{p}"] for p in ("weight", "bias")}
    return {k: v.contiguous() for k, v in out.items()}, [encoder_norm, decoder_norm]


def to_monai(model: MedVAE, directory: str | Path, *, scaling_factor: float | None = None) -> Path:
    """Write ``monai_autoencoderkl.safetensors`` (the state dict) and ``monai_autoencoderkl.json`` (constructor
    arguments, the two GroupNorms that need a SiLU after them, ``scale_factor`` and how it was measured).

    MONAI is not needed to write them; :func:`load_monai` builds the network from them.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    args = monai_arguments(model)
    _check_target(directory)
    sd, silu_after = to_monai_state_dict(model)
    scale = _scaling(model, scaling_factor)
    meta = {"class": "monai.networks.nets.AutoencoderKL", "arguments": args, "weights": MONAI_WEIGHTS_FILE,
            "silu_after": silu_after, "model": _model_name(model), "scale_factor": scale.scaling_factor,
            "scale_factor_measured": asdict(scale),
            "notes": ["MONAI's AutoencoderKL has no SiLU after the GroupNorms named in silu_after (medlatent does): "
                      "medlatent.export.load_monai(folder) adds it with forward hooks; a stock MONAI network built "
                      "from these files alone gives different latents.",
                      "z_mu is the posterior mean exactly; the variance is not expressible (MONAI's encoder passes "
                      "latent_channels, not 2*C, features) and is set to e^-15, so sampling returns the mean.",
                      "the encoder's last residual block of every level is an exact identity (zero residual branch): "
                      "MONAI shares num_res_blocks between encoder and decoder."]}
    if model.config.stage2_head:
        meta["notes"].append("the stage-2 head (channel_ds, channel_proj) is not part of MONAI's network and is "
                             "not written; use medlatent for stage-2 features")
    with _staging(directory) as tmp:
        staged = Path(tmp) / "out"
        staged.mkdir()
        save_file(sd, str(staged / MONAI_WEIGHTS_FILE), metadata={"format": "pt"})
        (staged / MONAI_ARGS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return _publish(staged, directory)


def load_monai(directory: str | Path) -> nn.Module:
    """Build the MONAI ``AutoencoderKL`` written by :func:`to_monai`, with its weights and the two SiLUs added back
    as forward hooks; ``encode(x)[0]`` is medlatent's ``z`` and ``decode(z)`` its decoding. Eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    nets = import_optional("monai.networks.nets", "loading a MONAI export", "pip install 'monai>=1.3' einops")
    path = directory / MONAI_ARGS_FILE
    try:
        meta = json.loads(path.read_text())
        net = nets.AutoencoderKL(**meta["arguments"])
        net.load_state_dict(load_file(str(directory / meta["weights"])), strict=True)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, RuntimeError) as e:
        raise ExportError(f"{path}: not a MONAI export written by medlatent: {type(e).__name__}: {e}") from e
    for name in meta["silu_after"]:
        net.get_submodule(name).register_forward_hook(lambda _m, _i, out: torch.nn.functional.silu(out))
    return net.eval()


# ---------------------------------------------------------------------------------------------- ONNX
class OnnxEncoder(nn.Module):
    """image ``B×C_in×…`` → posterior mean ``z`` (and stage-2 features), without medlatent's input checks."""

    def __init__(self, model: MedVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        z = m.quant_conv(m.encoder(x))[:, : m.config.embed_dim]
        if not m.config.stage2_head:
            return z
        return z, m.channel_proj(m.channel_ds(z) + z)


class OnnxDecoder(nn.Module):
    """latent ``z`` → image, without medlatent's input checks."""

    def __init__(self, model: MedVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(self.model.post_quant_conv(z))


def _spatial_axes(dims: int, prefix: str) -> dict[int, str]:
    names = ("height", "width") if dims == 2 else ("x", "y", "z")
    return {0: "batch", **{2 + i: f"{prefix}_{n}" for i, n in enumerate(names)}}


def to_onnx(model: MedVAE, directory: str | Path, *, opset: int = 17) -> Path:
    """Write ``encoder.onnx`` and ``decoder.onnx`` (dynamic batch and spatial axes) and ``onnx.json`` (I/O names)."""
    directory = Path(directory)
    _check_target(directory)
    import_optional("onnx", "export to ONNX", EXPORT_INSTALL)
    cfg, s = model.config, model.downsample_per_axis
    stage2 = cfg.stage2_head
    dev, dtype = model.device, model.dtype
    x = torch.zeros(1, cfg.in_channels, *(2 * s,) * cfg.spatial_dims, device=dev, dtype=dtype)
    z = torch.zeros(1, cfg.embed_dim, *(2,) * cfg.spatial_dims, device=dev, dtype=dtype)
    enc_out = ["z", "stage2"] if stage2 else ["z"]
    with _staging(directory) as tmp:
        staged = Path(tmp) / "out"
        staged.mkdir()
        # grad mode selects the standard ops (nearest upsampling + conv, out-of-place adds) that ONNX expresses;
        # inference mode's sub-pixel convolution computes the same values with data-dependent slicing
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shape-dependent Python branches, fixed for any size
            torch.onnx.export(OnnxEncoder(model), (x,), str(staged / ONNX_ENCODER_FILE), input_names=["image"],
                              output_names=enc_out, opset_version=opset, dynamo=False,
                              dynamic_axes={"image": _spatial_axes(cfg.spatial_dims, "image"),
                                            **{o: _spatial_axes(cfg.spatial_dims, "latent") for o in enc_out}})
            torch.onnx.export(OnnxDecoder(model), (z,), str(staged / ONNX_DECODER_FILE), input_names=["z"],
                              output_names=["image"], opset_version=opset, dynamo=False,
                              dynamic_axes={"z": _spatial_axes(cfg.spatial_dims, "latent"),
                                            "image": _spatial_axes(cfg.spatial_dims, "image")})
        meta = {"model": _model_name(model), "spatial_dims": cfg.spatial_dims, "in_channels": cfg.in_channels,
                "latent_channels": cfg.embed_dim, "downsample_per_axis": s, "opset": opset,
                "encoder": {"file": ONNX_ENCODER_FILE, "inputs": ["image"], "outputs": enc_out},
                "decoder": {"file": ONNX_DECODER_FILE, "inputs": ["z"], "outputs": ["image"]},
                "notes": f"images in [-1, 1] with {cfg.in_channels} channel(s), sizes multiples of {s}; z is the "
                         "posterior mean"}
        (staged / "onnx.json").write_text(json.dumps(meta, indent=2) + "\n")
        return _publish(staged, directory)


def export(model: MedVAE, target: str, directory: str | Path, *, scaling_factor: float | None = None) -> Path:
    """Write ``model`` for ``target`` (``diffusers``, ``monai`` or ``onnx``) into ``directory``."""
    if target == "diffusers":
        return to_diffusers(model, directory, scaling_factor=scaling_factor)
    if target == "monai":
        return to_monai(model, directory, scaling_factor=scaling_factor)
    if target == "onnx":
        return to_onnx(model, directory)
    raise ExportError(f"unknown export target {target!r}; use one of {', '.join(TARGETS)}")


__all__ = [
    "ExportError",
    "ScalingMeasurement",
    "diffusers_config",
    "export",
    "load_monai",
    "measure_scaling_factor",
    "monai_arguments",
    "to_diffusers",
    "to_diffusers_state_dict",
    "to_monai",
    "to_monai_state_dict",
    "to_onnx",
]
