"""Reconstruction metrics. Convention: both images mapped to [0, 1] by the same intensity map (data range 1)."""

from __future__ import annotations

import math

import numpy as np
import torch

#: Weights of the five standard MS-SSIM scales (Wang et al., 2003); renormalised when fewer scales fit.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    a_t, b_t = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    mse = torch.mean((a_t - b_t) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ms_ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0, *,
            spatial_dims: int | None = None) -> float:
    """Multi-scale SSIM (torchmetrics) of two ``C×H×W`` images or ``X×Y×Z`` volumes.

    Uses as many of the standard five scales as the image size allows and renormalises their weights; returns
    NaN for images too small for even two scales.

    Args:
        a, b: ``C×H×W`` (``C`` = 1 or 3), ``H×W`` or ``X×Y×Z`` arrays on the same intensity scale.
        data_range: value range of the intensities (1 for images mapped to [0, 1]).
        spatial_dims: 2 or 3; by default a 3-axis array whose first axis is 1 or 3 long is taken as ``C×H×W``.
            Pass it for volumes that are only 1 or 3 voxels along their first axis.
    """
    try:
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError("MS-SSIM needs torchmetrics: pip install 'medlatent[metrics]'") from e
    a_t = torch.as_tensor(np.asarray(a), dtype=torch.float32)
    b_t = torch.as_tensor(np.asarray(b), dtype=torch.float32)
    if spatial_dims is None:
        spatial_dims = 2 if a_t.ndim == 3 and a_t.shape[0] in (1, 3) else a_t.ndim
    if spatial_dims == 2 and a_t.ndim == 3:  # C×H×W image
        a_t, b_t = a_t[None], b_t[None]
    elif a_t.ndim == spatial_dims:  # H×W image or X×Y×Z volume
        a_t, b_t = a_t[None, None], b_t[None, None]
    else:
        raise ValueError(f"ms_ssim takes C×H×W images or X×Y×Z volumes, got shape {tuple(a_t.shape)} "
                         f"with spatial_dims={spatial_dims}")
    smallest = min(a_t.shape[2:])
    k = 11 if smallest >= 11 else (smallest // 2) * 2 - 1
    scales = ms_ssim_scales(smallest, k)
    if scales < 2 or k < 3:
        return float("nan")
    b_used = tuple(x / sum(MS_SSIM_BETAS[:scales]) for x in MS_SSIM_BETAS[:scales])
    return float(msssim(a_t, b_t, data_range=data_range, kernel_size=k, betas=b_used, normalize="relu"))


def ms_ssim_scales(smallest: int, kernel_size: int = 11) -> int:
    """How many MS-SSIM scales (≤ 5) an image whose shortest side is ``smallest`` supports.

    Two conditions: the window must fit the coarsest scale (``smallest / 2**(n-1) > k - 1``), and torchmetrics'
    own size check must pass (``smallest >= 2**n`` and ``smallest // max(1, n-1)**2 > k - 1``). The second is
    stricter for four scales (sides 88–98 pass the first but torchmetrics rejects them), so both are checked.
    """
    best = 1
    for n in range(2, len(MS_SSIM_BETAS) + 1):
        fits_window = smallest // 2 ** (n - 1) > kernel_size - 1
        torchmetrics_ok = smallest >= 2**n and smallest // max(1, n - 1) ** 2 > kernel_size - 1
        if fits_window and torchmetrics_ok:
            best = n
    return best
