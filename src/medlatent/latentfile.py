"""The latent file: one self-describing ``.safetensors`` per input.

Tensors: ``z`` (the posterior mean, ``C×…``, float16 or float32) and optionally ``stage2`` (2D stage-2
features). Metadata (JSON under the ``medlatent`` key): format version, medlatent version, model name + weights
SHA-256, f, C, the :class:`~medlatent.preprocessing.Preprocessing` record (original shape, affine, orientation,
padding, intensity mapping), the latent's own affine, and a SHA-256 of the tensor bytes to detect damage.
No patient identifiers are stored: no names, IDs, dates or source paths — only geometry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlatent.io.atomic import atomic_write
from medlatent.preprocessing import Preprocessing

FORMAT = "medlatent-latent"
FORMAT_VERSION = 1
SUFFIX = ".latent.safetensors"


class LatentFileError(ValueError):
    """A latent file is missing, damaged, or does not fit the model it is used with."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {problem}")


@dataclass
class LatentFile:
    """Contents of a latent file. ``z`` is ``C×…`` (no batch axis)."""

    z: torch.Tensor
    preprocessing: Preprocessing
    model: dict[str, Any]
    stage2: torch.Tensor | None = None
    medlatent_version: str = ""

    @property
    def spatial_dims(self) -> int:
        return self.preprocessing.spatial_dims

    @property
    def latent_affine(self) -> np.ndarray:
        return self.preprocessing.latent_affine(int(self.model["downsample_per_axis"]))


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_latent(path: str | Path, lf: LatentFile, dtype: torch.dtype = torch.float16) -> Path:
    """Write atomically (temporary file + rename): a killed run never leaves a partial latent file."""
    from safetensors.torch import save_file

    from medlatent import __version__

    path = Path(path)
    tensors = {"z": lf.z.detach().to("cpu", dtype).contiguous()}
    if lf.stage2 is not None:
        tensors["stage2"] = lf.stage2.detach().to("cpu", dtype).contiguous()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medlatent_version": __version__,
        "model": lf.model,
        "preprocessing": lf.preprocessing.to_dict(),
        "latent_affine": lf.preprocessing.latent_affine(int(lf.model["downsample_per_axis"])).tolist(),
        "sha256": _digest(tensors),
    }
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"medlatent": json.dumps(meta)})
    return path


def _open(path: Path, load_tensors: bool) -> tuple[str | None, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise LatentFileError(path, "no such latent file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("medlatent")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()} if load_tensors else {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise LatentFileError(path, f"damaged or not a safetensors file ({type(e).__name__}: {e})") from e
    return raw, tensors


def _parse_metadata(path: Path, raw: str | None) -> tuple[dict[str, Any], Preprocessing, dict[str, Any]]:
    if raw is None:
        raise LatentFileError(path, "not a medlatent latent file (no 'medlatent' metadata)")
    try:
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"format version {meta['format_version']} is newer than this medlatent supports")
        return meta, Preprocessing.from_dict(meta["preprocessing"]), dict(meta["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise LatentFileError(path, f"invalid latent metadata: {e}") from e


def read_latent_header(path: str | Path) -> tuple[Preprocessing, dict[str, Any]]:
    """The preprocessing record and model description of a latent file, without reading its tensors."""
    path = Path(path)
    _, rec, model = _parse_metadata(path, _open(path, load_tensors=False)[0])
    return rec, model


def read_latent(path: str | Path) -> LatentFile:
    """Read and validate a latent file (format, integrity, shape consistency)."""
    path = Path(path)
    raw, tensors = _open(path, load_tensors=True)
    meta, rec, model = _parse_metadata(path, raw)
    if "z" not in tensors:
        raise LatentFileError(path, "holds no 'z' tensor")
    if meta.get("sha256") != _digest(tensors):
        raise LatentFileError(path, "tensor data do not match the stored checksum (file damaged)")
    s = int(model["downsample_per_axis"])
    want = (int(model["C"]), *(n // s for n in rec.model_shape))
    if tuple(tensors["z"].shape) != want:
        raise LatentFileError(path, f"z has shape {tuple(tensors['z'].shape)}, metadata implies {want}")
    return LatentFile(z=tensors["z"], stage2=tensors.get("stage2"), preprocessing=rec, model=model,
                      medlatent_version=str(meta.get("medlatent_version", "")))
