"""`data.mode: multiscale`: square crops from native resolution up to the whole short side, shrunk, never enlarged."""

from __future__ import annotations

import torch

from io_fixtures import sample_file
from medlatent.io.readers import read_image
from medlatent.preprocessing import preprocess
from medlatent.training.data import ImageDataset


def test_scales_range_from_native_crops_to_the_shrunk_whole_short_side():
    ct = sample_file("CT_small.dcm")  # 128×128
    ds = ImageDataset([(ct, "auto")], size=32, mode="multiscale", flips=False)
    full = torch.from_numpy(preprocess(read_image(ct), spatial_dims=2, in_channels=1, downsample=1)[0])[0]
    windows = full.unfold(0, 32, 1).unfold(1, 32, 1).reshape(-1, 32, 32)
    whole = torch.nn.functional.interpolate(full[None, None], size=(32, 32), mode="bilinear", antialias=True)[0, 0]
    native = shrunk_whole = 0
    for seed in range(200):
        x = ds[(0, seed)]["image"]
        assert x.shape == (1, 32, 32) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
        native += bool((windows - x[0]).abs().amax((1, 2)).min() < 1e-6)
        shrunk_whole += bool(torch.allclose(x[0], whole.clamp(-1, 1), atol=1e-5))
    # log-uniform side in [32, 128]: a native crop (side rounds to 32) and the whole image (128) both occur
    assert native > 0 and shrunk_whole > 0
    assert native + shrunk_whole < 200  # and the scales between


def test_an_image_smaller_than_the_crop_is_padded_not_enlarged():
    mr = sample_file("MR_small.dcm")  # 64×64
    x = ImageDataset([(mr, "auto")], size=96, mode="multiscale", flips=False)[(0, 1)]["image"]
    full = preprocess(read_image(mr), spatial_dims=2, in_channels=1, downsample=1)[0]
    assert torch.allclose(x[0, 16:80, 16:80], torch.from_numpy(full[0]))
    assert float(x[0, :16].max()) == -1.0
