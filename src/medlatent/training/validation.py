"""Validation during training, by the protocol of ``medlatent evaluate recon`` and ``medlatent roundtrip``.

Each validation image is used whole: read and preprocessed as ``medlatent encode`` does, encoded to the
posterior mean ``z``, rounded through float16 as latent files store it, decoded by the tiled engine, put back
on the original grid, and compared with the original after both are mapped to [0, 1] by the image's own
intensity map (data range 1; :func:`medlatent.report.roundtrip_metrics`). So ``val_psnr`` of the last step is
the PSNR ``medlatent evaluate recon`` reports for ``final/`` on the same images (with ``train.ema_decay``
set, both use the averaged weights).

One difference: in a 2D run, a 3D file among the validation images is validated on its middle axial slice (as a
2D image), since a 2D model cannot encode the volume whole.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import torch

from medlatent.io.image import ImageData, spacing_affine
from medlatent.model import MedVAE
from medlatent.pipeline import EncodeOptions, decode_latent, encode_image
from medlatent.report import roundtrip_metrics, to_unit
from medlatent.training.data import DataConfig, Entry

logger = logging.getLogger(__name__)

PROTOCOL = ("whole images as `medlatent evaluate recon`: posterior mean z rounded through float16, decoded onto the "
            "original grid, PSNR / MS-SSIM of both images mapped to [0, 1] by the image's intensity map")


def read_whole(entry: Entry, spatial_dims: int) -> ImageData:
    """The validation image of ``entry``; a volume in a 2D run gives its middle axial slice."""
    from medlatent.io.dicom import read_dicom_series
    from medlatent.io.readers import read_image

    if entry.files is not None:
        img = read_dicom_series(entry.path, uneven="resample", files=list(entry.files))
    else:
        img = read_image(entry.path, uneven="resample")
    if img.spatial_dims == 3 and spatial_dims == 2:
        k = img.array.shape[-1] // 2
        spacing = tuple(float(v) for v in np.linalg.norm(img.affine[:3, :2], axis=0))
        img = ImageData(np.ascontiguousarray(img.array[..., k])[None], spacing_affine(spacing),
                        modality=img.modality, source=img.source)
    return img


@torch.no_grad()
def evaluate_entry(model: MedVAE, entry: Entry, data: DataConfig) -> tuple[dict[str, float], tuple[np.ndarray, ...]]:
    """Metrics of one validation image and its (original, reconstruction) pair in [0, 1] for the previews.

    Raises:
        ValueError (and subclasses: image read errors, preprocessing errors) naming the file.
    """
    img = read_whole(entry, model.spatial_dims)
    opts = EncodeOptions(modality=entry.modality, stage2=False, mri_percentiles=data.mri_percentiles)
    lf = encode_image(model, img, opts)
    lf = dataclasses.replace(lf, z=lf.z.to(torch.float16).float())  # as a latent file stores it
    rec = decode_latent(model, lf, source=entry.path, strict_weights=False, out_dtype="float32")
    metrics = roundtrip_metrics(img.array, rec.array, lf.preprocessing)
    pair = tuple(to_unit(a, lf.preprocessing) for a in (img.array, rec.array))
    if model.spatial_dims == 3:  # X×Y×Z → 1×X×Y×Z, the previews' volume layout
        pair = tuple(a[None] for a in pair)
    return metrics, pair


def validate_model(model: MedVAE, entries: list[Entry], data: DataConfig, previews: int
                   ) -> tuple[dict[str, float], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Mean PSNR / MS-SSIM over ``entries`` (keys ``val_psnr``, ``val_ms_ssim``, ``val_images``) and preview pairs.

    MS-SSIM is left out for images too small for two of its scales (NaN), as ``evaluate recon`` does.
    """
    psnrs, ssims, shown = [], [], []
    for entry in entries:
        metrics, pair = evaluate_entry(model, entry, data)
        if math.isfinite(metrics["psnr"]):
            psnrs.append(metrics["psnr"])
        if not math.isnan(metrics["ms_ssim"]):
            ssims.append(metrics["ms_ssim"])
        if len(shown) < previews:
            shown.append(tuple(torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in pair))
    out = {"val_psnr": float(np.mean(psnrs)) if psnrs else float("nan"),
           "val_ms_ssim": float(np.mean(ssims)) if ssims else float("nan"),
           "val_images": float(len(entries))}
    return out, shown


def write_split(path: Path, entries: list[Entry], how: str) -> Path:
    """``val_split.txt``: how the validation images were chosen, then one path per line."""
    lines = [f"# validation images: {how}", *(str(e.path) for e in entries)]
    path.write_text("\n".join(lines) + "\n")
    return path
