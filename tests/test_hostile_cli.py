"""The CLI against hostile file systems: unusable outputs (a file, no permission, disk full), broken and looping
symbolic links, inputs without images, BIDS/DICOMDIR folders full of sidecars, and outputs inside the inputs."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import randomise, tiny_config
from io_fixtures import sample_file
from medlatent import MedVAE
from medlatent.cli import app

nib = pytest.importorskip("nibabel")
PIL = pytest.importorskip("PIL.Image")
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    randomise(MedVAE(tiny_config(2)), seed=2).save_pretrained(root / "tiny2d", name="tiny_2d")
    return root / "tiny2d"


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit)), \
        f"unhandled {res.exception!r}:\n{res.output}"
    return res, res.output


def _png(path: Path, size: int = 16, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    PIL.fromarray(rng.integers(0, 255, (size, size)).astype(np.uint8)).save(path)
    return path


def _manifest(out: Path) -> dict[str, dict]:
    return {r["item"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def _no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob(".tmp-*")] if folder.exists() else True


# ------------------------------------------------------------------------------------------ unusable outputs
@pytest.mark.parametrize("command", ["encode", "decode", "roundtrip"])
def test_output_that_is_a_file_fails_before_the_model_loads(tmp_path, command):
    _png(tmp_path / "in" / "a.png")
    blocker = tmp_path / "taken.txt"
    blocker.write_text("keep me")
    # a model that cannot load: the output check must come first, or this would be the error
    res, out = _run(command, tmp_path / "in", "-o", blocker, "--model", tmp_path / "no_such_model")
    assert res.exit_code == 1 and f"output {blocker}" in out and "exists and is a file" in out, out
    assert blocker.read_text() == "keep me"
    res, out = _run(command, tmp_path / "in", "-o", blocker / "sub", "--model", tmp_path / "no_such_model")
    assert res.exit_code == 1 and f"{blocker} is a file" in out and "cannot be created" in out, out


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions; see the mkdir PermissionError test")
def test_output_in_a_read_only_folder(tmp_path, model_dir):
    _png(tmp_path / "in" / "a.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        res, out = _run("encode", tmp_path / "in", "-o", locked / "out", "--model", model_dir)
    finally:
        locked.chmod(0o700)
    assert res.exit_code == 1 and f"{locked} is not writable" in out, out
    assert list(locked.iterdir()) == []


def test_output_folder_that_cannot_be_created(tmp_path, model_dir, monkeypatch):
    """Permission denied when creating the folder (what a non-root user meets in a folder of root's)."""
    _png(tmp_path / "in" / "a.png")
    target = tmp_path / "out"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    res, out = _run("encode", tmp_path / "in", "-o", target, "--model", model_dir)
    assert res.exit_code == 1 and f"output {target}: cannot create the folder (Permission denied)" in out, out
    assert not target.exists()


def test_disk_full_mid_run_stops_with_the_reason_and_keeps_finished_items(tmp_path, model_dir, monkeypatch):
    for i in range(3):
        _png(tmp_path / "in" / f"img{i}.png", seed=i)
    out_dir = tmp_path / "out"
    real_write = Path.write_bytes
    writes = []

    def write_bytes(self, data):  # the second latent write finds the disk full
        if out_dir in self.parents:
            writes.append(self.name)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    res, out = _run("encode", tmp_path / "in", "-o", out_dir, "--model", model_dir)
    assert res.exit_code == 1, out
    assert f"output {out_dir}: writing img1 failed: No space left on device" in " ".join(out.split()), out
    assert len(writes) == 2, "the run must stop at the full disk, not try every later item"
    assert sorted(p.name for p in out_dir.glob("*.safetensors")) == ["img0.latent.safetensors"]
    assert _no_temporaries(out_dir)
    rows = _manifest(out_dir)
    assert rows["img0"]["status"] == "ok" and rows["img1"]["status"] == "failed" and "img2" not in rows
    monkeypatch.setattr(Path, "write_bytes", real_write)  # space freed: the re-run finishes the rest
    res, out = _run("encode", tmp_path / "in", "-o", out_dir, "--model", model_dir)
    assert res.exit_code == 0 and "2 written, 1 already complete" in out, out


def test_manifest_on_a_full_disk_leaves_no_empty_file(tmp_path, model_dir, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell the manifest's file descriptor")
    _png(tmp_path / "in" / "a.png")
    out_dir = tmp_path / "out"
    real_write = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("manifest.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    res, out = _run("encode", tmp_path / "in", "-o", out_dir, "--model", model_dir)
    assert res.exit_code == 1 and f"manifest {out_dir / 'manifest.jsonl'}: cannot be written" in out, out
    assert not (out_dir / "manifest.jsonl").exists()


_TMPFS_DRIVER = textwrap.dedent("""
    import json, os, subprocess, sys
    mnt, src, model = sys.argv[1:4]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt], check=True)
    cli = [sys.executable, "-m", "medlatent.cli", "encode", src, "--model", model, "-o"]
    res = {}
    # a 256² image gives a 2×128×128 float16 latent (64 KiB): more than the whole file system holds
    r = subprocess.run(cli + [mnt + "/mid"], capture_output=True, text=True)
    res["mid"] = [r.returncode, r.stderr, {p: os.path.getsize(os.path.join(mnt, "mid", p))
                                           for p in os.listdir(mnt + "/mid")}]
    with open(mnt + "/filler", "wb", buffering=0) as fh:  # now fill it completely
        try:
            while fh.write(b"x" * 4096):
                pass
        except OSError:
            pass
    r = subprocess.run(cli + [mnt + "/full"], capture_output=True, text=True)
    res["full"] = [r.returncode, r.stderr, os.path.exists(mnt + "/full")]
    print(json.dumps(res))
""")


def test_real_disk_full_on_a_tiny_tmpfs(tmp_path, model_dir):
    """A real ENOSPC from a 64 KiB tmpfs, mounted in a private user and mount namespace (skipped where the
    system does not allow unprivileged namespaces)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unprivileged user namespaces are not available")
    _png(tmp_path / "in" / "big.png", size=256)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "driver.py").write_text(_TMPFS_DRIVER)
    r = subprocess.run(["unshare", "-Urm", sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "mnt"),
                        str(tmp_path / "in"), str(model_dir)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "mount" in r.stderr:
        pytest.skip(f"tmpfs cannot be mounted here: {r.stderr[-200:]}")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    code, err, files = res["mid"]
    assert code == 1 and "writing big failed: No space left on device" in " ".join(err.split()), err
    assert "Traceback" not in err
    assert not [n for n in files if n.startswith(".tmp-") or n.endswith(".safetensors")], files
    assert files.get("manifest.jsonl", 1) > 0, f"0-byte manifest: {files}"
    code, err, created = res["full"]
    assert code == 1 and "no space left on the device" in err and "Traceback" not in err, err
    assert not created, "a full disk must be refused before anything is created"


# ------------------------------------------------------------------------------------------ inputs
def test_broken_and_looping_symlinks_are_failures_not_silence(tmp_path, model_dir):
    src = tmp_path / "in"
    _png(src / "good.png")
    _png(tmp_path / "elsewhere" / "linked.png", seed=1)
    (src / "gone.png").symlink_to(tmp_path / "missing.png")
    (src / "self.png").symlink_to("self.png")
    (src / "sub").mkdir()
    (src / "sub" / "up").symlink_to("..")
    (src / "shared").symlink_to(tmp_path / "elsewhere")  # a linked folder is followed
    os.mkfifo(src / "pipe.png")  # opening it to sniff the content would block forever
    res, out = _run("encode", src, "-o", tmp_path / "out", "--model", model_dir)
    assert res.exit_code == 1 and "2 written" in out and "4 failed" in out, out
    rows = _manifest(tmp_path / "out")
    assert rows["good"]["status"] == rows["shared/linked"]["status"] == "ok"
    assert rows[str(src / "gone.png")]["status"] == "failed"
    assert "broken symbolic link" in rows[str(src / "gone.png")]["reason"]
    assert "symbolic link loop" in rows[str(src / "self.png")]["reason"]
    assert "symbolic link loop" in rows[str(src / "sub" / "up")]["reason"]
    assert "not a regular file" in rows[str(src / "pipe.png")]["reason"]
    assert "gone.png: broken symbolic link" in out


def test_inputs_without_images_are_errors(tmp_path, model_dir):
    (tmp_path / "empty" / "nested" / "deeper").mkdir(parents=True)
    only_sidecars = tmp_path / "sidecars"
    only_sidecars.mkdir()
    (only_sidecars / "sub-01_T1w.json").write_text("{}")
    (only_sidecars / "README").write_text("about")
    cases = [
        (tmp_path / "empty", "holds no files"),
        (only_sidecars, "holds no images (2 non-image files skipped, 0 failed)"),
        (tmp_path / "nope", "no such file or folder"),
        (only_sidecars / "sub-01_T1w.json", "not an image (JSON sidecar"),
    ]
    for path, fragment in cases:
        out_dir = tmp_path / "out" / path.name
        res, out = _run("encode", path, "-o", out_dir, "--model", tmp_path / "no_such_model")
        flat = " ".join(out.split())
        assert res.exit_code == 1 and "nothing to encode" in flat and f"{path}: {fragment}" in flat, out
        assert not out_dir.exists(), "nothing to do must create nothing"
    # a folder without images next to one with images: that input is a failure, the rest is encoded
    _png(tmp_path / "images" / "a.png")
    res, out = _run("encode", tmp_path / "images", tmp_path / "empty", "-o", tmp_path / "mixed", "--model", model_dir)
    assert res.exit_code == 1 and "1 written" in out and f"{tmp_path / 'empty'}: holds no files" in out, out


def test_decode_of_a_folder_without_latents_is_an_error(tmp_path, model_dir):
    (tmp_path / "latents").mkdir()
    _png(tmp_path / "latents" / "not_a_latent.png")
    res, out = _run("decode", tmp_path / "latents", "-o", tmp_path / "dec")
    assert res.exit_code == 1 and "nothing to decode" in out and "holds no latent files" in out, out
    assert not (tmp_path / "dec").exists()


def test_decode_skips_hidden_temporaries_of_a_killed_encode(tmp_path, model_dir):
    _png(tmp_path / "in" / "a.png")
    res, out = _run("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", model_dir)
    assert res.exit_code == 0, out
    (tmp_path / "lat" / ".tmp-4242-b.latent.safetensors").write_bytes(b"half a file")
    res, out = _run("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", model_dir)
    assert res.exit_code == 0 and "1 written" in out, out


def _bids(root: Path) -> dict[str, str]:
    """A small BIDS dataset with OS clutter; returns the expected manifest status per relative path."""
    anat, dwi = root / "sub-01" / "anat", root / "sub-01" / "dwi"
    anat.mkdir(parents=True)
    dwi.mkdir(parents=True)
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((16, 16)).astype(np.float32), np.eye(4)), str(anat / "sub-01_T1w.nii.gz"))
    nib.save(nib.Nifti1Image(rng.random((16, 16)).astype(np.float32), np.eye(4)), str(dwi / "sub-01_dwi.nii.gz"))
    files = {
        "dataset_description.json": '{"Name": "x", "BIDSVersion": "1.8.0"}',
        "participants.tsv": "participant_id\nsub-01\n",
        "README": "A dataset.",
        "CHANGES": "1.0 first",
        "sub-01/anat/sub-01_T1w.json": '{"RepetitionTime": 2.0}',
        "sub-01/dwi/sub-01_dwi.json": "{}",
        "sub-01/dwi/sub-01_dwi.bval": "0 1000",
        "sub-01/dwi/sub-01_dwi.bvec": "0 1\n0 0\n0 0",
        "sub-01/notes.txt": "scanner notes",
        ".DS_Store": "\0\0\0\1Bud1",
        "sub-01/anat/._sub-01_T1w.nii.gz": "\0\5\26\7 AppleDouble",
        "Thumbs.db": "thumbs",
        ".bidsignore": "extra/",
        ".git/annex/objects/key.nii.gz": "not searched",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "derivatives").mkdir()  # an empty subfolder
    return {"sub-01/anat/sub-01_T1w": "ok", "sub-01/dwi/sub-01_dwi": "ok",
            **{rel: "skipped" for rel in files if not rel.startswith(".git/")}, ".git": "skipped"}


@pytest.mark.parametrize("command", ["encode", "roundtrip"])
def test_bids_folder_encodes_with_sidecars_listed_as_skipped(tmp_path, model_dir, command):
    src = tmp_path / "bids"
    expected = _bids(src)
    res, out = _run(command, src, "-o", tmp_path / "out", "--model", model_dir)
    assert res.exit_code == 0, out
    n_skipped = sum(v == "skipped" for v in expected.values())
    assert f"2 written, 0 already complete, {n_skipped} not images (skipped), 0 failed" in out, out
    assert "README: text file" in out and ".DS_Store: macOS folder metadata" in out  # the first 10 listed,
    assert f"… and {n_skipped - 10} more (all listed in the manifest)" in out  # all in the manifest
    rows = _manifest(tmp_path / "out")
    got = {(k[len(str(src)) + 1 :] if k.startswith(str(src)) else k): r for k, r in rows.items()}
    assert {k: r["status"] for k, r in got.items()} == expected
    assert got["sub-01/anat/sub-01_T1w.json"]["reason"] == "not an image: JSON sidecar (metadata)"
    assert got["sub-01/anat/._sub-01_T1w.nii.gz"]["reason"] == "not an image: macOS AppleDouble metadata"
    assert got[".git"]["reason"] == "not an image: hidden folder (not searched)"


def test_dicomdir_is_skipped_and_extensionless_dicom_is_read(tmp_path, model_dir):
    src_root = sample_file("CT_small.dcm").parent / "dicomdirtests"
    src = tmp_path / "cd"
    for rel in ("DICOMDIR", "DICOMDIR-bigEnd", "README.txt", "77654033/CR1/6154", "77654033/CR2/6247"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / rel, src / rel)
    res, out = _run("encode", src, "-o", tmp_path / "out", "--model", model_dir)
    assert res.exit_code == 0, out
    rows = _manifest(tmp_path / "out")
    assert rows["77654033/CR1/6154"]["status"] == rows["77654033/CR2/6247"]["status"] == "ok"
    for name in ("DICOMDIR", "DICOMDIR-bigEnd"):  # by name, and by its SOP class whatever the name
        assert rows[str(src / name)]["status"] == "skipped" and "DICOMDIR index" in rows[str(src / name)]["reason"]


def test_unknown_and_empty_files_still_fail_with_their_reason(tmp_path, model_dir):
    src = tmp_path / "in"
    _png(src / "good.png")
    (src / "scan.xyz").write_bytes(b"\x00\x01 something")
    (src / "blank").write_bytes(b"")
    (src / "empty.png").write_bytes(b"")
    (src / "sub-01_T1w.json").write_text("{}")
    res, out = _run("encode", src, "-o", tmp_path / "out", "--model", model_dir)
    assert res.exit_code == 1 and "1 written" in out and "1 not images (skipped), 3 failed" in out, out
    rows = _manifest(tmp_path / "out")
    assert rows[str(src / "scan.xyz")]["reason"] == "unsupported file type '.xyz'"
    assert rows[str(src / "blank")]["reason"] == rows[str(src / "empty.png")]["reason"] == "file is empty"


def test_output_equal_to_the_input_folder_is_refused(tmp_path, model_dir):
    src = tmp_path / "in"
    _png(src / "a.png")
    for command in ("encode", "roundtrip", "decode"):
        res, out = _run(command, src, "-o", src, "--model", tmp_path / "no_such_model")
        assert res.exit_code == 1 and f"output {src} is the input folder {src}" in " ".join(out.split()), out
    assert sorted(p.name for p in src.iterdir()) == ["a.png"]


def test_output_inside_the_input_folder_is_not_read_back(tmp_path, model_dir):
    src = tmp_path / "in"
    _png(src / "a.png")
    for _ in range(2):  # the second run must not take the first run's outputs as inputs
        res, out = _run("roundtrip", src, "-o", src / "out", "--model", model_dir)
        assert res.exit_code == 0, out
    assert "0 written, 1 already complete, 1 not images (skipped), 0 failed" in out, out
    assert _manifest(src / "out")[str(src / "out")]["reason"] == "not an image: the output folder of this run"
