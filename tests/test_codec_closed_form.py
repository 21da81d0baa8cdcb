"""The codec initialisation fitted by alternating least squares (codec_init.fit_linear_path_als)."""

from __future__ import annotations

import torch

from conftest import tiny_config
from io_fixtures import sample_file
from medlatent import MedVAE
from medlatent.training.codec_init import LinearPath, _layer_design, fit_linear_path_als, init_as_codec


def ct_crops(size: int = 32) -> torch.Tensor:
    """Four ``size``² blocks of the CT test slice, min–max scaled to [-1, 1]: ``4×1×S×S``."""
    import pydicom

    a = torch.from_numpy(pydicom.dcmread(sample_file("CT_small.dcm")).pixel_array.astype("float32"))
    a = (a - a.min()) / (a.max() - a.min()) * 2 - 1
    blocks = [a[i:i + size, j:j + size] for i in (16, 64) for j in (16, 64)]
    return torch.stack(blocks)[:, None].contiguous()


def test_design_matrix_is_the_reconstruction_per_weight():
    """The reconstruction is linear in each kernel: design @ kernel reproduces it for every kernel."""
    x = ct_crops()[:2]
    path = fit_linear_path_als(x, 2, 1, maps=2, latent=1, max_sweeps=1)
    recon = path.decode(path.encode(x)).flatten()
    for k in path.parameters():
        a = _layer_design(path, k, x)
        assert a.shape == (recon.numel(), k.numel())
        assert torch.allclose(a @ k.flatten(), recon, atol=1e-4)


def test_error_never_increases():
    x = ct_crops()
    path = fit_linear_path_als(x, 2, 1, maps=2, latent=1, max_sweeps=8, tol=0.0)
    h = path.history
    assert len(h) == 9
    assert all(b <= a * (1 + 1e-6) for a, b in zip(h, h[1:])), h
    assert h[-1] < 0.5 * h[0]  # far better than its start, box averaging + bilinear


def test_reaches_the_optimum_when_it_is_known():
    """Without downsampling an exact codec exists (the identity): from a scrambled start the fit must find it,
    i.e. the joint steps converge rather than crawl."""
    x = ct_crops()
    start = LinearPath.interpolation(2, 0, maps=1, latent=1, noise=0.5, seed=3)
    path = fit_linear_path_als(x, 2, 0, maps=1, latent=1, max_sweeps=30, tol=1e-9, start=start)
    assert path.history[0] > 1e-2
    assert path.history[-1] < 1e-6 * path.history[0], path.history


def test_network_runs_the_fitted_codec():
    x = ct_crops()
    path = fit_linear_path_als(x, 2, 1, maps=2, latent=1, max_sweeps=3)
    torch.manual_seed(0)
    model = MedVAE(tiny_config(2, norm_groups=8, z_channels=1, embed_dim=1, stage2_head=False)).eval()
    init_as_codec(model, path)
    with torch.no_grad():
        assert (model.decode(model.encode(x).mean) - path.decode(path.encode(x))).abs().max() < 2e-4
