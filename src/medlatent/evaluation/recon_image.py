"""One image of a reconstruction evaluation: every method's reconstruction, back on the original grid, against
the original (PSNR, MS-SSIM, ROI PSNR and the values each method stores)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medlatent.evaluation.recon_methods import MethodSpec
from medlatent.evaluation.recon_rois import Box, roi_psnr
from medlatent.metrics import ms_ssim, psnr

if TYPE_CHECKING:
    from medlatent.io.image import ImageData
    from medlatent.model.autoencoder import MedVAE
    from medlatent.preprocessing import Preprocessing

CONVENTION = ("PSNR (dB) and MS-SSIM on images mapped to [0, 1] by each image's own intensity map (2D/MRI "
              "min–max, CT HU window [-1000, 1000], clipped), data range 1, on the original grid; "
              "ROI PSNR on the same arrays cropped to each box.")
METRICS = ("psnr", "ms_ssim", "roi_psnr")


@dataclass
class ImageEvaluation:
    """One image's results: ``metrics[method]`` has ``psnr``, ``ms_ssim``, ``roi_psnr`` (mean over boxes, NaN
    without boxes), ``roi_psnrs`` (per box) and ``stored`` (values the method kept, ``None`` if unknown);
    ``original`` and ``recons[method]`` are the [0, 1] arrays on the original grid (``C×H×W`` or ``X×Y×Z``);
    ``preprocessing`` is the record of what was done to the image (for the first model); ``pixels`` the
    number of pixels (voxels) of the image."""

    metrics: dict[str, dict[str, Any]]
    original: np.ndarray
    recons: dict[str, np.ndarray]
    preprocessing: "Preprocessing"
    pixels: int = 0


def evaluate_image(img: "ImageData", model: "MedVAE", methods: Mapping[str, MethodSpec], *,
                   modality: str = "auto", mri_percentiles: tuple[float, float] | None = None,
                   boxes: Sequence[Box] = ()) -> ImageEvaluation:
    """Metrics of every method on one image, preprocessed as ``medlatent encode`` does.

    Each method gets the image padded to its own ``multiple`` (a model: its reduction), so its result does not
    depend on the other methods of the run; all are compared on the original grid.

    Args:
        img: the image as read.
        model: the first model: its dimensionality, and the padding and channels of methods that name none.
        methods: ``{name: MethodSpec}`` (see :func:`build_methods`).
        boxes: regions for ROI PSNR, in the image's own pixel indices.
    """
    from medlatent.preprocessing import preprocess, restore
    from medlatent.report import to_unit

    d = model.spatial_dims
    prepared: dict[tuple[int, int], tuple[torch.Tensor, "Preprocessing", np.ndarray]] = {}
    metrics: dict[str, dict[str, Any]] = {}
    recons: dict[str, np.ndarray] = {}
    first = None
    for name, spec in methods.items():
        key = (spec.in_channels or model.config.in_channels, spec.multiple or model.downsample_per_axis)
        if key not in prepared:
            x, rec = preprocess(img, spatial_dims=d, in_channels=key[0], downsample=key[1], modality=modality,
                                mri_percentiles=mri_percentiles)
            prepared[key] = (torch.from_numpy(x)[None], rec, to_unit(np.asarray(img.array), rec))
        xt, rec, truth = prepared[key]
        first = first or (truth, rec)
        with torch.inference_mode():
            y = spec.fn(xt)
        if tuple(y.shape) != tuple(xt.shape):
            raise RuntimeError(f"method {name!r} returned shape {tuple(y.shape)} for input {tuple(xt.shape)}")
        out = to_unit(restore(y[0].float().cpu().numpy(), rec, "float32"), rec)
        rois = [roi_psnr(truth, out, b, d) for b in boxes]
        metrics[name] = {"psnr": psnr(truth, out), "ms_ssim": ms_ssim(truth, out, spatial_dims=d),
                         "roi_psnr": float(np.mean(rois)) if rois else float("nan"), "roi_psnrs": rois,
                         "stored": spec.stored(tuple(xt.shape)) if spec.stored else None}
        recons[name] = out
    if first is None:
        raise ValueError("no methods to evaluate")
    return ImageEvaluation(metrics, first[0], recons, first[1], math.prod(img.spatial_shape))
