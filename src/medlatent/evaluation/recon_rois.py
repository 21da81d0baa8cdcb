"""Regions of interest of a reconstruction evaluation: boxes per image from a CSV and the PSNR inside them (the
paper's fine-grained wrist-fracture evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlatent.evaluation.recon_inputs import EvaluationInputError, csv_rows, resolve_path
from medlatent.metrics import psnr


@dataclass(frozen=True)
class Box:
    """A half-open box in pixel/voxel indices of the image as stored in its file.

    2D: ``x`` is the column and ``y`` the row (``array[:, y0:y1, x0:x1]`` of a ``C×H×W`` image). 3D: ``x, y, z``
    are the voxel indices ``i, j, k`` of the file's ``X×Y×Z`` array (``array[x0:x1, y0:y1, z0:z1]``), before
    medlatent reorients anything.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    z0: int | None = None
    z1: int | None = None
    where: str = ""

    def crop(self, arr: np.ndarray, spatial_dims: int) -> np.ndarray:
        """The box's part of a ``C×H×W`` image or ``X×Y×Z`` volume; errors name the ROI file line."""
        if spatial_dims == 2:
            h, w = arr.shape[-2:]
            ok = 0 <= self.x0 < self.x1 <= w and 0 <= self.y0 < self.y1 <= h
            if not ok:
                raise EvaluationInputError(f"{self.where}: box x {self.x0}:{self.x1}, y {self.y0}:{self.y1} is empty "
                                           f"or outside the {h}×{w} image (x is the column, y the row)")
            return arr[..., self.y0:self.y1, self.x0:self.x1]
        if self.z0 is None or self.z1 is None:
            raise EvaluationInputError(f"{self.where}: a 3D image needs z0 and z1 in its box")
        shape = arr.shape[-3:]
        spans = [(self.x0, self.x1), (self.y0, self.y1), (self.z0, self.z1)]
        if not all(0 <= a < b <= n for (a, b), n in zip(spans, shape)):
            raise EvaluationInputError(f"{self.where}: box {spans} is empty or outside the volume of shape {shape}")
        return arr[self.x0:self.x1, self.y0:self.y1, self.z0:self.z1]


def read_rois(path: str | Path) -> dict[Path, list[Box]]:
    """Boxes per image from a CSV ``path, x0, y0, x1, y1[, z0, z1]`` (header optional; several rows per image).

    Paths are resolved (relative ones from the CSV's folder) and matched to the resolved input paths (the folder,
    for a DICOM series). Coordinates are integer pixel indices of the original image, half-open (see :class:`Box`).
    """
    path = Path(path)
    out: dict[Path, list[Box]] = {}
    for line, row in csv_rows(path):
        where = f"{path}, line {line}"
        try:
            vals = {k: int(float(row[k])) for k in ("x0", "y0", "x1", "y1")}
            for k in ("z0", "z1"):
                vals[k] = int(float(row[k])) if row.get(k) else None
        except (KeyError, ValueError) as e:
            raise EvaluationInputError(f"{where}: expected path,x0,y0,x1,y1[,z0,z1] with integer coordinates, "
                                       f"got {row}") from e
        if not row.get("path"):
            raise EvaluationInputError(f"{where}: no path")
        out.setdefault(resolve_path(path.parent, row["path"]).resolve(), []).append(Box(**vals, where=where))
    return out


def roi_psnr(a: np.ndarray, b: np.ndarray, box: Box, spatial_dims: int) -> float:
    """PSNR (data range 1) of two [0, 1] arrays cropped to ``box``."""
    return psnr(box.crop(a, spatial_dims), box.crop(b, spatial_dims))
