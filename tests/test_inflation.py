"""A 2D model inflated to 3D (paper §3, 3D stage 2) encodes a slice-constant volume as the 2D model the slice.

``test_checkpoints.py`` checks the inflated kernels and one inflated conv; this checks the whole model.
Why the equality holds exactly for a volume made of one slice repeated along the inflated axis:
  * a kernel with only its centre tap along that axis never mixes slices, and the zero padding there is
    never read (``padding=1`` convs read it only through the zero taps);
  * GroupNorm statistics over a volume constant along the axis equal those of one slice;
  * attention over tokens each repeated D times gives every key D times the weight of one copy, 1/D after
    the softmax, so the output is unchanged;
  * ``Downsample`` pads one zero plane on the high side and takes a stride-2 kernel of size 3: output plane
    ``j`` reads input plane ``2j+1`` with its centre tap, always a real plane (never the padding), so the
    output is constant along the axis with D/2 planes; ``Upsample`` repeats planes, keeping it constant.
The latent is therefore the 2D latent repeated D/s times along the axis, and decoding it gives the 2D
decode repeated D times.
"""

import pytest
import torch

from conftest import randomise, tiny_config
from medlatent import MedVAE
from medlatent.checkpoints import inflate_2d_to_3d


@pytest.fixture(scope="module")
def model_2d():
    # three levels: two Downsample/Upsample steps along the inflated axis (8 → 4 → 2 planes)
    return randomise(MedVAE(tiny_config(2, ch_mult=(1, 2, 2))), seed=3).eval()


@pytest.mark.parametrize("axis", [-1, 0])
def test_inflated_model_encodes_a_repeated_slice_as_the_2d_model(model_2d, axis):
    model_3d = MedVAE(tiny_config(3, ch_mult=(1, 2, 2))).eval()
    model_3d.load_state_dict(inflate_2d_to_3d(model_2d.state_dict(), axis=axis), strict=True)
    depth, s = 8, model_2d.downsample_per_axis
    pos = 2 + axis % 3  # position of the inflated axis in B×C×X×Y×Z

    image = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    volume = image.unsqueeze(pos).expand(*image.shape[:pos], depth, *image.shape[pos:]).contiguous()

    def repeat(t, n):  # B×C×H×W → the 3D tensor with n copies along the inflated axis
        return t.unsqueeze(pos).expand(*t.shape[:pos], n, *t.shape[pos:])

    with torch.no_grad():
        post2, post3 = model_2d.encode(image), model_3d.encode(volume)
        assert post3.mean.shape[pos] == depth // s
        torch.testing.assert_close(post3.mean, repeat(post2.mean, depth // s), rtol=0, atol=1e-4)
        torch.testing.assert_close(post3.logvar, repeat(post2.logvar, depth // s), rtol=0, atol=1e-4)
        torch.testing.assert_close(model_3d.decode(post3.mean), repeat(model_2d.decode(post2.mean), depth),
                                   rtol=0, atol=1e-4)
        # the stage-2 head's 3×3 conv ("same" padding) is centred too
        torch.testing.assert_close(model_3d.stage2_features(post3.mean),
                                   repeat(model_2d.stage2_features(post2.mean), depth // s), rtol=0, atol=1e-4)


def test_linear_resample_inflation_interpolates_the_new_axis():
    """``resample_taps=LINEAR_RESAMPLE_TAPS``: the inflated Upsample is the 2D Upsample of each slice followed by
    linear interpolation along the new axis (¼/¾ of the two nearest slices), and the inflated Downsample is the
    2D Downsample of the mean of each pair of slices; both with and without autograd (two code paths)."""
    from medlatent.checkpoints import LINEAR_RESAMPLE_TAPS
    from medlatent.model.layers import Downsample, Upsample

    g = torch.Generator().manual_seed(5)
    for cls in (Upsample, Downsample):
        m2, m3 = cls(2, 4), cls(3, 4)
        with torch.no_grad():
            m2.conv.weight.copy_(torch.randn(m2.conv.weight.shape, generator=g))
            m2.conv.bias.copy_(torch.randn(4, generator=g))
        inflated = inflate_2d_to_3d({f"x.{cls.__name__.lower()}.{k}": v for k, v in m2.state_dict().items()},
                                    resample_taps=LINEAR_RESAMPLE_TAPS)
        m3.load_state_dict({k.split(".", 2)[2]: v for k, v in inflated.items()})
        x = torch.randn(1, 4, 6, 6, 6, generator=g)
        slices = [x[..., k] for k in range(6)]
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                y3 = m3(x).detach()
                if cls is Upsample:
                    up = [m2(s).detach() for s in slices]
                    for j in range(1, 5):  # interior output planes 2j (phase 0) and 2j+1 (phase 1)
                        torch.testing.assert_close(y3[..., 2 * j], 0.25 * up[j - 1] + 0.75 * up[j], atol=1e-4, rtol=0)
                        torch.testing.assert_close(y3[..., 2 * j + 1], 0.75 * up[j] + 0.25 * up[j + 1], atol=1e-4,
                                                   rtol=0)
                else:
                    for j in range(3):  # output plane j: the mean of input planes 2j, 2j+1
                        mix = 0.5 * slices[2 * j] + 0.5 * slices[2 * j + 1]
                        torch.testing.assert_close(y3[..., j], m2(mix).detach(), atol=1e-4, rtol=0)


def test_an_unknown_inflation_resampling_is_refused_with_the_config():
    from medlatent.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.inflate_resample must be one of centre, linear, got 'cubic'"):
        load_config("medlatent_small_4_1_3d-stage2_3d", ["data.train=x", "model.inflate_resample=cubic"])
