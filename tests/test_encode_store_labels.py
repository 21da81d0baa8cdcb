"""``encode --store --labels``: labels packed with the latents at encode time, the same store as ``encode -o`` then
``pack --labels`` gives, every problem with the CSV found before anything is encoded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import randomise, tiny_config
from io_fixtures import sample_file, write_task_image
from medlatent import MedVAE
from medlatent.cli import app
from medlatent.data import LatentDataset, LatentStream
from medlatent.data.store import LatentStore, pack, verify
from medlatent.evaluation.finefeature import crop, source_planes, unit
from medlatent.runs import RunError, encode_files, encode_to_store
from medlatent.runs.encode import STAGING

NAMES = ["img0", "img1", "img2", "sub/img3"]
FINDING = {"img0": "mass", "img1": "normal", "img2": "mass", "sub/img3": "calc"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """Four real 16×16 CT/MR patches as PNGs (one in a subfolder) and a tiny random model folder."""
    root = tmp_path_factory.mktemp("encode-labels")
    planes = source_planes(sample_file("CT_small.dcm"), 2) + source_planes(sample_file("MR_small.dcm"), 2)
    for i, name in enumerate(NAMES):
        folder = (root / "images" / name).parent
        folder.mkdir(parents=True, exist_ok=True)
        write_task_image(folder, Path(name).name, unit(crop(planes[i % len(planes)], [8 * i, 4 * i], 16)), 2)
    randomise(MedVAE(tiny_config(2)), 0).save_pretrained(root / "vae")
    return root / "images", root / "vae"


def _csv(path: Path, rows: dict[str, str], key: str = "name", images: Path | None = None) -> Path:
    """A label CSV: rows by item name, or (``key="path"``) by the image's path relative to the CSV."""
    lines = [f"{key},finding,age"]
    for i, (name, finding) in enumerate(rows.items()):
        ref = name if key == "name" else os.path.relpath(next(images.glob(name + ".*")), path.parent)  # type: ignore
        lines.append(f"{ref},{finding},{40 + i}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _store_files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_labels_packed_at_encode_as_pack_does(tmp_path, data):
    images, vae = data
    csv = _csv(tmp_path / "labels.csv", FINDING)
    res = encode_to_store([images], tmp_path / "store", model=str(vae), labels=csv, shard_size=3)
    assert res.ok and res.packed == 4 and verify(tmp_path / "store") == []
    # the same store, byte for byte, as encoding to files and packing them with the same CSV
    assert encode_files([images], tmp_path / "files", model=str(vae)).ok
    pack(tmp_path / "files", tmp_path / "packed", csv, shard_size=3)
    assert _store_files(tmp_path / "store") == _store_files(tmp_path / "packed")
    st = LatentStore(tmp_path / "store")
    assert st.label_columns == ["finding", "age"]
    assert {n: st.labels["finding"][j] for j, n in enumerate(st.names)} == FINDING
    ds = LatentDataset(tmp_path / "store", label_columns=["finding"])  # the labels come from the store
    classes = ds.classes["finding"]
    assert {n: classes[int(ds[i]["label"])] for i, n in enumerate(ds.names)} == FINDING
    batch = next(iter(LatentStream(tmp_path / "store", 4, label_columns=["finding"], shuffle=False)))
    assert [classes[int(y)] for y in batch["label"]] == [FINDING[st.names[j]] for j in batch["index"].tolist()]


def test_rows_by_image_path(tmp_path, data):
    images, vae = data
    csv = _csv(tmp_path / "labels.csv", FINDING, key="path", images=images)
    assert "../" in csv.read_text() and "sub/img3.png" in csv.read_text()
    encode_to_store([images], tmp_path / "store", model=str(vae), labels=csv)
    st = LatentStore(tmp_path / "store")
    assert {n: st.labels["finding"][j] for j, n in enumerate(st.names)} == FINDING


def test_label_problems_stop_before_encoding(tmp_path, data):
    images, vae = data
    store = tmp_path / "store"
    partial = _csv(tmp_path / "partial.csv", {k: v for k, v in FINDING.items() if k != "img2"})
    with pytest.raises(RunError, match=r"partial.csv: 1 input\(s\) have no label row \(first: .*img2\.png\)"):
        encode_to_store([images], store, model=str(vae), labels=partial)
    stranger = _csv(tmp_path / "stranger.csv", {**FINDING, "img9": "mass"})
    with pytest.raises(RunError, match="stranger.csv, line 6: no latent file named 'img9'"):
        encode_to_store([images], store, model=str(vae), labels=stranger)
    assert not (store / STAGING).exists()  # nothing was encoded
    # a store with labels takes latents with the same labels only, and keeps the labels it has
    encode_to_store([images / "sub"], store, model=str(vae), labels=_csv(tmp_path / "one.csv", {"img3": "calc"}))
    with pytest.raises(RunError, match="has finding, age; packing into it needs the same label columns"):
        encode_to_store([images], store, model=str(vae))
    with pytest.raises(RunError, match="already holds 'img3' with other labels"):
        encode_to_store([images / "sub"], store, model=str(vae),
                        labels=_csv(tmp_path / "other.csv", {"img3": "mass"}))
    again = encode_to_store([images / "sub"], store, model=str(vae), labels=tmp_path / "one.csv")
    assert (again.packed, again.in_store) == (0, 1)
    assert not list((store / STAGING).rglob("*.safetensors")) and len(LatentStore(store)) == 1


def test_cli_encode_store_labels(tmp_path, data):
    images, vae = data
    runner = CliRunner()
    csv = _csv(tmp_path / "labels.csv", FINDING)
    res = runner.invoke(app, ["encode", str(images), "--store", str(tmp_path / "store"), "-m", str(vae),
                              "--labels", str(csv)])
    assert res.exit_code == 0, res.output
    assert "4 latent(s) added in 1 new shard(s)" in res.output
    assert LatentStore(tmp_path / "store").label_columns == ["finding", "age"]
    res = runner.invoke(app, ["encode", str(images), "-o", str(tmp_path / "o"), "-m", str(vae), "--labels", str(csv)])
    assert res.exit_code != 0 and "--labels applies to --store" in res.output
    res = runner.invoke(app, ["encode", str(images), "--store", str(tmp_path / "s2"), "-m", str(vae),
                              "--labels", str(tmp_path / "none.csv")])
    assert res.exit_code != 0 and "none.csv: no such label CSV" in res.output
