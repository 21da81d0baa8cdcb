"""Write a trained model, with its LoRA adapters merged or kept.

Kept adapters use the key layout of the released multi-channel checkpoints (``<conv>.conv.weight``,
``<conv>.conv.bias``, ``<conv>.lora_down.weight``, ``<conv>.lora_up.weight``); medlatent's loaders merge
them on reading (:func:`medlatent.checkpoints.merge_lora`), so either export loads as a standard member.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from medlatent.checkpoints import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    StateDict,
    load_pretrained,
    read_state_dict,
    save_pretrained,
)
from medlatent.io.atomic import atomic_write
from medlatent.model.autoencoder import MedVAE
from medlatent.model.lora import LoRAConv, merge_lora_modules
from medlatent.registry import get_model_info, list_models

logger = logging.getLogger(__name__)


def _adapters(model: MedVAE) -> list[LoRAConv]:
    return [m for m in model.modules() if isinstance(m, LoRAConv)]


def _check_scale(model: MedVAE) -> None:
    odd = sorted({m.scale for m in _adapters(model) if m.scale != 1.0})
    if odd:
        raise ValueError(
            f"adapters with scale {odd} cannot be stored unmerged: the checkpoint layout has no place for the "
            "scale and readers assume 1. Export with merged=True."
        )


def merged_copy(model: MedVAE) -> MedVAE:
    """A copy of ``model`` with every adapter folded into its conv; ``model`` itself when it has none.

    ``model`` is left unchanged (its adapters stay trainable).
    """
    if not _adapters(model):
        return model
    return merge_lora_modules(copy.deepcopy(model))


def _state_dict(model: MedVAE, merged: bool) -> StateDict:
    if not merged:
        _check_scale(model)
    src = merged_copy(model) if merged else model
    return {k: v.detach().to("cpu").contiguous() for k, v in src.state_dict().items()}


def export_model(model: MedVAE, directory: str | Path, *, merged: bool, name: str | None = None) -> Path:
    """Write ``model`` in medlatent's format (``config.json`` + ``model.safetensors``).

    Args:
        model: a MedVAE, with or without LoRA adapters (:func:`medlatent.model.lora.inject_lora`).
        directory: created if needed.
        merged: fold the adapters into plain convs (a standard member, nothing extra at inference), or keep
            them in the official LoRA key layout (to continue training them, or to compare with the release).
        name: model name recorded in ``config.json`` (default: ``model.weights_info["model"]``).

    Returns:
        ``directory``; :meth:`MedVAE.from_pretrained` reads either variant (adapters are merged at load).
    """
    if merged:
        return save_pretrained(merged_copy(model), directory, name=name)
    _check_scale(model)
    return save_pretrained(model, directory, name=name)


def _official_lora_member(model: MedVAE) -> str | None:
    """The registry member with this architecture, if the official code builds it with LoRA adapters."""
    for member in list_models():
        info = get_model_info(member)
        if info.config == model.config:
            return member if info.lora else ""
    return None


def export_official_ckpt(model: MedVAE, path: str | Path, *, merged: bool) -> Path:
    """Write ``{"state_dict": …}`` with ``torch.save``, loadable by the official MedVAE code.

    The official ``build_model`` injects LoRA adapters into ``medvae_4_3_2d``/``medvae_8_4_2d`` before
    loading and loads with ``strict=False``, so for those members write ``merged=False`` (a merged file
    would silently leave their weights unloaded there); the other members take ``merged=True``. A warning
    is logged when the choice does not fit the member this architecture belongs to.
    """
    member = _official_lora_member(model)
    if member is not None and bool(member) == merged:
        want = "merged=False" if member else "merged=True"
        logger.warning("the official code expects %s for this architecture (%s); writing merged=%s anyway",
                       want, member or "a plain member", merged)
    sd = _state_dict(model, merged)
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save({"state_dict": sd}, tmp)
    return path


class ExportError(ValueError):
    """A model folder that cannot be exported in the requested format; the message says what to do."""


def export_folder_ckpt(directory: str | Path, path: str | Path) -> tuple[Path, str]:
    """``medlatent export-ckpt``: a medlatent model folder (e.g. ``RUN_DIR/final``) as an official ``.ckpt``.

    Plain members are written merged. For the architectures the official code builds with LoRA adapters
    (``medvae_4_3_2d``, ``medvae_8_4_2d``) the folder must hold its adapters (a run with
    ``train.export_merged: false``): the official loader injects adapters and loads with ``strict=False``, so
    merged weights would silently stay unloaded there.

    Returns:
        ``(path, note)``: the file written and a few words on its layout.
    """
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ExportError(f"{directory}: not a medlatent model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                          "give RUN_DIR/final or a RUN_DIR/checkpoints/step_* folder")
    model = load_pretrained(directory)  # checks the weights against the architecture
    member = _official_lora_member(model)
    if not member:
        return export_official_ckpt(model, path, merged=True), "merged weights, official key layout"
    raw = read_state_dict(directory / WEIGHTS_FILE)
    if not any(".lora_" in k for k in raw):
        raise ExportError(f"{directory}: this is the {member} architecture, which the official code loads with "
                          "LoRA adapters (strict=False), so merged weights would silently stay unloaded there. "
                          "Train with train.export_merged=false to keep the adapters, then export that final/")
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save({"state_dict": {k: v.contiguous() for k, v in raw.items()}}, tmp)
    return path, f"LoRA adapters kept in the official layout of {member}"


__all__ = ["ExportError", "export_folder_ckpt", "export_model", "export_official_ckpt", "merged_copy"]
