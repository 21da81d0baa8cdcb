"""Any-size encode and decode with bounded memory: overlapping tiles blended with linear ramps.

By default each tile is computed independently, so the GroupNorm statistics and the mid-block attention of a
tile see only that tile: tiled results approach the untiled ones as tiles grow. ``norm="image"`` first gathers
image-wide GroupNorm statistics over all tiles (``medlatent.engine.imagenorm``), which brings tiled output much
closer to untiled output for a few extra passes (see ``bench/RESULTS.md``).

Encode: tiles in image space → posterior means blended in latent space. Decode: tiles in latent space → images
blended in image space. Memory is bounded by the tile (and the output buffer), not by the image.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from medlatent.engine.imagenorm import ImageNorm, attached, core_fractions
from medlatent.engine.tiling import Tile, blend_weights, plan_tiles, receptive_radius, tile_for_budget
from medlatent.model.autoencoder import MedVAE, require_finite

logger = logging.getLogger(__name__)

# Peak activation bytes per image-space voxel per float32 value, measured on CPU for the released widths
# (ch=128): encode ≈ 4 full-resolution tensors of ch·ch_mult[0] channels, decode ≈ 3 of ch·ch_mult[1].
_ENCODE_TENSORS = 4
_DECODE_TENSORS = 3


@dataclass
class TileSettings:
    """Tile geometry in image-space voxels per axis (``None``: chosen from the memory budget).

    Attributes:
        tile: tile edge in image space (a multiple of the model's reduction).
        overlap: overlap between neighbouring tiles in image space.
        max_memory_gb: activation memory allowed for one batch of tiles.
        batch_size: tiles per forward pass.
        max_tokens: cap on the mid-block attention positions per tile (``(tile/s)**dims``) when the tile is
            chosen automatically. Attention costs grow with the square of this number, so on large images
            several moderate tiles are much faster than one huge tile (0: no cap).
        norm: GroupNorm statistics per ``tile`` (one pass) or over the whole ``image`` (``norm_passes``
            statistics passes over all tiles, then the output pass).
        norm_passes: statistics passes for ``norm="image"``.
    """

    tile: int | None = None
    overlap: int | None = None
    max_memory_gb: float | None = None
    batch_size: int = 1
    max_tokens: int = 2**14
    norm: str = "tile"
    norm_passes: int = 4

    def __post_init__(self) -> None:
        if self.norm not in ("tile", "image"):
            raise ValueError(f"norm must be 'tile' or 'image', got {self.norm!r}")
        if self.norm_passes < 1:
            raise ValueError(f"norm_passes must be ≥ 1, got {self.norm_passes}")


def norm_options(spec: str) -> dict:
    """``TileSettings`` fields for a ``--norm`` value: ``tile``, ``image`` or ``image:PASSES``."""
    kind, _, passes = spec.partition(":")
    try:
        return {"norm": kind, **({"norm_passes": int(passes)} if passes else {})}
    except ValueError:
        raise ValueError(f"norm passes must be an integer, got {passes!r}") from None


def default_budget_gb(device: torch.device) -> float:
    """What fits the device: 60% of free GPU memory; on CPU a quarter of RAM, at most 6 GB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.6 * free / 2**30
    try:
        import os

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = 16.0
    return min(6.0, ram / 4)


class TiledAutoencoder:
    """Wraps a :class:`MedVAE` for images of any size. Inputs/outputs are single images ``1×C×…``."""

    def __init__(self, model: MedVAE, settings: TileSettings | None = None) -> None:
        self.model = model
        self.settings = settings or TileSettings()
        if self.settings.batch_size < 1:
            raise ValueError("batch_size must be ≥ 1")

    # ----------------------------------------------------------------------------------------- geometry
    @property
    def s(self) -> int:
        return self.model.downsample_per_axis

    def _bytes_per_voxel(self, op: str, dtype: torch.dtype) -> float:
        cfg = self.model.config
        elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
        if op == "encode":
            return _ENCODE_TENSORS * cfg.ch * cfg.ch_mult[0] * elem
        return _DECODE_TENSORS * cfg.ch * max(cfg.ch_mult[: 2]) * elem

    def tile_and_overlap(self, op: str, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
        """Image-space tile edge and overlap for ``op`` (``encode``/``decode``)."""
        st, s = self.settings, self.s
        if st.tile is not None:
            if st.tile % s or st.tile < 2 * s:
                raise ValueError(f"tile must be a multiple of {s} and at least {2 * s}, got {st.tile}")
            tile = st.tile
        else:
            budget = (st.max_memory_gb or default_budget_gb(self._device())) * 2**30 / st.batch_size
            tile = tile_for_budget(budget, self._bytes_per_voxel(op, dtype), self.model.spatial_dims, s, 8 * s)
            if st.max_tokens:
                cap = int(round(st.max_tokens ** (1 / self.model.spatial_dims))) * s
                tile = max(8 * s, min(tile, cap))
            if self.model.max_tile:  # the model's own limit
                tile = min(tile, self.model.max_tile)
        if st.overlap is not None:
            overlap = st.overlap
        else:  # a quarter of the tile, at most the theoretical receptive radius
            r = receptive_radius(self.model.config.ch_mult, self.model.config.num_res_blocks)
            overlap = min(tile // 4, r)
        overlap = max(0, (overlap // s) * s)
        if overlap >= tile:
            raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
        return tile, overlap

    def images_per_pass(self, shape: tuple[int, ...], op: str = "encode", dtype: torch.dtype = torch.float32) -> int:
        """How many whole images of spatial ``shape`` one forward pass may take within the memory budget;
        0 when one such image needs more than one tile."""
        tile, _ = self.tile_and_overlap(op, dtype)
        if any(n > tile for n in shape):
            return 0
        budget = (self.settings.max_memory_gb or default_budget_gb(self._device())) * 2**30
        voxels = math.prod(shape) * (self.s ** len(shape) if op == "decode" else 1)
        return max(1, int(budget // (self._bytes_per_voxel(op, dtype) * voxels)))

    def _device(self) -> torch.device:
        return self.model.device

    # ----------------------------------------------------------------------------------------- core loop
    def _run(self, x: torch.Tensor, fn, ratio: float, out_channels: int, tile: int, overlap: int,
             multiple: int) -> torch.Tensor:
        """Apply ``fn`` tile by tile to ``x`` (``1×C×…``); tile/overlap in voxels of ``x``.

        ``ratio`` is output voxels per input voxel (``1/s`` to encode, ``s`` to decode).
        """
        if x.shape[0] != 1:
            raise ValueError("tiled inference takes one image at a time (batch of 1)")
        shape = tuple(x.shape[2:])
        tiles = plan_tiles(shape, (tile,) * len(shape), (overlap,) * len(shape), multiple)
        if len(tiles) == 1:
            return fn(x).float()
        logger.debug("%d tiles of %d (overlap %d) over %s", len(tiles), tile, overlap, shape)

        def crop(batch: list[Tile]) -> torch.Tensor:
            return torch.cat([x[(slice(None), slice(None)) + t.slices()] for t in batch])

        out_shape = tuple(int(round(n * ratio)) for n in shape)
        out_overlap = (int(round(overlap * ratio)),) * len(shape)
        out = torch.zeros((1, out_channels, *out_shape), dtype=torch.float32, device=x.device)
        wsum = torch.zeros((1, 1, *out_shape), dtype=torch.float32, device=x.device)
        with self._norm_context(tiles, shape, multiple) as norm:
            for _ in range(self.settings.norm_passes if norm else 0):  # statistics passes
                norm.start_pass(record=True)
                for batch in self._batches(tiles):
                    norm.set_batch(batch)
                    fn(crop(batch))
            if norm:
                drift = norm.start_pass(record=False)
                logger.info("image-wide GroupNorm: last pass changed a scale by %.2g", drift)
            for batch in self._batches(tiles):
                y = fn(crop(batch)).float()
                for t, yt in zip(batch, y):
                    ts = _scaled(t, ratio)
                    sl = (slice(None), slice(None), *ts.slices())
                    w = blend_weights(ts, out_shape, out_overlap, x.device)
                    out[sl] += yt * w
                    wsum[sl] += w
        return out / wsum

    @contextmanager
    def _norm_context(self, tiles: list[Tile], shape: tuple[int, ...], multiple: int):
        """An :class:`ImageNorm` attached to the model when ``norm="image"``, else ``None``."""
        if self.settings.norm != "image":
            yield None
            return
        norm = ImageNorm(core_fractions(tiles, shape, multiple))
        with attached(self.model, norm):
            yield norm

    def _batches(self, tiles: list[Tile]):
        bs = self.settings.batch_size
        for i in range(0, len(tiles), bs):
            yield tiles[i : i + bs]

    # ----------------------------------------------------------------------------------------- API
    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean ``z`` (``1×C×…/s``) of an image ``1×C_in×…`` (sizes multiples of ``s``)."""
        tile, overlap = self.tile_and_overlap("encode", x.dtype)
        require_finite(x, "image")  # once here, not per tile: the scan waits for the device
        return self._run(x, lambda t: self.model.encode(t, check_finite=False).mean, 1 / self.s, self.model.C, tile,
                         overlap, self.s)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, grayscale: bool = False) -> torch.Tensor:
        """Image ``1×C_out×…`` from a latent ``z`` (``1×C×…``); tiles planned in latent voxels."""
        tile, overlap = self.tile_and_overlap("decode", z.dtype)
        require_finite(z, "latent z")  # once here, not per tile
        s = self.s
        out_ch = 1 if grayscale else self.model.config.out_channels
        return self._run(z, lambda t: self.model.decode(t, grayscale=grayscale, check_finite=False), float(s), out_ch,
                         max(2, tile // s), overlap // s, 1)


def _scaled(t: Tile, ratio: float) -> Tile:
    return Tile(tuple(int(a * ratio) for a in t.starts), tuple(int(n * ratio) for n in t.sizes))
