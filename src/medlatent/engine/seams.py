"""Seam quality of tiled inference: agreement with untiled output and gradient energy along tile borders."""

from __future__ import annotations

import torch

from medlatent.engine.tiling import balanced_tile, tile_starts
from medlatent.metrics import psnr


def border_mask(shape: tuple[int, ...], tile: int, overlap: int, scale: int = 1, width: int = 1) -> torch.Tensor:
    """Boolean mask of output positions within ``width`` of a blend-zone centre between neighbouring tiles.

    ``tile``/``overlap`` are in input voxels; ``scale`` maps them to the output grid of ``shape``.
    """
    in_shape = tuple(n // scale for n in shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    for ax, n in enumerate(in_shape):
        t = balanced_tile(n, tile, overlap)
        starts = tile_starts(n, t, overlap)
        for prev, nxt in zip(starts, starts[1:]):
            centre = int(round((nxt + prev + t) / 2 * scale))
            idx = [slice(None)] * len(shape)
            idx[ax] = slice(max(0, centre - width), min(shape[ax], centre + width))
            mask[tuple(idx)] = True
    return mask


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """|∇x| by forward differences over all spatial axes of a ``…×spatial`` tensor (last axes), same shape."""
    g = torch.zeros_like(x, dtype=torch.float32)
    spatial = x.ndim
    for ax in range(spatial):
        d = torch.diff(x.float(), dim=ax, append=x.float().narrow(ax, x.shape[ax] - 1, 1))
        g += d * d
    return g.sqrt()


def seam_report(tiled: torch.Tensor, untiled: torch.Tensor, tile: int, overlap: int, scale: int = 1) -> dict:
    """PSNR of tiled vs untiled (data range of the untiled output) and the border/elsewhere gradient ratio.

    Args:
        tiled, untiled: outputs with spatial shape only (e.g. ``H×W`` or ``X×Y×Z``), one channel.
        tile, overlap, scale: the tiling, in input voxels, and output voxels per input voxel.
    """
    rng = float(untiled.max() - untiled.min()) or 1.0
    mask = border_mask(tuple(tiled.shape), tile, overlap, scale)
    gt = gradient_magnitude(tiled)
    gu = gradient_magnitude(untiled)
    ratio_tiled = float(gt[mask].mean() / gt[~mask].mean()) if mask.any() else float("nan")
    ratio_untiled = float(gu[mask].mean() / gu[~mask].mean()) if mask.any() else float("nan")
    return {"psnr_vs_untiled": psnr(tiled, untiled, rng), "border_gradient_ratio": ratio_tiled,
            "border_gradient_ratio_untiled": ratio_untiled, "border_fraction": float(mask.float().mean())}
