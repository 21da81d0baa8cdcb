"""The sharded latent store: pack → unpack bit-identical, append, resume after a killed pack, checksums, the
dataset over a store equal to the dataset over the folder, two gloo ranks over a store, and the CLI commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from medlatent.cli import app
from medlatent.data import LatentDataset
from medlatent.data.store import LatentStore, StoreError, pack, unpack, verify
from medlatent.latentfile import SUFFIX, LatentFile, LatentFileError, write_latent
from medlatent.preprocessing import Preprocessing

MODEL = {"name": "medvae_4_1_2d", "weights_sha256": "0" * 64, "f": 16.0, "C": 1, "downsample_per_axis": 4,
         "spatial_dims": 2}


def _latent(seed: int, size: int = 32) -> LatentFile:
    """A 2D latent (C=1, size/4 × size/4) of a size×size image with its own spacing."""
    rng = np.random.default_rng(seed)
    rec = Preprocessing(2, [1, size, size], np.diag([0.5 + seed / 10, 0.7, 1.0]).tolist(), "uint16", "xray",
                        {"kind": "minmax", "lo": 0.0, "hi": float(1000 + seed), "clip": False},
                        pad=[[0, 0], [0, 0]], model_shape=[size, size])
    return LatentFile(torch.from_numpy(rng.standard_normal((1, size // 4, size // 4)).astype(np.float32)), rec, MODEL)


def _folder(root: Path, n: int, start: int = 0) -> list[Path]:
    """``n`` latent files, every third in a subfolder (the store keeps the relative names)."""
    return [write_latent(root / (f"{'sub/' if i % 3 == 1 else ''}case{i:03d}" + SUFFIX), _latent(i))
            for i in range(start, start + n)]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but hidden ones (the lock file), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_pack_unpack_bit_identical(tmp_path):
    _folder(tmp_path / "lat", 7)
    rep = pack(tmp_path / "lat", tmp_path / "store", shard_size=3)
    assert (rep.added, rep.already, rep.shards) == (7, 0, [f"shard-00000{k}.tar" for k in range(3)])
    assert verify(tmp_path / "store") == []
    # a shard is a plain tar of the latent files, readable by any tar reader
    with tarfile.open(tmp_path / "store" / "shard-000000.tar") as tf:
        assert tf.getnames() == ["case000" + SUFFIX, "case002" + SUFFIX, "case003" + SUFFIX]  # dataset order
        assert tf.extractfile("case002" + SUFFIX).read() == (tmp_path / "lat/case002.latent.safetensors").read_bytes()
    with tarfile.open(tmp_path / "store" / "shard-000002.tar") as tf:
        assert tf.getnames() == ["sub/case004" + SUFFIX]
    got = unpack(tmp_path / "store", tmp_path / "out")
    assert got.written == 7 and _files(tmp_path / "out") == _files(tmp_path / "lat")
    assert unpack(tmp_path / "store", tmp_path / "out").already == 7  # again: nothing to write


def test_append_and_pack_again(tmp_path):
    _folder(tmp_path / "a", 4)
    _folder(tmp_path / "b", 3, start=10)
    pack(tmp_path / "a", tmp_path / "store", shard_size=3)
    rep = pack(tmp_path / "b", tmp_path / "store", shard_size=3)
    assert (rep.added, rep.shards) == (3, ["shard-000002.tar"])
    assert LatentDataset(tmp_path / "store").names == LatentDataset(tmp_path / "a").names + LatentDataset(
        tmp_path / "b").names
    before = _files(tmp_path / "store")
    assert pack(tmp_path / "a", tmp_path / "store").already == 4 and _files(tmp_path / "store") == before

    write_latent(tmp_path / "c" / ("case000" + SUFFIX), _latent(99))  # same name, other bytes
    with pytest.raises(StoreError, match=r"c/case000.latent.safetensors: the store already holds an item 'case000'"):
        pack(tmp_path / "c", tmp_path / "store")
    (tmp_path / "labels.csv").write_text("name,grade\ncase000,1\n")
    with pytest.raises(StoreError, match="has no labels; packing into it needs the same label columns"):
        pack(tmp_path / "c", tmp_path / "store", tmp_path / "labels.csv")
    assert _files(tmp_path / "store") == before


_KILLED_PACK = textwrap.dedent("""
    import os, signal, sys, tarfile
    from medlatent.data.store import pack

    kill_at, calls = int(sys.argv[3]), [0]
    add = tarfile.TarFile.addfile

    def addfile(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:  # mid-shard: earlier members of this shard are written, it is not renamed
            os.kill(os.getpid(), signal.SIGKILL)
        return add(self, *args, **kwargs)

    tarfile.TarFile.addfile = addfile
    pack(sys.argv[1], sys.argv[2], shard_size=4)
""")


def test_killed_pack_resumes_to_the_same_store(tmp_path):
    _folder(tmp_path / "lat", 10)
    pack(tmp_path / "lat", tmp_path / "whole", shard_size=4)
    script = tmp_path / "killed_pack.py"
    script.write_text(_KILLED_PACK)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "lat"), str(tmp_path / "store"), "7"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    left = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert "shard-000000.tar" in left and any(n.startswith(".tmp-") for n in left)  # a shard, half a shard
    assert len(LatentDataset(tmp_path / "store")) == 4  # only the finished shard is part of the store

    rep = pack(tmp_path / "lat", tmp_path / "store", shard_size=4)
    assert (rep.already, rep.added, len(rep.discarded)) == (4, 6, 1)
    assert _files(tmp_path / "store") == _files(tmp_path / "whole")

    # a shard renamed but not yet listed in store.json (killed in between) is redone as well
    (tmp_path / "store" / "shard-000003.tar").write_bytes(b"\0" * 1024)
    assert pack(tmp_path / "lat", tmp_path / "store").discarded == ["shard-000003.tar"]
    assert _files(tmp_path / "store") == _files(tmp_path / "whole")


def test_damage_is_named(tmp_path):
    _folder(tmp_path / "lat", 5)
    pack(tmp_path / "lat", tmp_path / "store", shard_size=3)
    shard = tmp_path / "store" / "shard-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[600] ^= 0x01  # a flipped bit in the first member's bytes (after its 512-byte header)
    shard.write_bytes(bytes(raw))
    assert verify(tmp_path / "store") == [f"{shard}: SHA-256 does not match store.json (shard damaged or edited)"]
    ds = LatentDataset(tmp_path / "store")
    ds[0]  # other shards are unaffected
    with pytest.raises(LatentFileError, match=r"shard-000001.tar:sub/case001.latent.safetensors: bytes do not match"):
        ds[3]
    with pytest.raises(StoreError, match="shard-000001.tar: SHA-256 does not match"):
        unpack(tmp_path / "store", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written from a damaged store

    index = tmp_path / "store" / "shard-000000.index.json"
    index.write_text(index.read_text().replace("case000", "case009"))
    with pytest.raises(StoreError, match=r"shard-000000.index.json: SHA-256 does not match store.json"):
        LatentStore(tmp_path / "store")


def test_bad_input_writes_nothing(tmp_path):
    [first, *_] = _folder(tmp_path / "lat", 3)
    first.write_bytes(first.read_bytes()[:-5])
    with pytest.raises(LatentFileError, match=r"case000.latent.safetensors: damaged or not a safetensors file"):
        pack(tmp_path / "lat", tmp_path / "store")
    assert not (tmp_path / "store").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty and is not a latent store"):
        pack(tmp_path / "lat", tmp_path / "other")


def test_dataset_from_store_equals_dataset_from_folder(tmp_path):
    _folder(tmp_path / "lat", 6)
    csv = tmp_path / "labels.csv"
    csv.write_text("name,finding,score\n" + "".join(
        f"{'sub/' if i % 3 == 1 else ''}case{i:03d},{'malignant' if i % 2 else 'benign'},{i / 4}\n" for i in range(6)))
    pack(tmp_path / "lat", tmp_path / "store", csv, shard_size=4)
    folder = LatentDataset(tmp_path / "lat", csv, label_columns=["finding"])
    store = LatentDataset(tmp_path / "store", label_columns=["finding"])  # the labels packed with the latents
    assert store.names == folder.names and store.classes == folder.classes == {"finding": ["benign", "malignant"]}
    for a, b in zip(folder, store):
        assert torch.equal(a["z"], b["z"]) and torch.equal(a["label"], b["label"])
        assert a["meta"].keys() == b["meta"].keys()
        for k, v in a["meta"].items():
            if k != "path":
                assert torch.equal(v, b["meta"][k]) if isinstance(v, torch.Tensor) else v == b["meta"][k], k
    assert store[store.names.index("sub/case001")]["meta"]["path"].endswith(
        "shard-000001.tar:sub/case001.latent.safetensors")
    both = LatentDataset(tmp_path / "store", csv)  # a CSV matches store items by name; all columns
    assert both[both.names.index("case002")]["label"].tolist() == [0.0, 0.5]

    batches = list(DataLoader(store, batch_size=4, num_workers=2))  # workers open the shards themselves
    assert [n for b in batches for n in b["meta"]["name"]] == folder.names
    assert torch.equal(torch.cat([b["z"] for b in batches]), torch.stack([it["z"] for it in folder]))


_WORKER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from medlatent.data import ExactDistributedSampler, LatentDataset

    dist.init_process_group("gloo")
    ds = LatentDataset(sys.argv[2])
    sampler = ExactDistributedSampler(ds, seed=5)
    seen = {}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen[epoch] = [n for b in DataLoader(ds, batch_size=2, sampler=sampler, num_workers=1)
                       for n in b["meta"]["name"]]
    with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as fh:
        json.dump(seen, fh)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_two_gloo_processes_cover_the_store(tmp_path):
    _folder(tmp_path / "lat", 9)
    pack(tmp_path / "lat", tmp_path / "store", shard_size=4)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), str(tmp_path / "store")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    names = sorted(LatentDataset(tmp_path / "lat").names)
    orders = []
    for epoch in ("0", "1"):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert a and b and set(a).isdisjoint(b) and sorted(a + b) == names  # each item once per epoch
        orders.append(a + b)
    assert orders[0] != orders[1]


def test_cli_pack_unpack(tmp_path):
    runner = CliRunner()
    _folder(tmp_path / "lat", 5)
    res = runner.invoke(app, ["pack", str(tmp_path / "lat"), "-o", str(tmp_path / "store"), "--shard-size", "2"])
    assert res.exit_code == 0, res.output
    assert f"packed 5 latent(s) into 3 new shard(s) of {tmp_path / 'store'}" in res.output
    res = runner.invoke(app, ["unpack", str(tmp_path / "store"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0 and "unpacked 5 latent file(s)" in res.output
    assert _files(tmp_path / "out") == _files(tmp_path / "lat")

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ("x" + SUFFIX)).write_bytes(b"not a latent")
    res = runner.invoke(app, ["pack", str(tmp_path / "bad"), "-o", str(tmp_path / "store2")])
    assert res.exit_code == 1 and not (tmp_path / "store2").exists()
    assert res.output.count("\n") == 1 and "x.latent.safetensors: damaged or not a safetensors file" in res.output
    res = runner.invoke(app, ["unpack", str(tmp_path / "lat"), "-o", str(tmp_path / "out2")])
    assert res.exit_code == 1 and f"{tmp_path / 'lat'}: not a latent store (no store.json)" in res.output
    assert not (tmp_path / "out2").exists()
