"""The CAD harness on existing latents: a store and the folder it was packed from give the same AUROC for the
same seeds; labels from a CSV or packed into the store; bad labels named; the ``cad-latents`` command."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import randomise, tiny_config
from medlatent import MedVAE
from medlatent.data.store import pack
from medlatent.evaluation.cad import CADConfig, CADDataError
from medlatent.evaluation.cad_latents import latent_task, run_cad_latents
from medlatent.evaluation.cli_cad import register
from medlatent.runs import encode_files
from test_eval_cad import separable_task

pytest.importorskip("torchmetrics")

CONFIG = CADConfig(classifier="tiny", epochs=3, batch_size=8, lr=1e-2, seeds=(0, 1))


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A separable 2D task (40 real 16×16 patches) encoded by a tiny model: (latent folder, labels CSV, store)."""
    root = tmp_path_factory.mktemp("cad-latents")
    task_csv = separable_task(root / "images", 2, n=40, size=16, patient=True)
    randomise(MedVAE(tiny_config(2)), 0).save_pretrained(root / "vae")
    assert encode_files([root / "images"], root / "latents", model=str(root / "vae")).ok
    labels = root / "labels.csv"
    with open(task_csv) as src, open(labels, "w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["name", "label", "split", "patient"])
        for r in csv.DictReader(src):
            w.writerow([r["path"].removesuffix(".png"), r["label"], r["split"], r["patient"]])
    pack(root / "latents", root / "store", labels, shard_size=15)
    return root / "latents", labels, root / "store"


def test_store_and_files_give_the_same_auroc(task):
    latents, labels, store = task
    from_files = run_cad_latents(latents, labels, config=CONFIG)
    from_store = run_cad_latents(store, config=CONFIG)  # labels packed into the store
    assert [r.test_auroc for r in from_store.rows[0].runs] == [r.test_auroc for r in from_files.rows[0].runs]
    row = from_store.rows[0]
    assert (row.kind, row.f, row.C, row.input_shape, len(row.runs)) == ("latent", 4, 2, [1, 8, 8], 2)
    assert from_store.counts == from_files.counts == {"train": {"0": 10, "1": 10}, "val": {"0": 2, "1": 2},
                                                      "test": {"0": 8, "1": 8}}
    x_files, y_files, s_files, _, _ = latent_task(latents, labels)
    x_store, y_store, s_store, _, _ = latent_task(store)
    assert torch.equal(x_files, x_store) and torch.equal(y_files, y_store) and s_files == s_store


def test_latent_labels_must_make_a_task(task, tmp_path):
    latents, labels, _ = task
    rows = labels.read_text().splitlines()
    no_split = tmp_path / "nosplit.csv"
    no_split.write_text("\n".join(",".join(r.split(",")[:2]) for r in rows) + "\n")
    with pytest.raises(CADDataError, match="needs label and split columns"):
        latent_task(latents, no_split)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([rows[0], rows[1].replace(",train,", ",training,")] + rows[2:]) + "\n")
    with pytest.raises(CADDataError, match=r"img000.latent.safetensors: split must be one of .* got 'training'"):
        latent_task(latents, bad)
    twice = tmp_path / "twice.csv"
    twice.write_text("\n".join(rows[:-1] + [rows[-1].rsplit(",", 1)[0] + ",p0"]) + "\n")
    with pytest.raises(CADDataError, match="patient 'p0' is in split 'train' and 'test'"):
        latent_task(latents, twice)


def test_cli_cad_latents(task, tmp_path):
    _, _, store = task
    app = typer.Typer()
    register(app)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["cad-latents", str(store), "-o", str(out), "--classifier", "tiny", "--epochs",
                                   "1", "--seeds", "0", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert {"cad.md", "cad.csv", "cad.json"} <= {p.name for p in out.iterdir()}
    assert [r["kind"] for r in csv.DictReader(open(out / "cad.csv"))] == ["latent"]
    res = CliRunner().invoke(app, ["cad-latents", str(tmp_path / "nope"), "-o", str(out)])
    assert res.exit_code != 0 and "nope" in res.output
