"""The training journey as a new user takes it: presets and their descriptions, `medlatent finetune`, the config
reference, the automatic validation split, logs and trackers, Ctrl-C and resume, the model's own name, and the
official .ckpt export. Trainings are a few steps on 32-px crops; tests decide on files, steps and names."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("accelerate")

from io_fixtures import training_images  # noqa: E402
from medlatent import MedVAE  # noqa: E402
from medlatent.training.config import ConfigError, load_config, preset_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 1, "embed_dim": 1}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medlatent.cli", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Three real images: a CT slice, an MR slice (DICOM) and a T1 volume (slices drawn in a 2D run)."""
    return training_images(tmp_path / "images")


def tiny_cfg(run: Path, source: Path, **sections):
    raw = {
        "model": {"name": "medvae_4_1_2d", "arch": dict(TINY), "init": "random"},
        "data": {"train": str(source), "size": 32, "num_workers": 0},
        "loss": {"perceptual": "none", "disc_start": 10**9},
        "optim": {"base_lr": 1e-3, "scale_lr": False},
        "train": {"output_dir": str(run), "max_steps": 4, "batch_size": 2, "log_every": 2, "val_every": 1000,
                  "ckpt_every": 1000, "val_max_images": 2, "previews": 1},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = run.parent / f"{run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path))


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------ presets, finetune
def test_every_preset_is_listed_with_a_description():
    from typer.testing import CliRunner

    from medlatent.cli import app

    out = CliRunner().invoke(app, ["train", "--presets"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    for name in preset_names():
        i = lines.index(name)
        assert len(lines[i + 1].strip()) > 20, name  # the description line under the name


def test_pretrained_init_without_a_name_says_what_to_give():
    with pytest.raises(ConfigError, match="model.init=pretrained needs model.name"):
        load_config("medlatent_small_4_4_2d-stage1", ["data.train=x", "model.name=null", "model.init=pretrained"])
    # the bundled model's preset names its member, so starting from the bundled weights works
    cfg = load_config("medlatent_small_4_4_2d-stage1", ["data.train=x", "model.init=pretrained"])
    assert cfg.model.name == "medlatent_small_4_4_2d"


def test_finetune_show_resolves_the_bundled_model_and_a_run_folder(tmp_path: Path, images: Path):
    from typer.testing import CliRunner

    from medlatent.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["finetune", "medlatent_small_4_4_2d", str(images), "-o", str(tmp_path / "run"),
                              "--steps", "300", "--name", "ct_v1", "--show", "data.size=64"])
    assert out.exit_code == 0, out.output
    cfg = yaml.safe_load(out.output)
    assert cfg["model"] == {**cfg["model"], "name": "medlatent_small_4_4_2d", "init": "pretrained",
                            "export_name": "ct_v1"}
    assert cfg["train"]["max_steps"] == 300 and cfg["data"]["size"] == 64 and cfg["data"]["val"] == "auto"
    assert cfg["optim"]["warmup_steps"] == 30 and cfg["train"]["keep_checkpoints"] == 2
    # a model folder (e.g. a previous run's final/) starts the next fine-tune; its architecture picks the recipe
    folder = MedVAE.from_pretrained("medlatent_small_4_4_2d").save_pretrained(tmp_path / "prev" / "final")
    out = runner.invoke(app, ["finetune", str(folder), str(images), "-o", str(tmp_path / "run2"), "--show"])
    assert out.exit_code == 0, out.output
    cfg = yaml.safe_load(out.output)
    assert cfg["model"]["init"] == str(folder) and cfg["model"]["name"] == "medlatent_small_4_4_2d"
    out = runner.invoke(app, ["finetune", "medvae_4_1_2dd", str(images), "-o", str(tmp_path / "r3")])
    assert out.exit_code == 1 and "medvae_4_1_2d" in out.output and "Traceback" not in out.output
    out = runner.invoke(app, ["finetune", str(tmp_path), str(images), "-o", str(tmp_path / "r4")])
    assert out.exit_code == 1 and "not a medlatent model folder" in out.output


def test_finetune_of_an_official_member_offline_names_options_that_exist(tmp_path: Path, images: Path):
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = cli("finetune", "medvae_4_1_2d", str(images), "-o", str(tmp_path / "run"), "--steps", "1",
              "loss.perceptual=ms_ssim", env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "model.init=PATH" in res.stderr and "medlatent finetune PATH DATA" in res.stderr
    assert "--checkpoint" not in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()  # no run folder for a run that could not start


# ------------------------------------------------------------------------------------------ reference
def test_config_reference_doc_is_up_to_date_and_every_key_has_help():
    import dataclasses

    from medlatent.training.config import TrainConfig
    from medlatent.training.options import help_of
    from medlatent.training.reference import config_reference

    for section in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(type(section.default_factory())):
            assert help_of(f), f"{section.name}.{f.name} has no help text"
    doc = (ROOT / "docs" / "training-config.md").read_text()
    assert doc.rstrip("\n") == config_reference().rstrip("\n"), (
        "docs/training-config.md is out of date: medlatent train --reference > docs/training-config.md")


# ------------------------------------------------------------------------------------------ validation split
def test_validation_split_is_held_out_by_file_seeded_and_switchable(tmp_path: Path, images: Path):
    from medlatent.training.data import DataConfig, build_datasets

    train, val = build_datasets(DataConfig(train=str(images), size=32), downsample=4, seed=0)
    assert len(train) == 2 and len(val) == 1
    assert {e.path for e in train.entries}.isdisjoint({e.path for e in val.entries})
    again = build_datasets(DataConfig(train=str(images), size=32), downsample=4, seed=0)[1]
    assert [e.path for e in again.entries] == [e.path for e in val.entries]
    assert "held out 1 of 3" in val.selection
    for off in ("none", None):
        assert build_datasets(DataConfig(train=str(images), size=32, val=off), downsample=4)[1] is None
    assert build_datasets(DataConfig(train=str(images), size=32, val_fraction=0.0), downsample=4)[1] is None
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(train=str(images), val_fraction=1.5)


def test_validation_measures_whole_images_like_evaluate_recon(tmp_path: Path, images: Path):
    """val_psnr is the evaluate-recon protocol: whole image, z rounded through float16, original grid, [0, 1]."""
    from medlatent.evaluation.baselines import model_method
    from medlatent.io.readers import read_image
    from medlatent.preprocessing import preprocess, restore
    from medlatent.report import roundtrip_metrics
    from medlatent.training.trainer import Trainer

    cfg = tiny_cfg(tmp_path / "run", images, data={"val": str(images / "ct.dcm")}, train={"max_steps": 2})
    trainer = Trainer(cfg)
    metrics = trainer.fit()
    img = read_image(images / "ct.dcm")
    model = trainer.model.eval()
    x, rec = preprocess(img, spatial_dims=2, in_channels=1, downsample=model.downsample_per_axis)
    y = model_method(model, latent_dtype="float16")(torch.from_numpy(x)[None])
    expect = roundtrip_metrics(img.array, restore(y[0].numpy(), rec, "float32"), rec)
    assert metrics["val_psnr"] == pytest.approx(expect["psnr"], abs=1e-3)
    assert metrics["val_ms_ssim"] == pytest.approx(expect["ms_ssim"], abs=1e-4)
    val = [json.loads(line) for line in (tmp_path / "run" / "val.jsonl").read_text().splitlines()]
    assert val[-1]["step"] == 2 and val[-1]["val_images"] == 1
    assert (tmp_path / "run" / "val_split.txt").read_text().splitlines()[1] == str(images / "ct.dcm")


# ------------------------------------------------------------------------------------------ logs and trackers
def test_log_csv_averages_intervals_with_lf_endings_and_documented_columns(tmp_path: Path, images: Path):
    from medlatent.training.reference import LOG_COLUMNS, VAL_KEYS
    from medlatent.training.trainer import Trainer

    run = tmp_path / "run"
    Trainer(tiny_cfg(run, images, train={"max_steps": 5, "log_every": 2})).fit()
    assert b"\r\n" not in (run / "log.csv").read_bytes()
    table = rows(run / "log.csv")
    assert [int(r["step"]) for r in table] == [2, 4, 5]  # every log_every steps and the last
    assert set(table[0]) <= set(LOG_COLUMNS)
    assert set(json.loads((run / "val.jsonl").read_text().splitlines()[0])) <= set(VAL_KEYS)
    assert [float(r["seconds"]) for r in table] == sorted(float(r["seconds"]) for r in table)
    if _has("matplotlib"):
        assert (run / "curves.png").stat().st_size > 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_trackers_fail_at_start_when_unknown_or_missing(tmp_path: Path, images: Path):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'.*supported: tensorboard, wandb"):
        tiny_cfg(tmp_path / "a", images, train={"log_with": ["tensorbord"]})
    if _has("wandb"):
        pytest.skip("wandb is installed: the missing-tracker message cannot be shown with it")
    from typer.testing import CliRunner

    from medlatent.cli import app

    cfg = tiny_cfg(tmp_path / "b", images, train={"log_with": ["wandb"]})
    (tmp_path / "b.yaml").write_text(cfg.to_yaml())
    out = CliRunner().invoke(app, ["train", str(tmp_path / "b.yaml")])
    assert out.exit_code == 1 and "the wandb package is not installed" in out.output
    assert not (tmp_path / "b" / "log.csv").exists()


def test_tensorboard_receives_the_logged_values(tmp_path: Path, images: Path):
    pytest.importorskip("tensorboard")
    from medlatent.training.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(tiny_cfg(run, images, train={"max_steps": 2, "log_with": ["tensorboard"]}))
    trainer.fit()
    trainer.end()
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags().get("scalars", []))
    assert {"total", "rec", "val_psnr"} <= tags


# ------------------------------------------------------------------------------------------ interrupts
def test_sigterm_saves_the_step_and_a_new_trainer_resumes_there(tmp_path: Path, images: Path):
    from medlatent.training.trainer import Trainer, TrainingInterrupted

    run = tmp_path / "run"
    cfg = tiny_cfg(run, images, train={"max_steps": 50, "log_every": 1}, data={"val": "none"})
    trainer = Trainer(cfg)
    step = trainer._stage1_step

    def step_then_signal(micro):  # the signal arrives in the middle of step 2
        logs = step(micro)
        if trainer.progress.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return logs

    trainer._stage1_step = step_then_signal
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.exit_code == 143 and info.value.step == 2
    assert info.value.checkpoint == run / "checkpoints" / "step_0000002"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is gone with the run
    resumed = Trainer(cfg)
    assert resumed.progress.step == 2
    resumed.fit(max_steps=3)
    table = rows(run / "log.csv")
    assert [int(r["step"]) for r in table] == [1, 2, 3]
    assert float(table[2]["seconds"]) >= float(table[1]["seconds"])


# ------------------------------------------------------------------------------------------ export
def test_export_ckpt_writes_an_official_checkpoint(tmp_path: Path, images: Path):
    from typer.testing import CliRunner

    from medlatent.cli import app

    src = MedVAE.from_pretrained("medlatent_small_4_4_2d").save_pretrained(tmp_path / "final")
    runner = CliRunner()
    out = runner.invoke(app, ["export-ckpt", str(src), "-o", str(tmp_path / "model.ckpt")])
    assert out.exit_code == 0, out.output
    sd = torch.load(tmp_path / "model.ckpt", weights_only=True)["state_dict"]
    ref = MedVAE.from_pretrained(src).state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    out = runner.invoke(app, ["export-ckpt", str(tmp_path), "-o", str(tmp_path / "x.ckpt")])
    assert out.exit_code == 1 and "not a medlatent model folder" in out.output
    assert not (tmp_path / "x.ckpt").exists()


# ------------------------------------------------------------------------------------------ the journey
@pytest.mark.slow
def test_journey_finetune_interrupt_resume_and_use_the_model(tmp_path: Path):
    """README "Fine-tune on your images": samples, finetune (tiny), Ctrl-C, resume, encode/decode with the result."""
    samples = tmp_path / "samples"
    res = cli("samples", "-o", str(samples))
    if res.returncode != 0 or not list((samples / "2d").glob("*.dcm")):
        pytest.skip(f"no sample images (pip install 'medlatent[samples]'): {res.stderr[-300:]}")
    run = tmp_path / "runs" / "my_finetune"
    command = [sys.executable, "-m", "medlatent.cli", "finetune", "medlatent_small_4_4_2d", str(samples / "2d"),
               "-o", str(run), "data.size=32", "train.batch_size=1", "train.log_every=1", "train.val_max_images=1"]
    proc = subprocess.Popen([*command, "--steps", "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    seen = []
    for line in proc.stdout:  # the first step's log line: training is under way
        seen.append(line)
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, "".join(seen) + out + err
    assert "checkpoint saved in" in err and "run the same command again" in err
    step = int(rows(run / "log.csv")[-1]["step"])
    assert step < 500 and (run / "checkpoints" / f"step_{step:07d}" / "state.pt").is_file()
    assert not (run / "final").exists()
    seconds_before = float(rows(run / "log.csv")[-1]["seconds"])

    res = subprocess.run([*command, "--steps", str(step + 2)], capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"at step {step}" in res.stdout
    table = rows(run / "log.csv")
    assert [int(r["step"]) for r in table] == list(range(1, step + 3))
    assert float(table[step]["seconds"]) >= seconds_before  # the elapsed time continues
    assert json.loads((run / "final" / "config.json").read_text())["model"] == "my_finetune"

    res = cli("encode", str(samples / "2d" / "ct_slice.dcm"), "-o", str(tmp_path / "lat"),
              "--model", str(run / "final"))
    assert res.returncode == 0, res.stdout + res.stderr
    latent = tmp_path / "lat" / "ct_slice.latent.safetensors"
    from medlatent.latentfile import read_latent

    assert read_latent(latent).model["name"] == "my_finetune"
    res = cli("info", str(latent))
    assert "my_finetune" in res.stdout
    res = cli("decode", str(latent), "-o", str(tmp_path / "rec"), "--model", str(run / "final"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "rec" / "ct_slice.png").is_file()

    # README "Show that latents keep the signal": the fine-tuned model against the bundled one and bicubic at the
    # same f and at equal values stored, in one report that names each model by name and weights SHA
    res = cli("evaluate", "recon", str(samples / "2d" / "ct_slice.dcm"), "-o", str(tmp_path / "eval"),
              "-m", "medlatent_small_4_4_2d", "-m", str(run / "final"), "--baselines", "bicubic", "--seeds", "1",
              "--figures", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    methods = json.loads((tmp_path / "eval" / "summary.json").read_text())["methods"]
    assert {"medlatent_small_4_4_2d", "my_finetune", "bicubic", "bicubic (f=4)"} <= set(methods)
    report = (tmp_path / "eval" / "report.md").read_text()
    sha = hashlib.sha256((run / "final" / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert f"| my_finetune | {sha} |" in report and "| values stored |" in report
