"""Small reader studies built from real images (pydicom's CT and MR test slices) and two real methods:
bicubic and nearest-neighbour shrink-and-enlarge at f=16 (4 per axis), written as NIfTI in the original units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from io_fixtures import sample_file
from medlatent.evaluation.baselines import roundtrip
from medlatent.io.image import ImageData
from medlatent.io.readers import read_image
from medlatent.io.writers import write_image

CASES = ("CT_small.dcm", "MR_small.dcm")  # 128×128 CT (HU), 64×64 MR
METHODS = {"bicubic": "bicubic", "nearest": "nearest"}


def make_inputs(root: Path) -> tuple[Path, dict[str, Path]]:
    """``originals/`` and one folder per method; files named alike, intensities in the original units."""
    folders = {m: root / m for m in METHODS}
    for name in CASES:
        img = read_image(sample_file(name))
        arr = img.array.astype(np.float32)
        stem = name.split(".")[0]
        write_image(ImageData(arr, img.affine), root / "originals" / f"{stem}.nii.gz", "nifti")
        for m, mode in METHODS.items():
            rec = roundtrip(torch.from_numpy(arr)[None], 4, mode)[0].numpy()
            write_image(ImageData(rec.astype(np.float32), img.affine), folders[m] / f"{stem}.nii.gz", "nifti")
    return root / "originals", folders


def make_study(root: Path, readers=("alice", "bob"), **kw) -> tuple[Path, dict[str, str]]:
    """A created study (4 pairs: 2 cases × 2 methods at factor 16) and ``{reader: token}``."""
    from medlatent.readerstudy.study import MethodSource, create_study, pairs_from_folders

    originals, folders = make_inputs(root / "inputs")
    specs = pairs_from_folders(originals, [MethodSource(m, d, "16") for m, d in folders.items()])
    tokens = create_study(root / "study", specs, list(readers), **kw)
    return root / "study", dict(tokens)
