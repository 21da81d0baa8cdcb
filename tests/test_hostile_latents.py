"""Latent files someone edited or damaged, malformed files given to `info`, tiny images, and output file modes.

Edits are made the way a person or a script would: load the file, change the metadata JSON, save it again
with the tensors untouched and without recomputing the digests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import run_cli
from io_fixtures import copy_to, sample_file
from medlatent.registry import DEFAULT_MODEL

nib = pytest.importorskip("nibabel")
PIL = pytest.importorskip("PIL.Image")
SUFFIX = ".latent.safetensors"





_run = run_cli


def _clean_failure(res, text: str, name: str, fragment: str) -> None:
    """Exit 1 through the CLI's error path (no traceback), with the file and the reason in the message."""
    assert res.exit_code == 1, text
    assert res.exception is None or isinstance(res.exception, SystemExit), f"uncaught {res.exception!r}\n{text}"
    assert "Traceback" not in text
    assert name in text and fragment in text, text


def _load(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["medlatent"]), {k: fh.get_tensor(k) for k in fh.keys()}


def _save(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata={"medlatent": json.dumps(meta)})
    return path


def _tensor_digest(tensors: dict[str, torch.Tensor], version: int = 2) -> str:
    """The documented tensor digest: per tensor (sorted by name) its [name, dtype, shape] JSON, then its bytes;
    format version 1 hashed the name and bytes only."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        head = [name, str(t.dtype).removeprefix("torch."), list(t.shape)] if version >= 2 else None
        h.update(json.dumps(head).encode() if head else name.encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _metadata_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _forge(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Recompute both digests, as a buggy writer would: then only the structural checks stand in the way."""
    meta = {**meta, "sha256": _tensor_digest(tensors)}
    return {**meta, "metadata_sha256": _metadata_digest(meta)}


def _png(path: Path, h: int, w: int) -> Path:
    arr = (np.arange(h * w).reshape(h, w) * 37 % 251).astype(np.uint8)
    PIL.fromarray(arr).save(path)
    return path


def _nifti(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> Path:
    arr = np.random.default_rng(0).integers(-1000, 1000, size=shape).astype(np.int16)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


@pytest.fixture(scope="module")
def latents(tmp_path_factory, model_dirs):
    """A 2D latent of a real DICOM (float32 z) and a 3D latent of an LPS-oriented CT volume (reoriented: the
    record has an orientation change and padding)."""
    root = tmp_path_factory.mktemp("latents")
    src = copy_to(root, sample_file("MR_small.dcm"))
    res, out = _run("encode", src, "-o", root / "lat2", "--model", model_dirs[2], "--latent-dtype", "float32")
    assert res.exit_code == 0, out
    vol = _nifti(root / "ct.nii.gz", (6, 5, 7), np.diag([-1.5, -1.0, 2.5, 1.0]))
    res, out = _run("encode", vol, "-o", root / "lat3", "--model", model_dirs[3], "--modality", "ct")
    assert res.exit_code == 0, out
    return {2: root / "lat2" / ("MR_small" + SUFFIX), 3: root / "lat3" / ("ct" + SUFFIX)}


def _set(d: dict, keys: str, value) -> None:
    *parents, last = keys.split(".")
    for k in parents:
        d = d[k]
    d[last] = value


# --------------------------------------------------------------------------- 5: every metadata field is checked
def _edits(meta: dict) -> dict[str, dict[str, object]]:
    rec = meta["preprocessing"]
    aff = [row[:] for row in rec["original_affine"]]
    aff[0][0] *= 2
    aff[0][-1] += 10.0
    return {
        "intensity hi": {"preprocessing.intensity.hi": rec["intensity"]["hi"] * 2},
        "intensity lo": {"preprocessing.intensity.lo": rec["intensity"]["lo"] - 500},
        "intensity clip": {"preprocessing.intensity.clip": not rec["intensity"]["clip"]},
        "spatial_dims": {"preprocessing.spatial_dims": 5 - rec["spatial_dims"],
                         "model.spatial_dims": 5 - rec["spatial_dims"]},
        "affine": {"preprocessing.original_affine": aff},
        "latent affine": {"latent_affine": [[2 * v for v in row] for row in meta["latent_affine"]]},
        "padding": {"preprocessing.pad": [[0, p[1] + 2] for p in rec["pad"]],
                    "preprocessing.model_shape": [n + 2 for n in rec["model_shape"]]},
        "model name": {"model.name": "medvae_4_1_2d"},
        "model weights": {"model.weights_sha256": "0" * 64},
        "f and C": {"model.f": meta["model"]["f"] * 4, "model.C": meta["model"]["C"] + 1},
        "original dtype": {"preprocessing.original_dtype":
                           "float64" if rec["original_dtype"] != "float64" else "int16"},
        "modality": {"preprocessing.modality": "ct" if rec["modality"] != "ct" else "mri"},
        "format version": {"format_version": 1},
    }


@pytest.mark.parametrize("dims", [2, 3])
def test_edited_metadata_is_refused_by_decode_and_info(tmp_path, model_dirs, latents, dims):
    meta, tensors = _load(latents[dims])
    edits = _edits(meta)
    if dims == 3:
        assert meta["preprocessing"]["orientation"] is not None  # the volume was reoriented: that is edited too
        edits["orientation"] = {"preprocessing.orientation": [[1, 1], [0, 1], [2, 1]]}
    for case, changes in edits.items():
        edited = json.loads(json.dumps(meta))
        for keys, value in changes.items():
            _set(edited, keys, value)
        assert edited != meta, case
        name = f"{case.replace(' ', '_')}{SUFFIX}"
        _save(tmp_path / name, edited, tensors)
        dec = tmp_path / "dec" / case.replace(" ", "_")
        res, text = _run("decode", tmp_path / name, "-o", dec, "--model", model_dirs[dims], "--ignore-weights")
        _clean_failure(res, text, name, "metadata do not match their checksum")
        assert not [p for p in dec.rglob("*") if p.name != "manifest.jsonl"], f"{case}: output written"
        res, text = _run("info", tmp_path / name)
        _clean_failure(res, text, name, "metadata do not match their checksum")
    # the unedited file still decodes, so the refusals above are the edits' doing
    res, text = _run("decode", latents[dims], "-o", tmp_path / "ok", "--model", model_dirs[dims])
    assert res.exit_code == 0, text


@pytest.mark.parametrize("dims", [2, 3])
def test_a_flipped_tensor_byte_is_refused(tmp_path, model_dirs, latents, dims):
    data = bytearray(latents[dims].read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    data[header_end + 1] ^= 0x40  # in z's payload (tensors are stored after the header)
    bad = tmp_path / f"flipped{SUFFIX}"
    bad.write_bytes(bytes(data))
    res, text = _run("decode", bad, "-o", tmp_path / "dec", "--model", model_dirs[dims])
    _clean_failure(res, text, bad.name, "tensor data do not match the stored checksum")
    assert not list((tmp_path / "dec").glob("flipped.*"))


def test_changed_tensor_dtype_or_shape_is_refused(tmp_path, model_dirs, latents):
    meta, tensors = _load(latents[2])
    cases = {"dtype": {**tensors, "z": tensors["z"].half()},
             "shape": {**tensors, "z": tensors["z"][:, :-1].contiguous()}}
    for case, edited in cases.items():
        path = _save(tmp_path / f"{case}{SUFFIX}", meta, edited)
        res, text = _run("decode", path, "-o", tmp_path / "dec", "--model", model_dirs[2])
        _clean_failure(res, text, path.name, "checksum")


def test_forged_digests_still_meet_the_structural_checks(tmp_path, model_dirs, latents):
    """With the digests recomputed, inconsistent metadata are still refused, each with what is wrong."""
    meta, tensors = _load(latents[3])
    rec = meta["preprocessing"]
    cases = {
        "affine_shape": ({"preprocessing.original_affine": [[1.0, 0.0], [0.0, 1.0]]}, "original_affine must be"),
        "nan_affine": ({"preprocessing.original_affine": [[float("nan")] * 4] * 4}, "original_affine must be"),
        "spatial_dims": ({"preprocessing.spatial_dims": 2}, "differs from model.spatial_dims"),
        "pad": ({"preprocessing.pad": [[0, 2]] * 3}, "does not follow from the original shape"),
        "lo_above_hi": ({"preprocessing.intensity.lo": 5000.0}, "finite lo < hi"),
        "latent_affine": ({"latent_affine": np.eye(4).tolist()}, "latent_affine does not follow"),
        "orientation": ({"preprocessing.orientation": [[0, 1], [0, 1], [2, 1]]}, "orientation must permute"),
        "dtype": ({"preprocessing.original_dtype": "object"}, "original_dtype must name a numeric dtype"),
        "no_C": ({"model.C": None}, "model.C must be a positive integer"),
        "newer": ({"format_version": 99}, "newer than this medlatent supports"),
        "file_geometry": ({"preprocessing.file_geometry": {"shape": [5, 5, 1], "affine": np.eye(4).tolist()}},
                          "file_geometry"),
    }
    for case, (changes, fragment) in cases.items():
        edited = json.loads(json.dumps(meta))
        for keys, value in changes.items():
            _set(edited, keys, value)
        path = _save(tmp_path / f"{case}{SUFFIX}", _forge(edited, tensors), tensors)
        res, text = _run("decode", path, "-o", tmp_path / "dec", "--model", model_dirs[3])
        _clean_failure(res, text, path.name, fragment)
    assert rec["pad"] != [[0, 2]] * 3
    nan_z = {**tensors, "z": torch.full_like(tensors["z"], float("nan"))}
    path = _save(tmp_path / f"nan_z{SUFFIX}", _forge(meta, nan_z), nan_z)
    res, text = _run("decode", path, "-o", tmp_path / "dec", "--model", model_dirs[3])
    _clean_failure(res, text, path.name, "z holds NaN or infinite values")
    assert not list((tmp_path / "dec").glob("*.nii.gz"))


def _malformed(tmp_path: Path, good: Path) -> dict[str, tuple[bytes | None, str]]:
    """File name → (bytes to write, or None if already written) and the expected reason."""
    data = good.read_bytes()
    meta, tensors = _load(good)
    header_len = struct.unpack("<Q", data[:8])[0]
    cases: dict[str, tuple[bytes | None, str]] = {
        "text": (b"this is a radiology report, not a latent file\n", "damaged or not a safetensors file"),
        "empty": (b"", "damaged or not a safetensors file"),
        "cut_header": (data[: 8 + header_len // 2], "damaged or not a safetensors file"),
        "cut_tensors": (data[: len(data) - 7], "damaged or not a safetensors file"),
        "header_garbage": (data[:8] + bytes(range(256))[:header_len].ljust(header_len, b"\xff") + data[8 + header_len:],
                           "damaged or not a safetensors file"),
        "huge_header_length": (struct.pack("<Q", 2**62) + data[8:], "damaged or not a safetensors file"),
    }
    for name, raw, reason in [
        ("not_json", "{this is not json", "not JSON"),
        ("json_list", "[1, 2, 3]", "expected a JSON object"),
        ("json_string", json.dumps("medlatent"), "expected a JSON object"),
        ("other_format", json.dumps({"format": "something-else"}), "format is 'something-else'"),
        ("version_text", json.dumps(_forge({**meta, "format_version": "two"}, tensors)),
         "format_version must be a positive integer"),
    ]:
        save_file(tensors, str(tmp_path / f"{name}{SUFFIX}"), metadata={"medlatent": raw})
        cases[name] = (None, reason)
    for key in ("preprocessing", "model", "latent_affine", "sha256", "metadata_sha256"):
        partial = {k: v for k, v in meta.items() if k != key}
        if key == "sha256":  # digest the metadata without it
            partial["metadata_sha256"] = _metadata_digest(partial)
        elif key != "metadata_sha256":
            partial = _forge(partial, tensors)
        _save(tmp_path / f"missing_{key}{SUFFIX}", partial, tensors)
        cases[f"missing_{key}"] = (None, f"missing {key}")
    no_hi = json.loads(json.dumps(meta))
    del no_hi["preprocessing"]["intensity"]["hi"]
    _save(tmp_path / f"missing_intensity_hi{SUFFIX}", _forge(no_hi, tensors), tensors)
    cases["missing_intensity_hi"] = (None, "intensity mapping must have exactly kind, lo, hi, clip")
    extra = json.loads(json.dumps(meta))
    extra["preprocessing"]["patient_name"] = "DOE^JANE"
    _save(tmp_path / f"unknown_key{SUFFIX}", _forge(extra, tensors), tensors)
    cases["unknown_key"] = (None, "patient_name")
    save_file({"z": torch.zeros(1, 4, 4)}, str(tmp_path / f"foreign{SUFFIX}"))
    cases["foreign"] = (None, "not a medlatent latent file")
    no_z = {"stage2": tensors["z"]}
    _save(tmp_path / f"no_z{SUFFIX}", _forge(meta, no_z), no_z)
    cases["no_z"] = (None, "holds no 'z' tensor")
    for name, (blob, _) in cases.items():
        if blob is not None:
            (tmp_path / f"{name}{SUFFIX}").write_bytes(blob)
    return cases


def test_info_and_decode_on_malformed_files_give_one_line_errors(tmp_path, model_dirs, latents):
    cases = _malformed(tmp_path, latents[2])
    (tmp_path / f"a_folder{SUFFIX}").mkdir()
    cases["a_folder"] = (None, "no such latent file")
    cases["absent"] = (None, "no such latent file")
    for name, (_, reason) in cases.items():
        path = tmp_path / f"{name}{SUFFIX}"
        res, text = _run("info", path)
        _clean_failure(res, text, path.name, reason)
        assert len(text.strip().splitlines()) == 1, f"{name}: not one line:\n{text}"
        if name not in ("a_folder", "absent"):
            dec = tmp_path / "dec" / name
            res, text = _run("decode", path, "-o", dec, "--model", model_dirs[2])
            _clean_failure(res, text, path.name, reason)
            assert not [p for p in dec.rglob("*") if p.name != "manifest.jsonl"], f"{name}: output written"


def test_format_version_1_files_decode_with_unverified_metadata(tmp_path, model_dirs, latents, caplog):
    """Files of the previous format (tensor digest only) still decode; info and the log say their metadata are
    unverified. Their tensor digest is still checked."""
    meta, tensors = _load(latents[2])
    old = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    old.update(format_version=1, sha256=_tensor_digest(tensors, version=1))
    path = _save(tmp_path / f"v1{SUFFIX}", old, tensors)
    res, text = _run("info", path)
    assert res.exit_code == 0 and "file format 1" in text and "metadata unverified" in text, text
    res, text = _run("decode", path, "-o", tmp_path / "dec", "--model", model_dirs[2])
    assert res.exit_code == 0, text
    with PIL.open(tmp_path / "dec" / "v1.png") as im:
        assert im.size == (64, 64)
    from medlatent.latentfile import read_latent

    with caplog.at_level(logging.WARNING, logger="medlatent.latentfile"):
        assert not read_latent(path).metadata_verified
    assert "v1.latent.safetensors" in caplog.text and "unverified" in caplog.text
    res, text = _run("info", latents[2])
    assert res.exit_code == 0 and "file format 2" in text and "tensors and metadata verified" in text, text
    damaged = {**tensors, "z": tensors["z"] + 1}
    path = _save(tmp_path / f"v1_damaged{SUFFIX}", old, damaged)
    res, text = _run("decode", path, "-o", tmp_path / "dec2", "--model", model_dirs[2])
    _clean_failure(res, text, path.name, "tensor data do not match the stored checksum")


def test_writer_refuses_a_latent_that_float16_cannot_hold(tmp_path, latents):
    from medlatent.latentfile import LatentFileError, read_latent, write_latent

    lf = read_latent(latents[2])
    lf.z = lf.z.float() * 0 + 1e6
    with pytest.raises(LatentFileError, match=r"big\.latent\.safetensors: .*float16.*--latent-dtype float32"):
        write_latent(tmp_path / f"big{SUFFIX}", lf, dtype=torch.float16)
    assert not list(tmp_path.iterdir())
    write_latent(tmp_path / f"big{SUFFIX}", lf, dtype=torch.float32)
    assert read_latent(tmp_path / f"big{SUFFIX}").z.max() == 1e6


# ------------------------------------------------------------------------------------- 6: tiny valid images
@pytest.mark.parametrize("model", ["tiny", DEFAULT_MODEL])
def test_tiny_pngs_encode_and_decode_to_their_shape(tmp_path, model_dirs, model):
    """2×2 … 5×7 images make latents with 1-pixel axes (the strides of such tensors once broke the checksum);
    1-pixel images are refused on purpose (README: bad input)."""
    src = tmp_path / "in"
    src.mkdir()
    sizes = [(2, 2), (3, 3), (4, 4), (5, 7), (7, 5)]
    for h, w in sizes:
        _png(src / f"img{h}x{w}.png", h, w)
    name = model_dirs[2] if model == "tiny" else model
    res, text = _run("encode", src, "-o", tmp_path / "lat", "--model", name)
    assert res.exit_code == 0, text
    res, text = _run("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", name)
    assert res.exit_code == 0, text
    for h, w in sizes:
        with PIL.open(tmp_path / "dec" / f"img{h}x{w}.png") as im:
            assert (im.height, im.width) == (h, w)
    one = tmp_path / "one"
    one.mkdir()
    _png(one / "dot.png", 1, 1)
    res, text = _run("encode", one / "dot.png", "-o", tmp_path / "lat1", "--model", name)
    _clean_failure(res, text, "dot.png", "too small")
    assert not list((tmp_path / "lat1").glob("*" + SUFFIX))


def test_tiny_volumes_encode_and_decode_to_their_shape(tmp_path, model_dirs):
    src = tmp_path / "in"
    src.mkdir()
    shapes = [(2, 2, 2), (3, 2, 5)]
    for shape in shapes:
        _nifti(src / f"v{'x'.join(map(str, shape))}.nii.gz", shape, np.diag([-1.0, -1.0, 2.0, 1.0]))
    res, text = _run("encode", src, "-o", tmp_path / "lat", "--model", model_dirs[3], "--nifti")
    assert res.exit_code == 0, text
    res, text = _run("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", model_dirs[3])
    assert res.exit_code == 0, text
    for shape in shapes:
        assert nib.load(str(tmp_path / "dec" / f"v{'x'.join(map(str, shape))}.nii.gz")).shape == shape


def test_checksum_of_a_tensor_with_odd_strides():
    """A contiguous tensor whose size-1 axes have strides ≠ 1 (what a channels-last 1×1 latent looks like)."""
    from medlatent.latentfile import tensor_bytes

    t = torch.arange(4, dtype=torch.float16).as_strided((4, 1, 1), (1, 8, 8))
    assert t.is_contiguous() and t.stride(-1) != 1
    assert tensor_bytes(t) == t.numpy().tobytes() == torch.arange(4, dtype=torch.float16).numpy().tobytes()


# ------------------------------------------------------------------------------------- 12: output file modes
@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_output_file_follows_the_umask(tmp_path, model_dirs, umask, mask, mode):
    src = tmp_path / "in"
    src.mkdir()
    _png(src / "a.png", 6, 5)
    _nifti(src / "v.nii.gz", (4, 3, 5), np.eye(4))
    umask(mask)
    for dims, name in ((2, "a.png"), (3, "v.nii.gz")):
        res, text = _run("encode", src / name, "-o", tmp_path / f"lat{dims}", "--model", model_dirs[dims], "--nifti")
        assert res.exit_code == 0, text
        res, text = _run("decode", tmp_path / f"lat{dims}", "-o", tmp_path / f"dec{dims}", "--model", model_dirs[dims])
        assert res.exit_code == 0, text
    res, text = _run("roundtrip", src / "a.png", "-o", tmp_path / "rt", "--model", model_dirs[2])
    assert res.exit_code == 0, text
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(src)]
    kinds = {"".join(p.suffixes[-2:]) if p.name.endswith(".gz") else p.suffix for p in files}
    assert {".safetensors", ".nii.gz", ".png", ".jsonl", ".json", ".csv"} <= kinds, kinds
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != mode}
    assert not wrong, f"expected {oct(mode)} under umask {oct(mask)}: {wrong}"
