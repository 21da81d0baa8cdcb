"""Image-wide GroupNorm statistics for tiled inference.

Run tile by tile, every GroupNorm layer normalises with the statistics of its tile, which differ from those of
the whole image; that, not the receptive field, is what makes tiled output differ from untiled output. With
image-wide statistics the engine first makes *statistics passes* over all tiles: each GroupNorm layer adds up
Σx and Σx² of its input over the tile's *core* (the tile less half of each overlap with a neighbour; the cores
partition the image at every resolution), and the next pass normalises every tile with the totals. Pass ``k``
makes the first ``k`` GroupNorm layers exact, and the deeper layers converge quickly, because their inputs are
already close. The mid-block attention still sees one tile.

Memory stays bounded by the tile: the statistics are two numbers per group and layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from medlatent.engine.tiling import Tile
from medlatent.model.layers import GroupNorm32, routed_group_norms

Fractions = tuple[tuple[float, float], ...]  # per axis: core start and end as fractions of the tile extent


def core_fractions(tiles: list[Tile], shape: tuple[int, ...], multiple: int = 1) -> dict[Tile, Fractions]:
    """Each tile's core, as fractions of its extent per axis. Along an axis the border between neighbouring
    tiles is the middle of their overlap (rounded to ``multiple``), so the cores partition ``shape``."""
    out: dict[Tile, Fractions] = {}
    for t in tiles:
        fr = []
        for ax, (a, n) in enumerate(zip(t.starts, t.sizes)):
            starts = sorted({u.starts[ax] for u in tiles})
            k = starts.index(a)
            lo = 0 if k == 0 else _border(starts[k - 1] + n, a, multiple)
            hi = shape[ax] if k == len(starts) - 1 else _border(a + n, starts[k + 1], multiple)
            fr.append(((lo - a) / n, (hi - a) / n))
        out[t] = tuple(fr)
    return out


def _border(prev_end: int, next_start: int, multiple: int) -> int:
    return round((prev_end + next_start) / 2 / multiple) * multiple


class ImageNorm:
    """Shared state of the GroupNorm layers of one model during a tiled run (see the module docstring)."""

    def __init__(self, core_of: dict[Tile, Fractions]) -> None:
        self.core_of = core_of  # each tile's core (see core_fractions)
        self.fixed: dict[GroupNorm32, tuple[torch.Tensor, torch.Tensor]] = {}  # layer → (scale, shift) per channel
        self.sums: dict[GroupNorm32, list] = {}  # layer → [Σx per channel, Σx² per channel, voxels summed]
        self.record = False
        self.cores: list[Fractions] = []  # of the tiles in the current batch

    def set_batch(self, tiles: list[Tile]) -> None:
        """The tiles of the next forward pass, in batch order."""
        self.cores = [self.core_of[t] for t in tiles]

    def start_pass(self, record: bool) -> float:
        """Normalise with the totals of the previous pass (if any); record anew if ``record``.

        Returns the largest relative change of a GroupNorm scale (1/σ per group) against the statistics used
        so far, or ``inf`` on the first pass: how far the passes are from their fixed point.
        """
        drift = float("inf") if not self.fixed else 0.0
        for gn, (s1, s2, n) in self.sums.items():
            g, per = gn.num_groups, gn.num_channels // gn.num_groups
            mean = s1.view(g, -1).sum(1) / (n * per)
            var = (s2.view(g, -1).sum(1) / (n * per) - mean**2).clamp_min(0)
            inv = torch.rsqrt(var + gn.eps).repeat_interleave(per)
            scale = gn.weight.detach().double() * inv
            if gn in self.fixed:
                old = self.fixed[gn][0].double()
                drift = max(drift, float(((scale - old).abs() / old.abs().clamp_min(1e-12)).max()))
            self.fixed[gn] = (scale.float(), (gn.bias.detach().double() - mean.repeat_interleave(per) * scale).float())
        self.sums = {}
        self.record = record
        return drift

    def __call__(self, gn: GroupNorm32, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.record:
            self._add(gn, xf)
        if gn not in self.fixed:
            y = nn.functional.group_norm(xf, gn.num_groups, gn.weight.float(), gn.bias.float(), gn.eps)
        else:
            scale, shift = (t.to(xf.device).view(1, -1, *(1,) * (xf.ndim - 2)) for t in self.fixed[gn])
            y = torch.addcmul(shift, xf, scale)
        return y.to(x.dtype)

    def _add(self, gn: GroupNorm32, xf: torch.Tensor) -> None:
        spatial = xf.shape[2:]
        dims = tuple(range(1, xf.ndim - 1))
        acc = self.sums.setdefault(gn, [0.0, 0.0, 0])
        for b, fr in enumerate(self.cores):
            box = tuple(slice(round(f0 * n), round(f1 * n)) for (f0, f1), n in zip(fr, spatial))
            index: tuple[int | slice, ...] = (b, slice(None), *box)
            core = xf[index]
            count = core[0].numel()
            if count == 0:
                continue
            acc[0] = acc[0] + core.sum(dims).double()
            acc[1] = acc[1] + core.square().sum(dims).double()
            acc[2] += count


@contextmanager
def attached(model: nn.Module, norm: ImageNorm) -> Iterator[ImageNorm]:
    """Route every GroupNorm of ``model`` through ``norm`` for the duration of the block (this model only; one
    routing per model at a time, see :func:`medlatent.model.layers.routed_group_norms`)."""
    with routed_group_norms(model, norm):
        yield norm
