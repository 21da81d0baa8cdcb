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
    """Multi-scale SSIM (Wang et al., 2003) of two ``C×H×W`` images or ``X×Y×Z`` volumes.

    Computed here in plain torch, so the core commands need no optional package. It follows torchmetrics'
    ``multiscale_structural_similarity_index_measure`` (Gaussian window 11, σ 1.5, reflect padding,
    ``normalize="relu"``), to which it is tested equal. Uses as many of the standard five scales as the image
    size allows and renormalises their weights; returns NaN for images too small for even two scales.

    Args:
        a, b: ``C×H×W`` (``C`` = 1 or 3), ``H×W`` or ``X×Y×Z`` arrays on the same intensity scale.
        data_range: value range of the intensities (1 for images mapped to [0, 1]).
        spatial_dims: 2 or 3; by default a 3-axis array whose first axis is 1 or 3 long is taken as ``C×H×W``.
            Pass it for volumes that are only 1 or 3 voxels along their first axis.
    """
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
    if a_t.shape != b_t.shape:
        raise ValueError(f"ms_ssim needs images of one shape, got {tuple(a_t.shape[1:])} and {tuple(b_t.shape[1:])}")
    scales = ms_ssim_scales(min(a_t.shape[2:]))
    if scales < 2:
        return float("nan")
    betas = torch.tensor(MS_SSIM_BETAS[:scales], dtype=torch.float64)
    betas = betas / betas.sum()
    window = _gaussian_window(a_t.shape[1], spatial_dims)
    pool = torch.nn.functional.avg_pool2d if spatial_dims == 2 else torch.nn.functional.avg_pool3d
    terms = []
    with torch.no_grad():
        for scale in range(scales):
            sim, cs = _ssim_and_contrast(a_t, b_t, window, data_range)
            terms.append(sim if scale == scales - 1 else cs)
            if scale < scales - 1:
                a_t, b_t = pool(a_t, 2), pool(b_t, 2)
    values = torch.stack(terms).double().clamp_min(0.0)  # normalize="relu"
    return float(torch.prod(values**betas))


#: The SSIM window: a Gaussian of σ = 1.5 over 11 samples per axis.
_WINDOW_SIGMA, _WINDOW_SIZE = 1.5, 11


def _gaussian_window(channels: int, spatial_dims: int) -> torch.Tensor:
    """Separable Gaussian window as a grouped-convolution kernel ``channels×1×11×11[×11]``, summing to 1."""
    x = torch.arange(_WINDOW_SIZE, dtype=torch.float32) - (_WINDOW_SIZE - 1) / 2
    g = torch.exp(-((x / _WINDOW_SIGMA) ** 2) / 2)
    g = g / g.sum()
    kernel = g[:, None] * g[None, :]
    if spatial_dims == 3:
        kernel = kernel[..., None] * g
    return kernel.expand(channels, 1, *kernel.shape).contiguous()


def _ssim_and_contrast(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor, data_range: float):
    """Mean SSIM and mean contrast-structure term of two ``1×C×…`` tensors at one scale.

    Both images are reflect-padded by half the window, so the filtered maps keep the image size. As in
    torchmetrics, SSIM averages the whole map and the contrast term drops the padded border.
    """
    pad = (_WINDOW_SIZE - 1) // 2
    spatial = a.ndim - 2
    conv = torch.nn.functional.conv2d if spatial == 2 else torch.nn.functional.conv3d
    padded = torch.nn.functional.pad(torch.cat([a, b, a * a, b * b, a * b]), (pad,) * (2 * spatial), mode="reflect")
    mu_a, mu_b, e_aa, e_bb, e_ab = conv(padded, window, groups=a.shape[1]).split(1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    var_a = (e_aa - mu_a**2).clamp_min(0.0)
    var_b = (e_bb - mu_b**2).clamp_min(0.0)
    upper, lower = 2 * (e_ab - mu_a * mu_b) + c2, var_a + var_b + c2
    ssim_map = (2 * mu_a * mu_b + c1) * upper / ((mu_a**2 + mu_b**2 + c1) * lower)
    core = (Ellipsis, *(slice(pad, -pad),) * spatial)
    return ssim_map.mean(), (upper / lower)[core].mean()


def ms_ssim_window(smallest: int) -> int:
    """The Gaussian window for images whose shortest side is ``smallest`` (≥ 3): the standard 11, or for sides below
    11 the largest odd window that fits. Only the training loss shrinks it (it must give every crop a value); the
    metric :func:`ms_ssim` keeps 11, as torchmetrics does, and is NaN for images too small for two scales."""
    if smallest < 3:
        raise ValueError(f"MS-SSIM needs images of at least 3×3 pixels, got a side of {smallest}")
    return _WINDOW_SIZE if smallest >= _WINDOW_SIZE else (smallest - 1) // 2 * 2 + 1


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
