import torch
from typer.testing import CliRunner

from conftest import randomise, tiny_config
from medlatent import MedVAE
from medlatent.cli import app

runner = CliRunner()


def test_models_lists_the_family():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0, res.output
    assert "medvae_8_1_3d" in res.output and "512" in res.output


def test_convert_then_profile(tmp_path):
    model = randomise(MedVAE(tiny_config()))
    ckpt = tmp_path / "official.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    res = runner.invoke(app, ["convert", str(ckpt), "-o", str(tmp_path / "conv")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "conv" / "model.safetensors").is_file()
    res = runner.invoke(app, ["profile", str(tmp_path / "conv"), "--size", "16x8"])
    assert res.exit_code == 0, res.output
    assert "(1, 2, 8, 4)" in res.output


def test_errors_exit_nonzero_with_a_message(tmp_path):
    res = runner.invoke(app, ["profile", "medvae_4_1_2D"])
    assert res.exit_code == 1 and "medvae_4_1_2d" in res.output
    bad = tmp_path / "bad.ckpt"
    bad.write_text("garbage")
    res = runner.invoke(app, ["convert", str(bad), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "bad.ckpt" in res.output and not (tmp_path / "out").exists()
    res = runner.invoke(app, ["profile", "medvae_4_1_2d", "--random-weights", "--size", "30x30"])
    assert res.exit_code == 1 and "multiples of 4" in res.output
    res = runner.invoke(app, ["profile", "medvae_4_1_3d", "--random-weights", "--size", "64x64"])
    assert res.exit_code == 1 and "3 numbers" in res.output
