"""The latent file: one self-describing ``.safetensors`` per input.

Tensors: ``z`` (the posterior mean, ``C×…``, float16 or float32) and optionally ``stage2`` (2D stage-2
features). Metadata (JSON under the ``medlatent`` key): format version, medlatent version, model name + weights
SHA-256, f, C, the :class:`~medlatent.preprocessing.Preprocessing` record (original shape, affine, orientation,
padding, intensity mapping), the latent's own affine, what computed it (``inference``: backend and precision, e.g.
``{"backend": "openvino", "precision": "bf16"}``; optional, absent from files written before it), and two SHA-256
digests that detect damage and edits: ``sha256`` over each tensor's name, dtype, shape and bytes, and
``metadata_sha256`` over the canonical JSON of all other metadata (which includes ``sha256``, so it covers
everything decoding uses). The digests detect accidental damage and hand edits; they are not a signature against
someone who recomputes them.
No patient identifiers are stored: no names, IDs, dates or source paths — only geometry.

Format version 1 (medlatent before the metadata digest) checked the tensor bytes only. Such files are still
read, with a warning that their metadata are unverified; re-encoding the source image gives a fully checked file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch

from medlatent.io.atomic import atomic_write
from medlatent.preprocessing import IntensityMap, Preprocessing

logger = logging.getLogger(__name__)

FORMAT = "medlatent-latent"
FORMAT_VERSION = 2  # 2: metadata covered by metadata_sha256; 1: tensor bytes only (still read, with a warning)
SUFFIX = ".latent.safetensors"
STORAGE_DTYPES = (torch.float16, torch.float32)
_READABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LatentFileError(ValueError):
    """A latent file is missing, damaged, or does not fit the model it is used with."""

    def __init__(self, path: str | Path, problem: str | None = None) -> None:
        if problem is None:  # one finished message: how PyTorch re-raises a DataLoader worker's error in the main
            self.path, self.problem = "", str(path)  # process (its text names the file and the worker)
            super().__init__(str(path))
            return
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self) -> tuple[type[LatentFileError], tuple[str, str | None]]:
        # rebuilt from both arguments, so the error crosses process boundaries (DataLoader workers, torchrun)
        # as itself, not as the RuntimeError a failed unpickling becomes
        return type(self), (self.path, self.problem) if self.path else (self.problem, None)


@dataclass
class LatentFile:
    """Contents of a latent file. ``z`` is ``C×…`` (no batch axis)."""

    z: torch.Tensor
    preprocessing: Preprocessing
    model: dict[str, Any]
    stage2: torch.Tensor | None = None
    medlatent_version: str = ""
    format_version: int = FORMAT_VERSION
    inference: dict[str, str] | None = None  # {"backend": …, "precision": …}; None in files from before it

    @property
    def spatial_dims(self) -> int:
        return self.preprocessing.spatial_dims

    @property
    def latent_affine(self) -> np.ndarray:
        return self.preprocessing.latent_affine(int(self.model["downsample_per_axis"]))

    @property
    def metadata_verified(self) -> bool:
        """Whether the file's checksum covers its metadata (format version 2 on); version 1 covered tensors only."""
        return self.format_version >= 2


# ------------------------------------------------------------------------------------------------- digests
def tensor_bytes(t: torch.Tensor) -> bytes:
    """The elements of ``t`` in C order as raw bytes, whatever its strides.

    ``.contiguous()`` and ``.reshape(-1)`` are not enough before ``.view(torch.uint8)``: a tensor with size-1 axes
    counts as contiguous while its last stride may still differ from 1 (a 1×1 latent of a channels-last model),
    and reshaping a one-element tensor keeps that stride; a copy into a fresh flat tensor has stride 1.
    """
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.detach().cpu().reshape(-1))
    return flat.view(torch.uint8).numpy().tobytes()


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        # name, dtype and shape as self-delimiting JSON: the byte count follows from them, so no two different
        # sets of tensors hash the same byte stream
        h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _tensors_digest_v1(tensors: dict[str, torch.Tensor]) -> str:
    """Format version 1: names and bytes only."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensor_bytes(tensors[name]))
    return h.hexdigest()


def _metadata_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of every metadata entry but this digest."""
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- validation
def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _ints(v: Any, n: int, what: str, minimum: int) -> list[int]:
    if not isinstance(v, list) or len(v) != n or not all(_is_int(x) and x >= minimum for x in v):
        raise ValueError(f"{what} must be {n} integers ≥ {minimum}, got {v!r}")
    return v


def _matrix(v: Any, rows: int, cols: int, what: str) -> np.ndarray:
    ok = isinstance(v, list) and len(v) == rows and all(
        isinstance(r, list) and len(r) == cols and all(_is_number(x) for x in r) for r in v)
    if not ok:
        raise ValueError(f"{what} must be a {rows}×{cols} matrix of finite numbers, got {v!r}")
    return np.array(v, dtype=np.float64)


def _check_model(m: Any) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise TypeError(f"'model' must be an object, got {m!r}")
    for key in ("name", "weights_sha256"):
        if not isinstance(m.get(key), str):
            raise TypeError(f"model.{key} must be a string, got {m.get(key)!r}")
    for key in ("C", "downsample_per_axis"):
        if not (_is_int(m.get(key)) and m[key] >= 1):
            raise ValueError(f"model.{key} must be a positive integer, got {m.get(key)!r}")
    if not (_is_number(m.get("f")) and m["f"] > 0):
        raise ValueError(f"model.f must be a positive number, got {m.get('f')!r}")
    if m.get("spatial_dims") not in (2, 3) or not _is_int(m["spatial_dims"]):
        raise ValueError(f"model.spatial_dims must be 2 or 3, got {m.get('spatial_dims')!r}")
    return m


def _check_inference(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not {"backend", "precision"} <= set(v) or \
            not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ValueError(f"inference must map backend, precision (and other names) to strings, got {v!r}")
    return v


def _check_intensity(d: Any) -> None:
    if not isinstance(d, dict) or set(d) != {"kind", "lo", "hi", "clip"}:
        raise ValueError(f"intensity mapping must have exactly kind, lo, hi, clip; got {d!r}")
    imap = IntensityMap(**d)
    if not (isinstance(imap.kind, str) and isinstance(imap.clip, bool) and _is_number(imap.lo)
            and _is_number(imap.hi) and imap.hi > imap.lo):
        raise ValueError(f"intensity mapping needs a string kind, finite lo < hi and a boolean clip; got {d!r}")


def _check_orientation(v: Any, d: int) -> list[int] | None:
    """The model axis of each original axis (``None``: unchanged)."""
    if v is None:
        return None
    m = _matrix(v, d, 2, "orientation")
    axes = [int(a) for a in m[:, 0]]
    if d == 2 or sorted(axes) != list(range(d)) or not np.all(m[:, 0] == axes) or not np.all(np.abs(m[:, 1]) == 1):
        raise ValueError(f"orientation must permute the {d} axes with flips ±1 (3D only), got {v!r}")
    return axes


def _check_file_geometry(g: Any, original_shape: list[int]) -> None:
    """The source file's own layout (``None``, or ``shape`` and ``affine``): it must hold the original's values."""
    if g is None:
        return
    if not isinstance(g, dict) or set(g) != {"shape", "affine"}:
        raise TypeError(f"file_geometry must have exactly shape and affine, got {g!r}")
    shape = g["shape"]
    if not isinstance(shape, list) or len(shape) < 2 or not all(_is_int(n) and n >= 1 for n in shape):
        raise ValueError(f"file_geometry.shape must be integers ≥ 1, got {shape!r}")
    if math.prod(shape) != math.prod(original_shape):
        raise ValueError(f"file_geometry.shape {shape} does not hold the original shape {original_shape}")
    _matrix(g["affine"], 4, 4, "file_geometry.affine")


def _check_preprocessing(d: Any, model: dict[str, Any]) -> Preprocessing:
    if not isinstance(d, dict):
        raise TypeError(f"'preprocessing' must be an object, got {d!r}")
    rec = Preprocessing.from_dict(d)  # TypeError on missing or unknown keys
    sd = rec.spatial_dims
    if sd != model["spatial_dims"] or not _is_int(sd):
        raise ValueError(f"preprocessing.spatial_dims {sd!r} differs from model.spatial_dims {model['spatial_dims']}")
    shape = _ints(rec.original_shape, sd + 1 if sd == 2 else sd, "original_shape", 1)
    _matrix(rec.original_affine, sd + 1, sd + 1, "original_affine")
    if not isinstance(rec.original_dtype, str) or np.dtype(rec.original_dtype).kind not in "biuf":
        raise ValueError(f"original_dtype must name a numeric dtype, got {rec.original_dtype!r}")
    if not isinstance(rec.modality, str) or not isinstance(rec.channel_mean, bool):
        raise TypeError(f"modality must be a string and channel_mean a boolean, got {rec.modality!r}, "
                         f"{rec.channel_mean!r}")
    if rec.channel_mean and (sd != 2 or shape[0] != 3):
        raise ValueError(f"channel_mean is set but the original shape {shape} is not a 3-channel 2D image")
    _check_intensity(rec.intensity)
    _check_file_geometry(d.get("file_geometry"), shape)
    axes = _check_orientation(rec.orientation, sd)
    spatial = shape[-sd:]
    if axes is not None:  # original axis i became model axis axes[i]
        spatial = [spatial[axes.index(k)] for k in range(sd)]
    if not isinstance(rec.pad, list) or len(rec.pad) != sd:
        raise ValueError(f"padding must have one (before, after) pair per axis, got {rec.pad!r}")
    for p in rec.pad:
        if _ints(p, 2, "each padding pair", 0)[0] != 0:
            raise ValueError(f"padding is on the high side only, got {rec.pad!r}")
    _ints(rec.model_shape, sd, "model_shape", 1)
    s = model["downsample_per_axis"]
    want = [n + p[1] for n, p in zip(spatial, rec.pad)]
    if rec.model_shape != want or any(n % s for n in want):
        raise ValueError(f"model_shape {rec.model_shape} does not follow from the original shape {shape}, "
                         f"orientation and padding {rec.pad} (expected {want}, a multiple of {s})")
    return rec


def _check_metadata(meta: Any) -> tuple[Preprocessing, dict[str, Any]]:
    """Structure, types and consistency of everything decoding reads; raises ``ValueError`` saying what is wrong."""
    if not isinstance(meta, dict):
        raise TypeError(f"expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise ValueError(f"format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"format version {version} is newer than this medlatent supports ({FORMAT_VERSION}); "
                         "upgrade medlatent")
    missing = [k for k in ("model", "preprocessing", "latent_affine", "sha256") if k not in meta]
    if version >= 2 and "metadata_sha256" not in meta:
        missing.append("metadata_sha256")
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    model = _check_model(meta["model"])
    if "inference" in meta:
        _check_inference(meta["inference"])
    rec = _check_preprocessing(meta["preprocessing"], model)
    d = rec.spatial_dims
    stored = _matrix(meta["latent_affine"], d + 1, d + 1, "latent_affine")
    if not np.allclose(stored, rec.latent_affine(model["downsample_per_axis"]), rtol=1e-9, atol=1e-9):
        raise ValueError("latent_affine does not follow from the original affine, orientation and reduction")
    return rec, model


def _check_tensors(tensors: dict[str, torch.Tensor], rec: Preprocessing, model: dict[str, Any]) -> None:
    if "z" not in tensors:
        raise ValueError("holds no 'z' tensor")
    z = tensors["z"]
    s = model["downsample_per_axis"]
    want = (model["C"], *(n // s for n in rec.model_shape))
    if tuple(z.shape) != want:
        raise ValueError(f"z has shape {tuple(z.shape)}, metadata implies {want}")
    for name, t in tensors.items():
        if t.dtype not in _READABLE_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype")
    if not torch.isfinite(z).all():
        raise ValueError("z holds NaN or infinite values")


# --------------------------------------------------------------------------------------------- writing
def write_latent(path: str | Path, lf: LatentFile, dtype: torch.dtype = torch.float16) -> Path:
    """Write atomically (temporary file + rename): a killed run never leaves a partial latent file.

    Raises:
        LatentFileError: ``z`` does not fit ``dtype`` (e.g. float16 overflow), or the record is inconsistent.
    """
    from safetensors.torch import save

    from medlatent._version import __version__

    path = Path(path)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"latent storage dtype must be float16 or float32, got {dtype}")
    tensors = {"z": lf.z.detach().to("cpu", dtype).contiguous()}
    if lf.stage2 is not None:
        tensors["stage2"] = lf.stage2.detach().to("cpu", dtype).contiguous()
    if not torch.isfinite(tensors["z"]).all():
        raise LatentFileError(path, f"z holds values that {str(dtype).removeprefix('torch.')} cannot store "
                                    "(NaN/inf, or beyond ±65504 for float16; use --latent-dtype float32)")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medlatent_version": __version__,
        "model": lf.model,
        "preprocessing": lf.preprocessing.to_dict(),
        "latent_affine": lf.preprocessing.latent_affine(int(lf.model["downsample_per_axis"])).tolist(),
        "sha256": _tensors_digest(tensors),
    }
    if lf.inference is not None:  # covered by metadata_sha256 like the rest; readers before it ignore the key
        meta["inference"] = lf.inference
    meta = json.loads(json.dumps(meta))  # the digest is over what a reader will parse (tuples → lists, …)
    try:
        rec, model = _check_metadata({**meta, "metadata_sha256": ""})
        _check_tensors(tensors, rec, model)
    except (ValueError, TypeError) as e:  # a bug upstream: never write a file that reading would refuse
        raise LatentFileError(path, f"refusing to write an inconsistent latent file: {e}") from e
    meta["metadata_sha256"] = _metadata_digest(meta)
    with atomic_write(path) as tmp:
        # serialised here and written by Python, so a full disk raises OSError(ENOSPC), not a library error
        tmp.write_bytes(save(tensors, metadata={"medlatent": json.dumps(meta)}))
    return path


# --------------------------------------------------------------------------------------------- reading
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


def _parse_metadata(path: str | Path, raw: str | None) -> tuple[dict[str, Any], Preprocessing, dict[str, Any]]:
    """Parse, check the metadata digest (version 2 on), then the structure of everything decoding reads."""
    if raw is None:
        raise LatentFileError(path, "not a medlatent latent file (no 'medlatent' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise LatentFileError(path, f"invalid latent metadata: not JSON ({e})") from e
    if isinstance(meta, dict) and "metadata_sha256" in meta and meta["metadata_sha256"] != _metadata_digest(meta):
        raise LatentFileError(path, "metadata do not match their checksum (edited or damaged after writing: "
                                    "intensity mapping, geometry or model record); re-encode the source image")
    try:
        rec, model = _check_metadata(meta)
    except (ValueError, TypeError) as e:
        raise LatentFileError(path, f"invalid latent metadata: {e}") from e
    return meta, rec, model


def read_latent_header(path: str | Path) -> tuple[Preprocessing, dict[str, Any]]:
    """The preprocessing record and model description of a latent file, without reading its tensors."""
    path = Path(path)
    _, rec, model = _parse_metadata(path, _open(path, load_tensors=False)[0])
    return rec, model


def read_latent(path: str | Path) -> LatentFile:
    """Read and validate a latent file: format, metadata and tensor checksums, structure and shapes.

    Raises:
        LatentFileError: naming the file and what is wrong with it.
    """
    path = Path(path)
    raw, tensors = _open(path, load_tensors=True)
    lf = _verified(path, raw, tensors)
    if lf.format_version < 2:
        logger.warning("%s: format version %d checks only the tensor bytes, so its metadata (intensity mapping, "
                       "geometry) are unverified; re-encode the source image for a fully checked file", path,
                       lf.format_version)
    return lf


def _verified(where: str | Path, raw: Any, tensors: dict[str, torch.Tensor]) -> LatentFile:
    """The latent file of parsed metadata ``raw`` and ``tensors``, after every check: metadata, the tensors'
    checksum, their structure and shapes (one rule for files and for bytes from a store)."""
    meta, rec, model = _parse_metadata(where, raw)
    version = meta["format_version"]
    digest = _tensors_digest(tensors) if version >= 2 else _tensors_digest_v1(tensors)
    if meta["sha256"] != digest:
        raise LatentFileError(where, "tensor data do not match the stored checksum (file damaged)")
    try:
        _check_tensors(tensors, rec, model)
    except ValueError as e:
        raise LatentFileError(where, str(e)) from e
    return LatentFile(z=tensors["z"], stage2=tensors.get("stage2"), preprocessing=rec, model=model,
                      medlatent_version=str(meta.get("medlatent_version", "")), format_version=version,
                      inference=meta.get("inference"))


def latent_from_bytes(data: bytes, where: str | Path, *, checked: bool = True) -> LatentFile:
    """A latent file's contents from its bytes (e.g. a member of a store shard); ``where`` names it in errors.

    ``checked=True`` makes every check :func:`read_latent` makes. ``checked=False`` only parses: for bytes whose
    SHA-256 matched a digest recorded after they passed those checks (a latent store's index), where running them
    again would repeat the same answer at several times the cost of the read.

    Raises:
        LatentFileError: naming ``where`` and what is wrong.
    """
    from safetensors.torch import load

    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        raw: Any = (header.get("__metadata__") or {}).get("medlatent")
        tensors = load(data)
    except Exception as e:  # truncated, foreign or corrupt bytes: whatever safetensors or json raise
        raise LatentFileError(where, f"damaged or not a safetensors file ({type(e).__name__}: {e})") from e
    if not checked:
        meta = json.loads(raw)
        return LatentFile(z=tensors["z"], stage2=tensors.get("stage2"),
                          preprocessing=Preprocessing.from_dict(meta["preprocessing"]), model=meta["model"],
                          medlatent_version=str(meta.get("medlatent_version", "")),
                          format_version=meta["format_version"], inference=meta.get("inference"))
    return _verified(where, raw, tensors)
