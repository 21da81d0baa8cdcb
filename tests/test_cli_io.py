"""The CLI on real files: encode/decode/roundtrip/info, resume after a kill, and the bad-input corpus."""

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from io_fixtures import copy_to, make_series, sample_file

nib = pytest.importorskip("nibabel")
PIL = pytest.importorskip("PIL.Image")





_run = run_cli


@pytest.mark.slow
def test_encode_decode_roundtrip_info_on_real_files(tmp_path, model_dirs):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    copy_to(src, sample_file("MR_small.dcm"))
    copy_to(src / "sub", sample_file("CT_small.dcm"))
    copy_to(src, sample_file("US1_UNCR.dcm"))
    res, out = _run("encode", src, "-o", tmp_path / "lat", "--model", model_dirs[2])
    assert res.exit_code == 0, out
    lat = sorted(p.relative_to(tmp_path / "lat") for p in (tmp_path / "lat").rglob("*.latent.safetensors"))
    assert [str(p) for p in lat] == ["MR_small.latent.safetensors", "US1_UNCR.latent.safetensors",
                                     "sub/CT_small.latent.safetensors"]
    res, out = _run("info", tmp_path / "lat" / "sub" / "CT_small.latent.safetensors")
    assert res.exit_code == 0 and "tiny_2d" in out and "(2, 64, 64)" in out and "modality ct" in out
    res, out = _run("decode", tmp_path / "lat", "-o", tmp_path / "dec")
    assert res.exit_code == 1 and "tiny_2d" in out and "--model" in out  # not a registry name
    res, out = _run("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", model_dirs[2])
    assert res.exit_code == 0, out
    with PIL.open(tmp_path / "dec" / "sub" / "CT_small.png") as im:
        assert im.size == (128, 128)
    res, out = _run("roundtrip", src / "MR_small.dcm", "-o", tmp_path / "rt", "--model", model_dirs[2])
    assert res.exit_code == 0, out
    rows = json.loads((tmp_path / "rt" / "summary.json").read_text())
    assert rows[0]["item"] == "MR_small" and np.isfinite(rows[0]["psnr"]) and rows[0]["storage_ratio"] > 1
    assert (tmp_path / "rt" / "MR_small.compare.png").is_file()


@pytest.mark.slow
def test_dicom_series_folder_becomes_one_volume_with_geometry(tmp_path, model_dirs):
    series = make_series(tmp_path / "in" / "patient" / "ct", n=6, spacing=2.5)
    res, out = _run("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", model_dirs[3], "--nifti")
    assert res.exit_code == 0, out
    latent = tmp_path / "lat" / "patient" / "ct" / "series.latent.safetensors"
    assert latent.is_file()
    lat_nii = nib.load(str(tmp_path / "lat" / "patient" / "ct" / "series.latent.nii.gz"))
    res, out = _run("decode", latent, "-o", tmp_path / "dec", "--model", model_dirs[3])
    assert res.exit_code == 0, out
    from medlatent.io.readers import read_image

    ref = read_image(series)
    dec = nib.load(str(tmp_path / "dec" / "series.nii.gz"))
    assert dec.shape == ref.array.shape
    np.testing.assert_allclose(dec.affine, ref.affine, atol=1e-4)
    # the latent NIfTI overlays the source: same world extent, voxel size × 2 (tiny model: ÷2 per axis)
    np.testing.assert_allclose(np.linalg.norm(lat_nii.affine[:3, :3], axis=0),
                               2 * np.linalg.norm(dec.affine[:3, :3], axis=0), rtol=1e-4)


@pytest.mark.slow
def test_resume_after_killed_run(tmp_path, model_dirs):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    n = 24
    for i in range(n):
        PIL.fromarray(rng.integers(0, 65535, (128, 128)).astype(np.uint16)).save(src / f"img{i:02d}.png")
    out = tmp_path / "lat"
    cmd = [sys.executable, "-m", "medlatent.cli", "encode", str(src), "-o", str(out), "--model", str(model_dirs[2])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900  # a bound for a loaded machine, not a timing: the loop ends at the first output
    def finished() -> set[str]:  # not the writer's temporaries (.tmp-PID-NAME), which the kill may leave behind
        return {p.name for p in out.glob("*.latent.safetensors") if not p.name.startswith(".tmp-")}

    while time.time() < deadline and not finished():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = finished()
    assert 0 < len(done_before) < n, "the run should have been killed part-way"
    from medlatent.latentfile import read_latent

    for name in done_before:  # every visible output is complete
        read_latent(out / name)
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert len(list(out.glob("*.latent.safetensors"))) == n
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    second = records[-n:]
    assert {r["item"] for r in second if r["status"] == "skipped"} == {n.split(".")[0] for n in done_before}
    assert sum(r["status"] == "ok" for r in second) == n - len(done_before)


# ------------------------------------------------------------------------------------------ bad inputs
def _nifti(path: Path, arr: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def _bad_inputs(tmp: Path) -> list[tuple[str, Path, str, int]]:
    """(case, input, expected message fragment, model dims)."""
    d = tmp / "bad"
    d.mkdir()
    png = d / "ok.png"
    PIL.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(png)
    truncated = d / "truncated.png"
    truncated.write_bytes(png.read_bytes()[:40])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("this is not an image")
    (d / "text.dcm").write_text("this is not DICOM either")
    (d / "notes.txt").write_text("hello")
    PIL.fromarray(np.zeros((1, 1), np.uint8)).save(d / "one_pixel.png")
    PIL.fromarray(np.zeros((1, 40), np.uint8)).save(d / "one_row.png")
    ct = sample_file("CT_small.dcm").read_bytes()
    (d / "truncated.dcm").write_bytes(ct[: len(ct) // 2])
    nan = np.ones((8, 8, 8), np.float32)
    nan[2, 2, 2] = np.nan
    _nifti(d / "nan.nii.gz", nan)
    inf = np.ones((8, 8, 8), np.float32)
    inf[1, 1, 1] = np.inf
    _nifti(d / "inf.nii.gz", inf)
    _nifti(d / "four_d.nii.gz", np.ones((8, 8, 8, 3), np.float32))
    _nifti(d / "volume.nii.gz", np.ones((8, 8, 8), np.float32))
    gz = d / "corrupt.nii.gz"
    gz.write_bytes(gzip.compress(b"\x00" * 100)[:30])
    (d / "header.nrrd").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4\nencoding: raw\n\n")
    gap = make_series(d / "gap_series", n=5, skip=(2,))
    return [
        ("missing file", d / "does_not_exist.png", "no such file or folder", 2),
        ("empty file", d / "empty.png", "file is empty", 2),
        ("truncated png", truncated, "cannot be read", 2),
        ("text as png", d / "text.png", "cannot be read", 2),
        ("text as dicom", d / "text.dcm", "cannot be read", 2),
        ("unsupported type", d / "notes.txt", "unsupported file type", 2),
        ("one pixel", d / "one_pixel.png", "too small", 2),
        ("one row", d / "one_row.png", "too small", 2),
        ("truncated dicom", d / "truncated.dcm", "pixel data cannot be decoded", 2),
        ("dicom without pixels", sample_file("rtplan.dcm"), "no pixel data", 2),
        ("nan pixels", d / "nan.nii.gz", "NaN or infinite", 3),
        ("inf pixels", d / "inf.nii.gz", "NaN or infinite", 3),
        ("4d volume", d / "four_d.nii.gz", "4D image", 3),
        ("corrupt gzip", gz, "cannot be read", 3),
        ("bad nrrd header", d / "header.nrrd", "cannot be read", 3),
        ("2d image to 3d model", png, "a 2D image", 3),
        ("3d volume to 2d model", d / "volume.nii.gz", "a 3D image", 2),
        ("series with a gap", gap, "uneven slice spacing", 3),
        ("localizer series", sample_file("CT_small.dcm").parent / "dicomdirtests" / "98892003" / "MR700",
         "different orientations", 3),
    ]


def test_bad_input_corpus(tmp_path, model_dirs):
    cases = _bad_inputs(tmp_path)
    for case, path, fragment, dims in cases:
        out = tmp_path / "out" / case.replace(" ", "_")
        res, text = _run("encode", path, "-o", out, "--model", model_dirs[dims])
        assert res.exit_code == 1, f"{case}: exit {res.exit_code}\n{text}"
        assert path.name in text and fragment in text, f"{case}: message lacks file or reason:\n{text}"
        written = list(out.rglob("*.safetensors")) if out.exists() else []
        assert written == [], f"{case}: output written {written}"


def test_bad_latent_corpus(tmp_path, model_dirs):
    src = copy_to(tmp_path, sample_file("MR_small.dcm"))
    res, out = _run("encode", src, "-o", tmp_path / "lat", "--model", model_dirs[2], "--latent-dtype", "float32")
    assert res.exit_code == 0, out
    good = tmp_path / "lat" / "MR_small.latent.safetensors"
    data = good.read_bytes()
    cases = {
        "garbage.latent.safetensors": (b"not a safetensors file at all", "damaged or not a safetensors file"),
        "cut.latent.safetensors": (data[: len(data) - 100], "damaged"),
        "flipped.latent.safetensors": (data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:], "checksum"),
    }
    for name, (blob, fragment) in cases.items():
        (tmp_path / name).write_bytes(blob)
    from safetensors.torch import save_file

    save_file({"z": torch.zeros(1, 4, 4)}, str(tmp_path / "foreign.latent.safetensors"))
    cases["foreign.latent.safetensors"] = (None, "not a medlatent latent file")
    for name, (_, fragment) in cases.items():
        dec = tmp_path / "dec" / name
        res, text = _run("decode", tmp_path / name, "-o", dec, "--model", model_dirs[2])
        assert res.exit_code == 1 and name in text and fragment in text, f"{name}:\n{text}"
        assert not dec.exists() or not any(dec.iterdir()) or not list(dec.glob("*.png"))
    res, text = _run("decode", good, "-o", tmp_path / "dec_other", "--model", model_dirs["other"])
    assert res.exit_code == 1 and "MR_small.latent.safetensors" in text and "does not fit" in text
    assert not list((tmp_path / "dec_other").glob("*.png"))


def test_cli_tiling_options_give_full_size_outputs(tmp_path, model_dirs):
    src = copy_to(tmp_path, sample_file("MR_small.dcm"))
    res, out = _run("roundtrip", src, "-o", tmp_path / "rt", "--model", model_dirs[2], "--tile", "32",
                    "--overlap", "8", "--tile-batch", "2")
    assert res.exit_code == 0, out
    from medlatent.latentfile import read_latent

    lf = read_latent(tmp_path / "rt" / "MR_small.latent.safetensors")
    assert tuple(lf.z.shape) == (2, 32, 32)
    with PIL.open(tmp_path / "rt" / "MR_small.recon.png") as im:
        assert im.size == (64, 64)
    res, out = _run("encode", src, "-o", tmp_path / "bad", "--model", model_dirs[2], "--tile", "31")
    assert res.exit_code == 1 and "multiple of 2" in out


def test_batched_encode_matches_single_and_isolates_bad_files(tmp_path, model_dirs):
    """--batch groups equal-shaped images into one pass; a corrupt file among them fails alone."""
    from medlatent.io.readers import read_image
    from medlatent.latentfile import read_latent

    src = tmp_path / "in"
    src.mkdir()
    ct = read_image(sample_file("CT_small.dcm")).array[0]
    ct = ((ct - ct.min()) / (ct.max() - ct.min()) * 65535).astype(np.uint16)
    for a in (0, 16, 32):
        PIL.fromarray(ct[a : a + 96, a : a + 96]).save(src / f"ct_{a:02d}.png")
    (src / "ct_08.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # sorts between the good ones
    copy_to(src, sample_file("MR_small.dcm"))
    latents = {}
    for b in (1, 3):
        res, out = _run("encode", src, "-o", tmp_path / f"b{b}", "--model", model_dirs[2], "--batch", b)
        assert res.exit_code == 1 and "ct_08.png" in out, out
        rows = [json.loads(x) for x in (tmp_path / f"b{b}" / "manifest.jsonl").read_text().splitlines()]
        assert {r["item"]: r["status"] for r in rows} == {"MR_small": "ok", "ct_00": "ok", "ct_08": "failed",
                                                          "ct_16": "ok", "ct_32": "ok"}
        latents[b] = {p.name: read_latent(p) for p in (tmp_path / f"b{b}").glob("*.safetensors")}
    assert sorted(latents[3]) == sorted(latents[1]) and len(latents[1]) == 4
    for name, lf in latents[1].items():
        torch.testing.assert_close(latents[3][name].z.float(), lf.z.float(), atol=2e-3, rtol=0)  # float16 storage
        assert latents[3][name].preprocessing.original_shape == lf.preprocessing.original_shape


def test_batch_runner_falls_back_to_single_items_when_a_group_fails(tmp_path):
    from medlatent.batch import Job, run_jobs

    calls = []

    def compute(xs):
        calls.append(list(xs))
        if 3 in xs:
            raise ValueError("item 3 is bad")
        return [x * 10 for x in xs]

    got = {}
    jobs = [Job(f"j{i}", [], (lambda i=i: i), (lambda v, i=i: got.__setitem__(i, v))) for i in range(5)]
    report = run_jobs(jobs, tmp_path, batch=2, compute=compute)
    assert [r.status for r in report.results] == ["ok", "ok", "ok", "failed", "ok"]
    assert report.results[3].reason == "item 3 is bad"
    assert got == {0: 0, 1: 10, 2: 20, 4: 40}
    assert calls == [[0, 1], [2, 3], [2], [3], [4]]


def test_compile_flag_compiles_encoder_and_decoder_once(tmp_path, model_dirs, monkeypatch):
    """--compile calls nn.Module.compile on the encoder and decoder (a real compile takes minutes on this CPU;
    its numerical agreement is torch's business), once per model, and the outputs are still written."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    src = tmp_path / "in"
    src.mkdir()
    copy_to(src, sample_file("MR_small.dcm"))
    copy_to(src, sample_file("CT_small.dcm"))
    res, out = _run("encode", src, "-o", tmp_path / "lat", "--model", model_dirs[2], "--compile")
    assert res.exit_code == 0, out
    assert sorted(compiled) == ["Decoder", "Encoder"]
    compiled.clear()
    res, out = _run("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", model_dirs[2], "--compile")
    assert res.exit_code == 0, out
    assert sorted(compiled) == ["Decoder", "Encoder"] and len(list((tmp_path / "dec").glob("*.png"))) == 2
