"""Classifier inputs of a CAD task, prepared once per method and cached.

The high-resolution image is preprocessed as for encoding and resized to the fixed input size
(:attr:`~medlatent.evaluation.cad_config.CADConfig.size`); the other kinds are made from it (interpolation, or
:mod:`medlatent.evaluation.cad_encode` for latents). Prepared inputs are cached as
``<cache>/<kind>/<name>-<settings digest>/<file sha256>.safetensors`` (float16): a second run neither reads the
images nor encodes. A latent folder's digest covers the model's weights (hashed each run, so a fine-tuned model
never reuses stale latents), the input size and the preprocessing settings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medlatent.evaluation.cad_config import RESIZE_MODES, CADConfig
from medlatent.evaluation.cad_encode import channel_mode, encode_2d, latent_input, stitched_latent_input
from medlatent.evaluation.cad_manifest import CADDataError, CADEntry, CADTask
from medlatent.evaluation.cad_methods import Method
from medlatent.evaluation.digests import file_digest, model_fingerprint, safe_name, settings_digest

logger = logging.getLogger("medlatent.evaluation.cad")  # the public module's name: log lines read as before

# bump when the way inputs are prepared changes, so old cache entries are not reused
CACHE_VERSION = 1


def resize(x: torch.Tensor, size: Sequence[int], mode: str = "bicubic") -> torch.Tensor:
    """Resize ``C×H×W`` or ``C×D×H×W`` to ``size`` (antialiased when shrinking, for bilinear/bicubic).

    3D bilinear/bicubic is separable: 2D per slice over the first two axes, then 1D along the last — the
    tricubic filter PyTorch lacks (trilinear has no antialiasing either).
    """
    size = tuple(int(n) for n in size)
    d = x.ndim - 1
    if len(size) != d:
        raise ValueError(f"size {size} does not match a {d}D input of shape {tuple(x.shape)}")
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    x = x.float()
    if tuple(x.shape[1:]) == size:
        return x.clone()
    if mode in ("nearest", "area") or d == 2 and mode in ("bilinear", "bicubic"):
        kw = {} if mode in ("nearest", "area") else {"align_corners": False, "antialias": True}
        return F.interpolate(x[None], size=size, mode=mode, **kw)[0]
    c, nx, ny, nz = x.shape
    kw = {"align_corners": False, "antialias": True}
    t = x.permute(0, 3, 1, 2).reshape(c * nz, 1, nx, ny)                       # slices along the last axis
    t = F.interpolate(t, size=size[:2], mode=mode, **kw)                       # (c·nz)×1×X'×Y'
    t = t.reshape(c, nz, size[0] * size[1]).permute(0, 2, 1).reshape(-1, 1, 1, nz)
    t = F.interpolate(t, size=(1, size[2]), mode=mode, **kw)                   # 1-D along the last axis
    return t.reshape(c, size[0], size[1], size[2])


class InputBuilder:
    """Prepares (and caches) classifier inputs of a task for each method.

    The prepared high-resolution image is the base of all three kinds and is cached too, so a latent or
    interpolation method whose cache misses still does not decode the original file twice.
    """

    def __init__(self, task: CADTask, spatial_dims: int, config: CADConfig, cache_dir: Path) -> None:
        self.task = task
        self.dims = spatial_dims
        self.config = config
        self.size = config.size_for(spatial_dims)
        self.cache_dir = Path(cache_dir)
        self._digests: dict[Path, str] = {}
        self._fingerprints: dict[int, str] = {}  # hashed once per run: weights may change between runs
        self.image_settings = {"version": CACHE_VERSION, "kind": "image", "size": list(self.size),
                               "resize": config.resize, "modality": config.modality, "spatial_dims": spatial_dims}

    # ---------------------------------------------------------------------------------- cache
    def _digest(self, entry: CADEntry) -> str:
        if entry.path not in self._digests:
            try:
                self._digests[entry.path] = file_digest(entry.path)
            except OSError as e:
                raise CADDataError(f"{self.task.csv_path}, line {entry.line}: cannot read {entry.path} "
                                   f"({type(e).__name__}: {e})") from e
        return self._digests[entry.path]

    def folder(self, method: Method) -> Path:
        """Cache folder of a method's inputs."""
        if method.kind == "image":
            return self.cache_dir / "image" / f"{'x'.join(map(str, self.size))}-{settings_digest(self.image_settings)}"
        if method.kind == "interp":
            s = {**self.image_settings, "kind": "interp", "downsample": method.per_axis, "interp": method.interp}
            return self.cache_dir / "interp" / f"x{method.per_axis}-{method.interp}-{settings_digest(s)}"
        m = method.model
        if id(m) not in self._fingerprints:
            self._fingerprints[id(m)] = model_fingerprint(m.vae if method.kind == "natural" else m)
        s = {**self.image_settings, "kind": method.kind, "model": self._fingerprints[id(m)], "stage2_2d": True,
             "latent_channels": method.latent_channels}
        name = Path(m.source).name if method.kind == "natural" else m.weights_info.get("model", "model")
        return self.cache_dir / method.kind / f"{safe_name(name, 'model')}-{settings_digest(s)}"

    @staticmethod
    def _cached(path: Path) -> bool:
        """A readable cache entry exists (only its header is read)."""
        if not path.is_file():
            return False
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                return "x" in fh.keys()
        except (SafetensorError, OSError) as e:
            logger.warning("%s: damaged cache entry rebuilt (%s)", path, e)
            return False

    def _load(self, path: Path) -> torch.Tensor | None:
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))["x"]
        except (SafetensorError, OSError, KeyError) as e:  # a damaged entry is rebuilt, not trusted
            logger.warning("%s: damaged cache entry rebuilt (%s)", path, e)
            return None

    @staticmethod
    def _store(path: Path, x: torch.Tensor, source: Path) -> None:
        from safetensors.torch import save_file

        from medlatent.io.atomic import atomic_write

        with atomic_write(path) as tmp:
            save_file({"x": x.contiguous()}, str(tmp), metadata={"source": str(source)})

    # ---------------------------------------------------------------------------------- building
    def _read(self, entry: CADEntry) -> torch.Tensor:
        from medlatent.io.image import ImageReadError
        from medlatent.io.readers import read_image
        from medlatent.preprocessing import PreprocessingError, preprocess

        where = f"{self.task.csv_path}, line {entry.line}"
        try:
            img = read_image(entry.path)
            x, _ = preprocess(img, spatial_dims=self.dims, in_channels=1, downsample=1, modality=self.config.modality)
        except (ImageReadError, PreprocessingError) as e:
            raise CADDataError(f"{where}: {e}") from e
        return resize(torch.from_numpy(x), self.size, self.config.resize).clamp_(-1.0, 1.0)

    def image(self, entry: CADEntry) -> torch.Tensor:
        """The prepared high-resolution image ``1×size`` in [-1, 1] (cached)."""
        path = self.folder(Method("image", "image")) / f"{self._digest(entry)}.safetensors"
        x = self._load(path)
        if x is None:
            # stored and used as float16 either way, so a latent made now equals one made after a cache hit
            x = self._read(entry).to(torch.float16)
            self._store(path, x, entry.path)
        return x.float()

    def _make(self, method: Method, entry: CADEntry) -> torch.Tensor:
        img = self.image(entry)
        if method.kind == "image":
            return img
        if method.kind == "interp":
            return resize(img, [n // method.per_axis for n in self.size], method.interp).clamp_(-1.0, 1.0)
        if method.kind == "latent":
            return latent_input(method.model, img, method.latent_channels)
        if img.ndim == 4:  # stitched, or a natural-image autoencoder on a volume: slice by slice
            return stitched_latent_input(method.model, img, method.latent_channels)
        return channel_mode(encode_2d(method.model, img[None])[0], method.latent_channels)

    def build(self, method: Method) -> "CachedInputs":
        """All rows' inputs for ``method`` (computed once, then read from the cache)."""
        s = method.per_axis
        if any(n % s for n in self.size):
            raise CADDataError(f"input size {self.size} is not a multiple of {s} per axis (method {method.label!r}); "
                               f"choose a size divisible by {s}")
        folder = self.folder(method)
        files = []
        made = 0
        for entry in self.task.entries:
            path = folder / f"{self._digest(entry)}.safetensors"
            if not self._cached(path):
                x = self._make(method, entry)
                if method.kind != "image":  # image() has stored it already
                    self._store(path, x.to(torch.float16), entry.path)
                made += 1
            files.append(path)
        logger.info("%s: %d inputs prepared, %d from the cache (%s)", method.label, made, len(files) - made, folder)
        return CachedInputs(files, preload_gb=self.config.preload_gb)



class CachedInputs(Dataset):
    """Prepared inputs of one method: held in memory when they fit ``preload_gb``, else read per item."""

    def __init__(self, files: list[Path], preload_gb: float = 2.0) -> None:
        from safetensors import safe_open

        self.files = files
        with safe_open(str(files[0]), "pt") as fh:
            self.shape = tuple(fh.get_slice("x").get_shape())
        total = len(files) * math.prod(self.shape) * 4
        self.data: torch.Tensor | None = None
        if total <= preload_gb * 2**30:
            self.data = torch.stack([self._read(i) for i in range(len(files))])

    def _read(self, i: int) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.files[i]))["x"].float()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i] if self.data is not None else self._read(i)

