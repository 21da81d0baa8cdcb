"""Checkpoint reading, conversions (LoRA merge, 2D→3D inflation), our format, and from_pretrained."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import image_for, randomise, tiny_config
from medlatent import MedVAE, registry
from medlatent.checkpoints import (
    CheckpointError,
    infer_config,
    inflate_2d_to_3d,
    load_checkpoint,
    merge_lora,
    read_state_dict,
)
from medlatent.hub import ConfigMismatchError, WeightsNotFoundError, check_official_yaml
from medlatent.model.lora import LoRAConv, inject_lora, merge_lora_modules


def _outputs(model, x):
    with torch.no_grad():
        post = model.encode(x)
        return post.mean, model.stage2_features(post.mean), model.decode(post.mean)


def _assert_outputs_close(a, b, atol=1e-5):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("dims", [2, 3])
def test_lora_merge_keeps_outputs(dims):
    cfg = tiny_config(dims, in_channels=3, out_channels=3)
    model = randomise(MedVAE(cfg))
    trainable = inject_lora(model, rank=4)
    assert trainable and all(p.requires_grad for p in trainable)
    assert not model.encoder.conv_in.weight.requires_grad  # base frozen
    with torch.no_grad():  # give the adapters a real update (lora_up starts at zero)
        for p in trainable:
            p.normal_(0, 0.05)
    model.eval()
    x = image_for(model)
    with_adapters = _outputs(model, x)

    sd = model.state_dict()  # official layout: <conv>.conv.*, <conv>.lora_down/up.weight
    assert "encoder.down.0.block.0.conv1.lora_down.weight" in sd
    assert "encoder.mid.attn_1.q.conv.weight" in sd and "encoder.mid.attn_1.q.lora_up.weight" in sd
    assert not any(".downsample.conv.lora" in k or "conv_in.lora" in k for k in sd)
    merged = MedVAE(cfg).eval()
    merged.load_state_dict(merge_lora(sd), strict=True)
    _assert_outputs_close(_outputs(merged, x), with_adapters, atol=1e-4)

    merge_lora_modules(model)  # module-level merge agrees with the state-dict merge
    assert not any(isinstance(m, LoRAConv) for m in model.modules())
    _assert_outputs_close(_outputs(model, x), with_adapters, atol=1e-4)


def test_lora_merge_rejects_broken_adapters():
    sd = {"a.conv.weight": torch.zeros(8, 4, 3, 3), "a.lora_down.weight": torch.zeros(2, 4, 3, 3)}
    with pytest.raises(CheckpointError, match="no lora_up"):
        merge_lora(sd)
    sd["a.lora_up.weight"] = torch.zeros(8, 3, 1, 1)
    with pytest.raises(CheckpointError, match="do not chain"):
        merge_lora(sd)


# ------------------------------------------------------------------------------------------- inflation
def test_inflation_centres_2d_kernels_and_loads_into_3d():
    m2 = randomise(MedVAE(tiny_config(2)))
    sd3 = inflate_2d_to_3d(m2.state_dict())
    m3 = MedVAE(tiny_config(3))
    m3.load_state_dict(sd3, strict=True)
    w2, w3 = m2.encoder.conv_in.weight, m3.encoder.conv_in.weight
    assert w3.shape == (*w2.shape, 3)
    assert torch.equal(w3[..., 1], w2) and not w3[..., 0].any() and not w3[..., 2].any()
    assert m3.quant_conv.weight.shape == (*m2.quant_conv.weight.shape, 1)
    assert torch.equal(m3.encoder.norm_out.weight, m2.encoder.norm_out.weight)
    assert torch.equal(m3.encoder.conv_in.bias, m2.encoder.conv_in.bias)
    # an inflated conv acts slice by slice along the last (slice) axis
    vol = torch.randn(1, 1, 6, 5, 4)
    out3 = F.conv3d(vol, w3, m3.encoder.conv_in.bias, padding=1)
    for s in range(vol.shape[-1]):
        ref = F.conv2d(vol[..., s], w2, m2.encoder.conv_in.bias, padding=1)
        torch.testing.assert_close(out3[..., s], ref, rtol=1e-5, atol=1e-5)


def test_inflation_axis_is_selectable():
    w = torch.randn(4, 2, 3, 3)
    out = inflate_2d_to_3d({"c.weight": w}, axis=0)["c.weight"]
    assert out.shape == (4, 2, 3, 3, 3) and torch.equal(out[:, :, 1], w) and not out[:, :, 0].any()
    with pytest.raises(ValueError, match="axis"):
        inflate_2d_to_3d({}, axis=5)


# ------------------------------------------------------------------------------------------- files
def test_save_pretrained_round_trip(tmp_path, tiny_model):
    tiny_model.weights_info = {"model": "tiny"}
    tiny_model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors"}
    loaded = MedVAE.from_pretrained(tmp_path / "m")
    assert loaded.config == tiny_model.config and not loaded.training
    assert len(loaded.weights_info["sha256"]) == 64
    x = image_for(tiny_model)
    for a, b in zip(_outputs(loaded, x), _outputs(tiny_model, x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wrapped", [True, False])
def test_official_checkpoint_formats(tmp_path, wrapped):
    model = randomise(MedVAE(tiny_config()))
    sd = model.state_dict()
    sd_with_loss = {**sd, "loss.discriminator.main.0.weight": torch.zeros(2)}  # LDM training leftovers
    path = tmp_path / "official.ckpt"
    torch.save({"state_dict": sd_with_loss, "global_step": 7} if wrapped else sd, path)
    loaded = load_checkpoint(path)  # architecture inferred from shapes
    assert loaded.config == model.config
    x = image_for(model)
    _assert_outputs_close(_outputs(loaded, x), _outputs(model.eval(), x), atol=0)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*weights_only"):
        read_state_dict(path)
    assert "code ran" not in capsys.readouterr().out


def test_unreadable_and_mismatched_checkpoints_name_the_file(tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.ckpt"):
        read_state_dict(bad)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_state_dict(tmp_path / "missing.ckpt")
    small = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": MedVAE(tiny_config()).state_dict()}, small)
    with pytest.raises(CheckpointError, match=r"tiny\.ckpt does not fit.*medlatent models"):
        MedVAE.from_pretrained("medvae_4_1_2d", checkpoint=small)


def test_infer_config_from_official_shapes():
    with torch.device("meta"):
        for name in ("medvae_8_4_2d", "medvae_4_1_3d"):
            sd = MedVAE.from_config(name).state_dict()
            assert infer_config(sd) == registry.get_model_info(name).config
    with pytest.raises(CheckpointError, match="cannot infer"):
        infer_config({"foo": torch.zeros(1)})


# ------------------------------------------------------------------------------------------- hub
@pytest.fixture
def tiny_hub_entry(monkeypatch):
    info = registry.ModelInfo(name="tiny_test_2d", config=tiny_config(), hub_config="model_weights/tiny.yaml",
                              hub_checkpoint="model_weights/tiny.ckpt", repo_id="someone/tiny-medvae")
    monkeypatch.setitem(registry._REGISTRY, info.name, info)
    return info


def _official_yaml(info, nested=False, **override):
    c = info.config
    dd = dict(double_z=True, z_channels=c.z_channels, resolution=256, in_channels=c.in_channels,
              out_ch=c.out_channels, ch=c.ch, ch_mult=list(c.ch_mult), num_res_blocks=c.num_res_blocks,
              attn_resolutions=[], dropout=0.0)
    dd.update(override)
    doc = {"embed_dim": c.embed_dim, "ddconfig": dd}
    return yaml.safe_dump({"model": {"params": doc}} if nested else doc)


def _fake_hf_cache(root: Path, info, files: dict[str, bytes]) -> None:
    repo = root / f"models--{info.repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        p = repo / "snapshots" / commit / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_from_pretrained_uses_the_hub_cache_and_checks_the_yaml(tmp_path, tiny_hub_entry):
    model = randomise(MedVAE(tiny_hub_entry.config))
    ckpt = tmp_path / "w.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    good = tmp_path / "good"
    _fake_hf_cache(good, tiny_hub_entry, {tiny_hub_entry.hub_checkpoint: ckpt.read_bytes(),
                                          tiny_hub_entry.hub_config: _official_yaml(tiny_hub_entry, True).encode()})
    loaded = MedVAE.from_pretrained("tiny_test_2d", cache_dir=good, local_files_only=True)
    assert loaded.weights_info["model"] == "tiny_test_2d"
    x = image_for(model)
    _assert_outputs_close(_outputs(loaded, x), _outputs(model.eval(), x), atol=0)

    wrong = tmp_path / "wrong"
    _fake_hf_cache(wrong, tiny_hub_entry, {tiny_hub_entry.hub_checkpoint: ckpt.read_bytes(),
                                           tiny_hub_entry.hub_config: _official_yaml(tiny_hub_entry, ch=64).encode()})
    with pytest.raises(ConfigMismatchError, match=r"ddconfig\.ch: file has 64, registry expects 32"):
        MedVAE.from_pretrained("tiny_test_2d", cache_dir=wrong, local_files_only=True)


def test_offline_without_weights_says_how_to_provide_them(tmp_path, monkeypatch, tiny_hub_entry):
    with pytest.raises(WeightsNotFoundError) as err:
        MedVAE.from_pretrained("tiny_test_2d", cache_dir=tmp_path, local_files_only=True)
    msg = str(err.value)
    assert "model_weights/tiny.ckpt" in msg and "offline" in msg and "--checkpoint" in msg


def test_official_yaml_check_both_layouts(tmp_path):
    info = registry.get_model_info("medvae_8_4_2d")
    for nested in (False, True):
        p = tmp_path / f"cfg{nested}.yaml"
        p.write_text(_official_yaml(info, nested))
        check_official_yaml(info, p)
    p.write_text(_official_yaml(info, attn_resolutions=[32]))
    with pytest.raises(ConfigMismatchError, match="attn_resolutions"):
        check_official_yaml(info, p)
    p.write_text("just: text")
    with pytest.raises(ConfigMismatchError, match="no 'ddconfig'"):
        check_official_yaml(info, p)


def test_from_config_and_from_pretrained_tile_alike(tmp_path, monkeypatch):
    """The inference default max_tile comes from the registry entry, and from config.json for a model folder:
    every member tiles the same whichever way it was built."""
    from medlatent.engine.tiled import TiledAutoencoder, TileSettings

    for name in registry.list_models():
        info = registry.get_model_info(name)
        assert MedVAE.from_config(name).max_tile == info.max_tile
        if info.bundled:  # its folder's config.json holds the registry's value
            assert MedVAE.from_pretrained(name).max_tile == info.max_tile
    crops = registry.ModelInfo(name="tiny_crops_2d", config=tiny_config(), hub_config="", hub_checkpoint="",
                               max_tile=16)
    monkeypatch.setitem(registry._REGISTRY, crops.name, crops)
    model = randomise(MedVAE(crops.config))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.ckpt")
    built, loaded = MedVAE.from_config(crops.name), MedVAE.from_pretrained(crops.name, tmp_path / "w.ckpt")
    settings = TileSettings(max_memory_gb=1.0)
    assert TiledAutoencoder(built, settings).tile_and_overlap("encode")[0] == 16
    assert TiledAutoencoder(loaded, settings).tile_and_overlap("encode") == \
        TiledAutoencoder(built, settings).tile_and_overlap("encode")
    loaded.save_pretrained(tmp_path / "folder")
    assert MedVAE.from_pretrained(tmp_path / "folder").max_tile == 16
