"""``encode --store``: images encoded straight into a latent store, the same latents as ``encode -o`` gives as files,
resumable per input, and a second run encodes only what the store lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import randomise, tiny_config
from io_fixtures import sample_file, write_task_image
from medlatent import MedVAE
from medlatent.cli import app
from medlatent.data import LatentDataset
from medlatent.data.store import LatentStore, unpack, verify
from medlatent.evaluation.finefeature import crop, source_planes, unit
from medlatent.latentfile import SUFFIX
from medlatent.runs import RunError, encode_files, encode_to_store
from medlatent.runs.encode import STAGING


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """Six real 16×16 CT/MR patches as PNGs (two in a subfolder) and a tiny random model folder."""
    root = tmp_path_factory.mktemp("encode-store")
    planes = source_planes(sample_file("CT_small.dcm"), 2) + source_planes(sample_file("MR_small.dcm"), 2)
    for i in range(6):
        folder = root / "images" / ("sub" if i >= 4 else "")
        folder.mkdir(parents=True, exist_ok=True)
        write_task_image(folder, f"img{i}", unit(crop(planes[i % len(planes)], [8 * i, 4 * i], 16)), 2)
    randomise(MedVAE(tiny_config(2)), 0).save_pretrained(root / "vae")
    return root / "images", root / "vae"


def _bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*" + SUFFIX))}


def test_store_holds_what_encode_writes_as_files(tmp_path, data):
    images, vae = data
    files = encode_files([images], tmp_path / "files", model=str(vae))
    assert files.ok
    res = encode_to_store([images], tmp_path / "store", model=str(vae), shard_size=4)
    assert res.ok and (res.packed, len(res.shards), res.in_store) == (6, 2, 0)
    assert verify(tmp_path / "store") == []
    unpack(tmp_path / "store", tmp_path / "unpacked")
    assert _bytes(tmp_path / "unpacked") == _bytes(tmp_path / "files")  # the same latent files, bit for bit
    assert sorted(LatentStore(tmp_path / "store").names) == sorted(f"sub/img{i}" if i >= 4 else f"img{i}"
                                                                   for i in range(6))
    assert not list((tmp_path / "store" / STAGING).rglob("*" + SUFFIX))  # packed files removed from staging
    ds = LatentDataset(tmp_path / "store")
    assert ds[0]["z"].shape == (2, 8, 8)


def test_second_run_encodes_only_what_the_store_lacks(tmp_path, data):
    images, vae = data
    store = tmp_path / "store"
    first = encode_to_store([images / "sub"], store, model=str(vae))
    assert first.packed == 2
    before = (store / "shard-000000.tar").read_bytes()
    second = encode_to_store([images], store, model=str(vae))
    # the subfolder given alone names its items img4, img5; the whole tree names them sub/img4, sub/img5
    assert (second.packed, second.in_store) == (6, 0)
    third = encode_to_store([images], store, model=str(vae))
    assert (third.packed, third.in_store, third.report.counts()) == (0, 6, {"skipped": 6})
    assert (store / "shard-000000.tar").read_bytes() == before  # shards are never rewritten
    assert len(LatentStore(store)) == 8 and verify(store) == []


def test_interrupted_run_resumes_from_the_staged_latents(tmp_path, data):
    images, vae = data
    store = tmp_path / "store"
    # a run killed before packing: some latents staged as files, no store yet
    staged = encode_files([images], store / STAGING, model=str(vae), shard=None)
    assert staged.ok
    (store / STAGING / ("img0" + SUFFIX)).unlink()
    res = encode_to_store([images], store, model=str(vae))
    counts = res.report.counts()
    assert counts == {"ok": 1, "skipped": 5}  # only the missing latent encoded again
    assert res.packed == 6 and len(LatentStore(store)) == 6
    encode_files([images], tmp_path / "files", model=str(vae))
    unpack(store, tmp_path / "unpacked")
    assert _bytes(tmp_path / "unpacked") == _bytes(tmp_path / "files")


def test_store_errors_name_the_problem(tmp_path, data):
    images, vae = data
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(RunError, match="busy: a folder that is not empty and is not a latent store"):
        encode_to_store([images], tmp_path / "busy", model=str(vae))
    with pytest.raises(RunError, match="never replaced"):
        encode_to_store([images], tmp_path / "store", model=str(vae), resume=False)
    assert not (tmp_path / "store").exists()


def test_cli_encode_store(tmp_path, data):
    images, vae = data
    runner = CliRunner()
    store = tmp_path / "store"
    res = runner.invoke(app, ["encode", str(images), "--store", str(store), "-m", str(vae), "--shard-size", "5"])
    assert res.exit_code == 0, res.output
    assert "6 latent(s) added in 2 new shard(s)" in res.output
    res = runner.invoke(app, ["encode", str(images), "--store", str(store), "-m", str(vae)])
    assert res.exit_code == 0 and "6 of them were in the store already" in res.output, res.output
    res = runner.invoke(app, ["encode", str(images), "--store", str(store), "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and "either --output" in res.output
    z = np.stack([LatentDataset(store)[i]["z"].numpy() for i in range(6)])
    assert np.isfinite(z).all()
