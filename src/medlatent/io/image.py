"""Pixel data together with its geometry: what every reader returns and every writer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)  # intensities beyond this overflow the model's float32 input


class ImageReadError(ValueError):
    """A file cannot be read as a medical image; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass
class ImageData:
    """An image or volume with its geometry.

    Attributes:
        array: 2D images ``C×H×W`` (rows, columns; ``C`` = 1 or 3); 3D volumes ``X×Y×Z`` in the file's voxel
            index order (as nibabel returns them; Z is the slice axis of DICOM series).
        affine: ``(d+1)×(d+1)`` map from voxel/pixel indices to world millimetres. 3D: RAS+ (NIfTI
            convention) for ``(i, j, k)``. 2D: ``(row, col)`` → millimetres (pixel spacing; identity if unknown).
        modality: ``"ct"``, ``"mri"``, ``"xray"``, … when the file says so, else ``None``.
        source: the path the data came from (kept in memory only; never written to latent files).
        meta: format details needed to write the data back faithfully (e.g. original dtype, bit depth).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return self.affine.shape[0] - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[-self.spatial_dims:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Physical size of one pixel/voxel along each array axis (mm)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:-1, :-1], axis=0))


def spacing_affine(spacing: tuple[float, ...]) -> np.ndarray:
    """A diagonal affine for a given pixel spacing."""
    a = np.eye(len(spacing) + 1)
    a[np.arange(len(spacing)), np.arange(len(spacing))] = spacing
    return a
