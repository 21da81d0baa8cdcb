"""medlatent export --to diffusers|monai|onnx: each target gives medlatent's posterior mean and decoding (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import image_for, randomise, run_cli, tiny_config
from io_fixtures import sample_file
from medlatent import MedVAE
from medlatent.checkpoints import CheckpointError
from medlatent.export import (
    ExportError,
    diffusers_config,
    load_monai,
    measure_scaling_factor,
    monai_arguments,
    to_diffusers,
    to_diffusers_state_dict,
    to_monai,
    to_monai_state_dict,
    to_onnx,
)
from medlatent.io.readers import read_image
from medlatent.pipeline import encode_image, prepare
from medlatent.registry import get_model_info, list_models

TOL = 1e-4


def _reference(model: MedVAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        z = model.encode(x).mean
        return z, model.decode(z)


def _max(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


@pytest.mark.parametrize("stage2", [False, True], ids=["plain", "stage2"])
def test_diffusers_folder_gives_medlatent_latents_and_loads_back(tmp_path, stage2):
    diffusers = pytest.importorskip("diffusers")
    model = randomise(MedVAE(tiny_config(2, stage2_head=stage2))).eval()
    x = image_for(model)
    z, rec = _reference(model, x)
    out = to_diffusers(model, tmp_path / "vae", scaling_factor=0.25)
    net = diffusers.AutoencoderKL.from_pretrained(out).eval()
    with torch.no_grad():
        assert _max(net.encode(x).latent_dist.mean, z) <= TOL
        assert _max(net.decode(z).sample, rec) <= TOL
    assert net.config.scaling_factor == 0.25 and net.config.norm_num_groups == model.config.norm_groups
    back = MedVAE.from_pretrained(out)
    assert back.config == model.config
    z_back, rec_back = _reference(back, x)
    assert _max(z_back, z) == 0 and _max(rec_back, rec) == 0
    if stage2:
        with torch.no_grad():
            assert _max(back.stage2_features(z), model.stage2_features(z)) == 0


def test_bundled_model_to_diffusers_through_the_cli(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = MedVAE.from_pretrained("medlatent_small_4_4_2d")
    res, out = run_cli("export", "medlatent_small_4_4_2d", "--to", "diffusers", "-o", tmp_path / "vae",
                       "--scaling-factor", "0.5")
    assert res.exit_code == 0, out
    # channels-last, as medlatent runs: the bundled encoder carries a ~1000-valued channel through its mid block,
    # which PyTorch's contiguous-format CPU convolution rounds to ~2e-3 in z (channels-last: ~4e-6 from float64)
    net = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval().to(memory_format=torch.channels_last)
    x = torch.from_numpy(prepare(model, read_image(sample_file("CT_small.dcm"))).x)[None]
    z, rec = _reference(model, x)
    with torch.no_grad():
        assert _max(net.encode(x).latent_dist.mean, z) <= TOL
        assert _max(net.decode(z).sample, rec) <= TOL
    meta = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert meta["scaling_factor"] == 0.5 and "--scaling-factor" in meta["_medlatent"]["scaling_factor"]["how"]
    assert MedVAE.from_pretrained(tmp_path / "vae").max_tile == model.max_tile


def test_scaling_factor_is_one_over_the_std_of_real_latents():
    model = MedVAE.from_pretrained("medlatent_small_4_4_2d")
    files = [sample_file("CT_small.dcm"), sample_file("MR_small.dcm")]
    got = measure_scaling_factor(model, files)
    zs = torch.cat([encode_image(model, read_image(f)).z.flatten() for f in files]).double()
    assert got.scaling_factor == pytest.approx(1 / float(zs.std()), rel=1e-5)
    assert got.images == ["CT_small.dcm", "MR_small.dcm"] and got.latent_values == zs.numel()


def test_diffusers_refuses_3d_and_leaves_no_folder(tmp_path, model_dirs):
    model = MedVAE.from_pretrained(model_dirs[3])
    with pytest.raises(ExportError, match="2D only"):
        to_diffusers(model, tmp_path / "vae", scaling_factor=1.0)
    res, out = run_cli("export", model_dirs[3], "--to", "diffusers", "-o", tmp_path / "cli")
    assert res.exit_code == 1 and "2D only" in out and "Traceback" not in out
    assert not (tmp_path / "vae").exists() and not (tmp_path / "cli").exists()


def test_cli_refuses_bad_target_scale_and_used_folder(tmp_path, model_dirs):
    res, out = run_cli("export", model_dirs[2], "--to", "tensorflow", "-o", tmp_path / "a")
    assert res.exit_code == 1 and "diffusers, monai, onnx" in out
    res, out = run_cli("export", model_dirs[2], "--to", "monai", "-o", tmp_path / "b", "--scaling-factor", "-1")
    assert res.exit_code == 1 and "positive" in out and not (tmp_path / "b").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    res, out = run_cli("export", model_dirs[2], "--to", "onnx", "-o", tmp_path / "used")
    assert res.exit_code == 1 and "not an empty folder" in out
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["keep.txt"]


def test_monai_autoencoderkl_gives_medlatent_latents(tmp_path, tiny_model):
    pytest.importorskip("monai")
    pytest.importorskip("einops")
    x = image_for(tiny_model)
    z, rec = _reference(tiny_model, x)
    net = load_monai(to_monai(tiny_model, tmp_path / "monai", scaling_factor=2.0))
    with torch.no_grad():
        mu, sigma = net.encode(x)
        assert _max(mu, z) <= TOL and _max(net.decode(z), rec) <= TOL
        assert float(sigma.max()) < 1e-6  # the variance is not expressible: sampling returns the mean
    meta = json.loads((tmp_path / "monai" / "monai_autoencoderkl.json").read_text())
    assert meta["scale_factor"] == 2.0 and meta["arguments"]["spatial_dims"] == tiny_model.spatial_dims
    # the SiLU MONAI lacks is real: the stock network (no hooks) gives other latents
    from monai.networks.nets import AutoencoderKL
    from safetensors.torch import load_file

    stock = AutoencoderKL(**meta["arguments"]).eval()
    stock.load_state_dict(load_file(str(tmp_path / "monai" / meta["weights"])))
    with torch.no_grad():
        assert _max(stock.encode(x)[0], z) > 1e-2


def test_onnx_graphs_match_torch_at_other_sizes(tmp_path, tiny_model):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = to_onnx(tiny_model, tmp_path / "onnx")
    enc = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    size = (12, 16, 6)[: tiny_model.spatial_dims]  # not the export's example size
    x = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z, rec = _reference(tiny_model, x)
    z_onnx, stage2 = enc.run(["z", "stage2"], {"image": x.numpy()})
    assert _max(z_onnx, z) <= TOL
    with torch.no_grad():
        assert _max(stage2, tiny_model.stage2_features(z)) <= TOL
    assert _max(dec.run(["image"], {"z": z.numpy()})[0], rec) <= TOL


@pytest.mark.parametrize("name", list_models())
def test_every_member_maps_onto_diffusers_and_monai_key_for_key(name):
    """Architecture only (meta tensors, no weights): every parameter lands on one of the same shape."""
    info = get_model_info(name)
    with torch.device("meta"):
        model = MedVAE(info.config)
    if info.spatial_dims == 2:
        diffusers = pytest.importorskip("diffusers")
        with torch.device("meta"):
            net = diffusers.AutoencoderKL(**diffusers_config(model, 1.0))
        theirs = {k: v.shape for k, v in net.state_dict().items()}
        mapped = to_diffusers_state_dict(dict(model.state_dict()), theirs, len(info.config.ch_mult))
        assert {k: v.shape for k, v in mapped.items()} == theirs
    else:
        with pytest.raises(ExportError, match="2D only"):
            diffusers_config(model, 1.0)
    pytest.importorskip("einops")
    nets = pytest.importorskip("monai.networks.nets")
    with torch.device("meta"):
        net = nets.AutoencoderKL(**monai_arguments(model))
        mapped, silu_after = to_monai_state_dict(model)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert all(isinstance(net.get_submodule(n), torch.nn.GroupNorm) for n in silu_after)


def test_a_diffusers_folder_medlatent_cannot_express_is_refused_by_name(tmp_path):
    pytest.importorskip("diffusers")
    out = to_diffusers(randomise(MedVAE(tiny_config(2))).eval(), tmp_path / "vae", scaling_factor=1.0)
    meta = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**meta, "act_fn": "gelu"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*act_fn='gelu'"):
        MedVAE.from_pretrained(out)


@pytest.mark.parametrize("dims", [2, 3])
def test_a_model_without_mid_attention_exports_and_loads_back(tmp_path, dims):
    """The attention-free default models: diffusers (2D) and MONAI drop the attention block, medlatent reads the
    diffusers folder back as attention-free, and every export still gives medlatent's z and decoding."""
    pytest.importorskip("monai")
    pytest.importorskip("einops")
    model = randomise(MedVAE(tiny_config(dims, mid_attention=False))).eval()
    assert not any("attn" in k for k in model.state_dict())
    x = image_for(model)
    z, rec = _reference(model, x)
    net = load_monai(to_monai(model, tmp_path / "monai", scaling_factor=1.0))
    with torch.no_grad():
        mu, _ = net.encode(x)
        assert _max(mu, z) <= TOL and _max(net.decode(z), rec) <= TOL
    if dims == 2:
        diffusers = pytest.importorskip("diffusers")
        out = to_diffusers(model, tmp_path / "vae", scaling_factor=1.0)
        vae = diffusers.AutoencoderKL.from_pretrained(out).eval()
        with torch.no_grad():
            assert _max(vae.encode(x).latent_dist.mean, z) <= TOL and _max(vae.decode(z).sample, rec) <= TOL
        back = MedVAE.from_pretrained(out)
        assert back.config.mid_attention is False and back.config == model.config
