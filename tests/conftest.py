from __future__ import annotations

import pytest
import torch

from medlatent import MedVAE, MedVAEConfig


def tiny_config(spatial_dims: int = 2, **kw) -> MedVAEConfig:
    """A 2-level model (÷2 per axis) small enough for fast CPU tests; same code paths as the family."""
    base = dict(spatial_dims=spatial_dims, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, embed_dim=2)
    base.update(kw)
    return MedVAEConfig(**base)


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (norms and biases too), so no path is an identity by accident."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def tiny_model(request) -> MedVAE:
    return randomise(MedVAE(tiny_config(request.param))).eval()


def image_for(model: MedVAE, batch: int = 2, size: int = 8, channels: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels or model.config.in_channels) + (size,) * model.spatial_dims
    return torch.rand(shape, generator=g) * 2 - 1


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict:
    """Tiny random-weight models saved as folders for ``--model DIR``: 2 and 3 (2D/3D), "other" (2D, C=3)."""
    root = tmp_path_factory.mktemp("models")
    out: dict = {}
    for dims in (2, 3):
        randomise(MedVAE(tiny_config(dims)), seed=dims).save_pretrained(root / f"tiny{dims}d", name=f"tiny_{dims}d")
        out[dims] = root / f"tiny{dims}d"
    randomise(MedVAE(tiny_config(2, embed_dim=3, z_channels=3))).save_pretrained(root / "other2d", name="other_2d")
    out["other"] = root / "other2d"
    return out


def run_cli(*args):
    """``medlatent ARGS`` in-process; returns the result and its combined output."""
    from typer.testing import CliRunner

    from medlatent.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    return res, res.output
