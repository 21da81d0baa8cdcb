"""Reconstruction metrics. Convention: both images mapped to [0, 1] by the same intensity map (data range 1)."""

from __future__ import annotations

import math

import numpy as np
import torch


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    a_t, b_t = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    mse = torch.mean((a_t - b_t) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ms_ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """Multi-scale SSIM (torchmetrics) of two ``C×H×W`` or ``X×Y×Z`` arrays.

    Uses as many of the standard five scales as the image size allows (each scale halves the size and the
    11-pixel window must fit); returns NaN for images too small for even two scales.
    """
    try:
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError("MS-SSIM needs torchmetrics: pip install 'medlatent[metrics]'") from e
    a_t = torch.as_tensor(np.asarray(a), dtype=torch.float32)
    b_t = torch.as_tensor(np.asarray(b), dtype=torch.float32)
    if a_t.ndim == 3 and a_t.shape[0] in (1, 3):  # C×H×W image
        a_t, b_t = a_t[None], b_t[None]
    else:  # X×Y×Z volume
        a_t, b_t = a_t[None, None], b_t[None, None]
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    smallest = min(a_t.shape[2:])
    k = 11 if smallest >= 11 else (smallest // 2) * 2 - 1
    scales = 1
    while scales < 5 and smallest // 2 ** scales > (k - 1):
        scales += 1
    if scales < 2 or k < 3:
        return float("nan")
    b_used = tuple(x / sum(betas[:scales]) for x in betas[:scales])
    return float(msssim(a_t, b_t, data_range=data_range, kernel_size=k, betas=b_used, normalize="relu"))
