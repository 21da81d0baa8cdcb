"""How the evaluations name what they have seen: SHA-256 digests of input files, model weights and settings (cache
keys of :mod:`medlatent.evaluation.cad_inputs`, the weights column of the reconstruction report) and file-safe
names for cache folders and figures."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medlatent.latentfile import tensor_bytes

if TYPE_CHECKING:
    from medlatent.model.autoencoder import MedVAE


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (DICOM series) by relative name and content."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _hash_tensors(h: Any, model: torch.nn.Module) -> str:
    """Feed every tensor of ``model``'s state dict (name, then bytes; names sorted) to ``h``; its hex digest."""
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + b"\0")
        h.update(tensor_bytes(v))
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's config and weights (so a fine-tuned model never reuses stale cached latents)."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)  # diffusers: a dict
    return _hash_tensors(hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()), model)


def weights_sha256(model: "MedVAE") -> str:
    """SHA-256 of the model's weights file, or of its tensors when it has no file (random or in-memory weights)."""
    known = model.weights_info.get("sha256")
    if known:
        return str(known)
    return _hash_tensors(hashlib.sha256(), model)


def settings_digest(settings: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of ``settings`` as sorted JSON (a cache folder's name)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def safe_name(text: str, default: str) -> str:
    """``text`` with every run of characters outside ``A-Za-z0-9._-`` replaced by ``_`` (``default`` if none are
    left): a model or image name usable as a file or folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or default
