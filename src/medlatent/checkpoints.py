"""Reading, converting and writing MedVAE weights.

Conversions are pure ``state_dict → state_dict`` functions (:func:`merge_lora`,
:func:`inflate_2d_to_3d`, :func:`convert_official_state_dict`); models are then loaded with ``strict=True``.
Our own format is a directory with ``config.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Mapping

import torch

from medlatent._version import __version__
from medlatent.io.atomic import atomic_write
from medlatent.model.autoencoder import MedVAE
from medlatent.model.config import MedVAEConfig
from medlatent.model.lora import merged_weight
from medlatent.registry import ModelInfo, get_model_info, list_models

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
# Keys of training-only modules (e.g. the discriminator/LPIPS of an LDM training checkpoint).
_TRAINING_ONLY_PREFIXES = ("loss.",)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- reading
def read_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> StateDict:
    """Read a state dict from an official ``.ckpt``/``.pt`` (a dict with ``state_dict`` or a raw state
    dict) without executing pickled code (``weights_only=True``), or from a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: the checkpoint holds Python objects beyond tensors, which medlatent does not unpickle "
            f"(weights_only=True, for safety). Re-save only its state_dict: "
            f"torch.save({{'state_dict': ckpt['state_dict']}}, 'clean.ckpt') in a trusted environment. ({e})"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict (or a dict with 'state_dict'), got {type(obj).__name__}")
    return dict(sd)


# ---------------------------------------------------------------------------------------------- conversions
def merge_lora(sd: Mapping[str, torch.Tensor], scale: float = 1.0) -> StateDict:
    """Fold LoRA adapters into the wrapped layers: ``W' = W + scale · up ∘ down``.

    Adapters are stored as ``<layer>.conv.{weight,bias}``, ``<layer>.lora_down.weight`` (``r×in×k…``)
    and ``<layer>.lora_up.weight`` (``out×r×1…``); linear layers use ``<layer>.linear.*``. The result
    holds plain ``<layer>.weight``/``<layer>.bias`` keys, so inference costs nothing extra and outputs are
    unchanged (the adapter's dropout is inactive at inference).
    """
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        base = key[: -len(".lora_down.weight")]
        down = out.pop(key)
        up = out.pop(f"{base}.lora_up.weight", None)
        if up is None:
            raise CheckpointError(f"LoRA adapter {base!r} has lora_down but no lora_up weight")
        inner = "conv" if f"{base}.conv.weight" in out else "linear"
        weight = out.pop(f"{base}.{inner}.weight", None)
        if weight is None:
            raise CheckpointError(f"LoRA adapter {base!r} wraps no '{base}.conv.weight' / '{base}.linear.weight'")
        r = down.shape[0]
        if up.shape[1] != r or up.shape[0] != weight.shape[0] or down.shape[1:] != weight.shape[1:]:
            raise CheckpointError(
                f"LoRA adapter {base!r}: shapes do not chain (weight {tuple(weight.shape)}, "
                f"down {tuple(down.shape)}, up {tuple(up.shape)})"
            )
        out[f"{base}.weight"] = merged_weight(weight, down, up, scale)
        bias = out.pop(f"{base}.{inner}.bias", None)
        if bias is not None:
            out[f"{base}.bias"] = bias
        out.pop(f"{base}.selector.weight", None)  # an identity-initialised selector, if one was saved
    return out


#: the resampling convolutions (stride-2 ``Downsample`` and the conv after ×2 nearest ``Upsample``)
_RESAMPLE_WEIGHT = re.compile(r"\.(downsample|upsample)\.conv\.weight$")
#: taps along the new axis that make the resampling convs linear, by kind: the stride-2 ``Downsample`` (output plane
#: ``j`` reads planes ``2j, 2j+1, 2j+2``) averages the pair ``2j, 2j+1`` that latent plane ``j`` stands for (the
#: alignment the ×2 upsampling assumes); the conv after ×2 nearest ``Upsample`` gets [¼, ½, ¼], which makes it
#: exactly linear interpolation (¾/¼ of the two nearest planes). Measured on a 64³ block of a training volume: the
#: inflated default at 23.2 dB with these, 21.0 with every kernel centred, 21.0 with [¼, ½, ¼] for both.
LINEAR_RESAMPLE_TAPS: dict[str, tuple[float, ...]] = {"downsample": (0.5, 0.5, 0.0), "upsample": (0.25, 0.5, 0.25)}


def inflate_2d_to_3d(sd: Mapping[str, torch.Tensor], axis: int = -1,
                     resample_taps: Mapping[str, tuple[float, ...]] | None = None) -> StateDict:
    """Lift 2D conv kernels to 3D by kernel centring (paper §3, 3D stage 2).

    Each ``O×I×kh×kw`` kernel becomes ``O×I×…×…×…`` with the 2D kernel in the centre slice of a new
    spatial axis of size ``kw`` and zeros elsewhere, so the 3D model initially acts slice by slice.
    ``axis`` is where the new kernel axis goes among the three spatial axes (default: last, the slice
    axis of medlatent's ``B×C×X×Y×Z`` volumes — as the official 3D training did). Biases, norms and all
    other parameters are copied.

    ``resample_taps`` (``{"downsample": taps, "upsample": taps}``, e.g. :data:`LINEAR_RESAMPLE_TAPS`): the down-
    and upsampling kernels are spread over the new axis with these weights instead (the 2D kernel times each tap),
    so the inflated model resamples the new axis linearly rather than keeping every other slice and repeating
    slices on the way back; every other kernel is centred as in the paper.
    """
    if axis not in (-1, -2, -3, 0, 1, 2):
        raise ValueError(f"axis must index one of the three spatial axes (0, 1, 2 or -3, -2, -1), got {axis}")
    pos = 2 + (axis % 3)  # index in O×I×D×H×W
    out: StateDict = {}
    for key, t in sd.items():
        if key.endswith(".weight") and t.ndim == 4:
            k = t.shape[-1]
            kind = _RESAMPLE_WEIGHT.search(key)
            if resample_taps is not None and kind:
                taps = torch.tensor(resample_taps[kind[1]], dtype=t.dtype)
                if len(taps) != k:
                    raise ValueError(f"{len(taps)} resample taps for the {k}-tap kernel {key!r}")
                out[key] = (t.unsqueeze(-1) * taps).movedim(-1, pos).contiguous()
                continue
            w = t.new_zeros(*t.shape, k).movedim(-1, pos)  # O×I×(3 spatial), new axis at `pos`
            w.narrow(pos, k // 2, 1).copy_(t.unsqueeze(pos))
            out[key] = w.contiguous()
        else:
            out[key] = t.clone()
    return out


# ---- the diffusers AutoencoderKL layout (natural-image VAEs; folders written by medlatent.export)
#: the modules of an autoencoder; everything else in a training checkpoint (``loss.*``: discriminator,
#: LPIPS, learned log-variance; a full LDM's UNet and text encoder) is dropped.
_MODEL_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "channel_ds.", "channel_proj.")
_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v",
               "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def unwrap_state_dict(sd: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint's ``{"state_dict": …}``, or ``sd`` itself."""
    inner = sd.get("state_dict")
    return dict(inner) if isinstance(inner, Mapping) else dict(sd)  # type: ignore[arg-type]


def keep_autoencoder_keys(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Only the autoencoder's tensors (``encoder.*``, ``decoder.*``, ``quant_conv.*``, …); refuses a file with none."""
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


def attention_as_conv(sd: StateDict) -> StateDict:
    """Attention projections stored as ``Linear`` (``C×C``) become 1×1 convs (``C×C×1×1``)."""
    return {k: v[..., None, None] if v.ndim == 2 and _ATTN_WEIGHT.search(k) else v for k, v in sd.items()}


def diffusers_to_medlatent_key(key: str, num_up: int) -> str:
    """medlatent's name of one diffusers ``AutoencoderKL`` parameter (``num_up``: the decoder's levels)."""
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
    sd = keep_autoencoder_keys(unwrap_state_dict(sd))
    ups = {int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    num_up = max(ups) + 1 if ups else 0
    out: StateDict = {}
    for key, value in sd.items():
        new = diffusers_to_medlatent_key(key, num_up)
        if new in out:
            raise CheckpointError(f"two diffusers tensors map to {new!r} (the second is {key!r})")
        out[new] = value
    return attention_as_conv(out)


def is_diffusers_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``sd`` uses diffusers' ``AutoencoderKL`` names (``down_blocks``, ``mid_block``, …)."""
    return any(re.search(r"(^|\.)(down_blocks|up_blocks|mid_block|conv_norm_out)\.", k) for k in unwrap_state_dict(sd))

def strip_training_keys(sd: Mapping[str, torch.Tensor]) -> StateDict:
    dropped = [k for k in sd if k.startswith(_TRAINING_ONLY_PREFIXES)]
    if dropped:
        logger.info("ignoring %d training-only tensors (%s…)", len(dropped), dropped[0])
    return {k: v for k, v in sd.items() if not k.startswith(_TRAINING_ONLY_PREFIXES)}


def convert_official_state_dict(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Official MedVAE / LDM checkpoint → medlatent state dict (training-only keys dropped, LoRA merged)."""
    return merge_lora(strip_training_keys(sd))


def infer_config(sd: Mapping[str, torch.Tensor]) -> MedVAEConfig:
    """Recover the architecture from a (merged) state dict's shapes."""
    try:
        conv_in = sd["encoder.conv_in.weight"]
        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        ch = conv_in.shape[0]
        mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
        return MedVAEConfig(
            spatial_dims=conv_in.ndim - 2,
            in_channels=conv_in.shape[1],
            out_channels=sd["decoder.conv_out.weight"].shape[0],
            ch=ch,
            ch_mult=tuple(mult),
            num_res_blocks=len(blocks),
            z_channels=sd["decoder.conv_in.weight"].shape[1],
            embed_dim=sd["post_quant_conv.weight"].shape[1],
            stage2_head="channel_proj.weight" in sd,
            mid_attention="encoder.mid.attn_1.q.weight" in sd,
        )
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"cannot infer a MedVAE architecture from this state dict (missing {e})") from e


def load_state_dict_strict(model: MedVAE, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file, the keys and the shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" … (+{len(items) - 8})" if len(items) > 8 else "")

        parts = [f"missing keys: {show(missing)}" if missing else "",
                 f"unexpected keys: {show(unexpected)}" if unexpected else "",
                 f"shape mismatches: {show(shapes)}" if shapes else ""]
        raise CheckpointError(
            f"{source} does not fit the model architecture ({'; '.join(p for p in parts if p)}). "
            "Check that the model name matches the checkpoint (see `medlatent models`)."
        )
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------- our format
def save_pretrained(model: MedVAE, directory: str | Path, name: str | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = name or model.weights_info.get("model")
    meta = {"format": "medlatent", "format_version": FORMAT_VERSION, "medlatent_version": __version__,
            "model": name, "config": model.config.to_dict(),
            "source": {k: v for k, v in model.weights_info.items() if k != "model"}}
    if model.max_tile:
        meta["max_tile"] = model.max_tile
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_write(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_write(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return directory


#: the stage-2 head of a member exported to diffusers (which has no place for it), beside diffusers' weights
DIFFUSERS_STAGE2_FILE = "medlatent_stage2.safetensors"
DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
#: the key of a diffusers ``config.json`` that holds what medlatent wrote (diffusers ignores ``_``-keys)
DIFFUSERS_META_KEY = "_medlatent"


def is_diffusers_config(meta: Mapping[str, object]) -> bool:
    """Whether a ``config.json`` is a diffusers model's (``_class_name``) rather than medlatent's."""
    return "_class_name" in meta and "config" not in meta


def config_from_diffusers(meta: Mapping[str, object], stage2_head: bool) -> MedVAEConfig:
    """The :class:`MedVAEConfig` of a diffusers ``AutoencoderKL`` config; refuses what a MedVAE cannot express."""
    if meta.get("_class_name") != "AutoencoderKL":
        raise CheckpointError(f"a diffusers {meta.get('_class_name')}, not an AutoencoderKL")
    fixed = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True}
    odd = [f"{k}={meta[k]!r}" for k, v in fixed.items() if k in meta and meta[k] != v]
    odd += [f"{k}={meta[k]!r}" for k, kind in (("down_block_types", "DownEncoderBlock2D"),
                                                ("up_block_types", "UpDecoderBlock2D"))
            if any(t != kind for t in meta.get(k, []))]
    if odd:
        raise CheckpointError(f"{', '.join(odd)}: a MedVAE has SiLU, quant convs and "
                              "plain DownEncoderBlock2D/UpDecoderBlock2D blocks")
    try:
        widths = [int(w) for w in meta["block_out_channels"]]
        ch = widths[0]
        if any(w % ch for w in widths):
            raise CheckpointError(f"block_out_channels {widths} are not multiples of the first width")
        latent = int(meta.get("latent_channels", 4))
        return MedVAEConfig(spatial_dims=2, in_channels=int(meta.get("in_channels", 3)),
                            out_channels=int(meta.get("out_channels", 3)), ch=ch, ch_mult=[w // ch for w in widths],
                            num_res_blocks=int(meta.get("layers_per_block", 1)), z_channels=latent, embed_dim=latent,
                            stage2_head=stage2_head, norm_groups=int(meta.get("norm_num_groups", 32)),
                            mid_attention=bool(meta.get("mid_block_add_attention", True)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"not a usable AutoencoderKL config: {e}") from e


def _load_diffusers_directory(directory: Path, meta: Mapping[str, object], map_location: str | torch.device) -> MedVAE:
    """A diffusers ``AutoencoderKL`` folder (e.g. written by ``medlatent export --to diffusers``) as a MedVAE."""
    weights = directory / DIFFUSERS_WEIGHTS_FILE
    stage2 = directory / DIFFUSERS_STAGE2_FILE
    try:
        config = config_from_diffusers(meta, stage2_head=stage2.is_file())
    except CheckpointError as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from e
    if not weights.is_file():
        raise CheckpointError(f"{directory}: a diffusers AutoencoderKL folder without {DIFFUSERS_WEIGHTS_FILE}")
    try:
        sd = convert_diffusers_state_dict(read_state_dict(weights, map_location))
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {e}") from e
    if stage2.is_file():
        sd.update(read_state_dict(stage2, map_location))
    extra = meta.get(DIFFUSERS_META_KEY)
    extra = extra if isinstance(extra, Mapping) else {}
    tile = extra.get("max_tile")
    s = config.downsample_per_axis
    model = MedVAE(config, max_tile=tile if isinstance(tile, int) and tile >= 2 * s and tile % s == 0 else None)
    load_state_dict_strict(model, sd, str(weights))
    model.weights_info = {"model": str(extra.get("model") or directory.name), "file": str(weights),
                          "sha256": sha256_file(weights)}
    return model.eval()


def _load_directory(directory: Path, map_location: str | torch.device) -> MedVAE:
    cfg_path = directory / CONFIG_FILE
    try:
        meta = json.loads(cfg_path.read_text())
        if isinstance(meta, dict) and is_diffusers_config(meta):
            return _load_diffusers_directory(directory, meta, map_location)
        config = MedVAEConfig.from_dict(meta["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not a medlatent model config: {e}") from e
    weights = directory / WEIGHTS_FILE
    try:
        model = MedVAE(config, max_tile=meta.get("max_tile"))
    except ValueError as e:  # the one invalid inference default
        raise CheckpointError(f"{cfg_path}: {e}") from e
    # merge_lora: a directory written with the adapters kept (medlatent.training.export) loads as a plain member
    load_state_dict_strict(model, merge_lora(read_state_dict(weights, map_location)), str(weights))
    model.weights_info = {"model": meta.get("model") or directory.name, "file": str(weights),
                          "sha256": sha256_file(weights)}
    return model.eval()


def load_checkpoint(path: str | Path, name: str | ModelInfo | None = None,
                    map_location: str | torch.device = "cpu") -> MedVAE:
    """Build a model from an official checkpoint (``.ckpt``/``.pt``/``.safetensors``).

    With ``name``, the registry architecture is used and the file must match it exactly; without, the
    architecture is inferred from the tensor shapes.
    """
    path = Path(path)
    sd = convert_official_state_dict(read_state_dict(path, map_location))
    info = get_model_info(name) if isinstance(name, str) else name
    config = info.config if info is not None else infer_config(sd)
    model = MedVAE(config, max_tile=info.max_tile if info is not None else None)
    load_state_dict_strict(model, sd, str(path))
    model.weights_info = {"model": info.name if info else path.stem, "file": str(path), "sha256": sha256_file(path)}
    return model.eval()


def bundled_dir(info: ModelInfo) -> Path:
    """Folder of a model shipped inside the package (``medlatent/weights/<name>``)."""
    return Path(__file__).parent / "weights" / info.name


def load_bundled(info: ModelInfo, map_location: str | torch.device = "cpu") -> MedVAE:
    directory = bundled_dir(info)
    if not (directory / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{info.name}: the bundled weights are missing from {directory}; reinstall medlatent")
    model = _load_directory(directory, map_location)
    if model.config != info.config:
        raise CheckpointError(f"{directory}: bundled weights do not match the registry's {info.name} architecture")
    model.weights_info["model"] = info.name
    return model


def load_pretrained(
    name_or_dir: str | Path,
    checkpoint: str | Path | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    map_location: str | torch.device = "cpu",
) -> MedVAE:
    """Load trained weights.

    ``name_or_dir`` is one of:
      * a registry name (``medlatent.list_models()``): the official checkpoint is taken from
        ``checkpoint`` if given, else from the Hugging Face Hub (cached; ``HF_HUB_OFFLINE`` honoured),
        and the hub's YAML config, when it can be had, is checked against the registry;
      * a directory written by :meth:`MedVAE.save_pretrained`, or a diffusers ``AutoencoderKL`` folder
        (``medlatent export --to diffusers``; its stage-2 head, if any, from ``medlatent_stage2.safetensors``);
      * a checkpoint file (architecture inferred from its shapes).

    The model is returned in eval mode.
    """
    p = Path(name_or_dir)
    if p.is_dir():
        return _load_directory(p, map_location)
    if p.is_file():
        return load_checkpoint(p, None, map_location)
    name = str(name_or_dir)
    try:
        info = get_model_info(name)
    except KeyError as e:
        raise KeyError(f"{e.args[0]} ({name!r} is also not an existing directory or file)") from None
    if checkpoint is not None:
        return load_checkpoint(checkpoint, info, map_location)
    if info.bundled:
        return load_bundled(info, map_location)

    from medlatent.hub import WeightsNotFoundError, check_official_yaml, hub_download

    kw = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    ckpt = hub_download(info, info.hub_checkpoint, **kw)
    try:
        check_official_yaml(info, hub_download(info, info.hub_config, **kw))
    except WeightsNotFoundError as e:
        logger.warning("could not check %s against the official config: %s", info.name, e)
    if info.sha256 and sha256_file(ckpt) != info.sha256:
        raise CheckpointError(f"{ckpt}: SHA-256 differs from the registry's; the download may be corrupt")
    return load_checkpoint(ckpt, info, map_location)


__all__ = [
    "CheckpointError",
    "attention_as_conv",
    "convert_diffusers_state_dict",
    "convert_official_state_dict",
    "infer_config",
    "diffusers_to_medlatent_key",
    "inflate_2d_to_3d",
    "is_diffusers_state_dict",
    "keep_autoencoder_keys",
    "list_models",
    "load_checkpoint",
    "load_pretrained",
    "load_state_dict_strict",
    "merge_lora",
    "read_state_dict",
    "save_pretrained",
    "sha256_file",
    "unwrap_state_dict",
]
