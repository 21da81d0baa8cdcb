"""A latent store read by fsspec URL where it lies (here fsspec's in-memory filesystem, no network): the same items,
tensors, labels and batches as the local store, in DataLoader workers too, and damage named by URL."""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from torch.utils.data import DataLoader

from medlatent.data import LatentDataset, LatentStream
from medlatent.data.store import LatentStore, StoreError, is_store
from medlatent.latentfile import LatentFileError
from test_latent_stream import _store


@pytest.fixture
def remote(tmp_path) -> tuple[Path, str]:
    """A store of 23 labelled latents in 3 shards, and a copy of it at a ``memory://`` URL."""
    local = _store(tmp_path)
    url = f"memory://stores-{uuid.uuid4().hex}/latents.store"
    fs = fsspec.filesystem("memory")
    for p in local.iterdir():
        if p.is_file() and not p.name.startswith("."):
            fs.pipe(f"{url}/{p.name}", p.read_bytes())
    yield local, url
    fs.rm(url.rsplit("/", 1)[0], recursive=True)


def test_remote_store_reads_as_the_local_one(remote):
    local, url = remote
    a, b = LatentStore(local), LatentStore(url + "/")
    assert is_store(url) and not is_store(url + "-missing")
    assert b.names == a.names and b.labels == a.labels and b.root == url
    for j in range(len(a)):
        assert torch.equal(b.read_tensor(j), a.read_tensor(j)) and b.read_bytes(j) == a.read_bytes(j)
    assert b.load(3).preprocessing == a.load(3).preprocessing
    copy = pickle.loads(pickle.dumps(b))  # what a spawned worker gets: no filesystem object, made again there
    assert copy._remote._fs is None and torch.equal(copy.read_tensor(5), a.read_tensor(5))
    for meta in (True, False):
        ds_a, ds_b = LatentDataset(local, meta=meta), LatentDataset([LatentStore(url, storage_options={})], meta=meta)
        assert ds_b.names == ds_a.names and ds_b.classes == ds_a.classes
        for i in (0, 22):
            assert torch.equal(ds_b[i]["z"], ds_a[i]["z"]) and ds_b[i]["label"] == ds_a[i]["label"]
    assert str(LatentDataset(url)[1]["meta"]["path"]).startswith(url + "/shard-000000.tar:")


def test_remote_stream_in_workers(remote):
    local, url = remote
    full = LatentDataset(local)
    seen = []
    loader = DataLoader(LatentStream(url, 4, window=5, seed=1), batch_size=None, num_workers=2,
                        multiprocessing_context="fork")  # forked workers see the parent's in-memory filesystem
    for b in loader:
        for z, y, j in zip(b["z"], b["label"], b["index"].tolist()):
            assert torch.equal(z, full[j]["z"]) and y == full[j]["label"]
            seen.append(j)
    assert sorted(seen) == list(range(23))


def test_remote_problems_are_named_by_url(remote):
    local, url = remote
    with pytest.raises(StoreError, match=f"{url}-missing: not a latent store"):
        LatentStore(url + "-missing")
    fs = fsspec.filesystem("memory")
    st = LatentStore(url)
    data = bytearray(fs.cat_file(f"{url}/shard-000001.tar"))
    data[int(st._offset[14]) + 500] ^= 0xFF  # item 14 = case014, in the second shard
    fs.pipe(f"{url}/shard-000001.tar", bytes(data))
    with pytest.raises(LatentFileError, match=f"{url}/shard-000001.tar:case014.latent.safetensors: bytes do not"):
        list(LatentStream(url, 4, shuffle=False))
    fs.rm(f"{url}/shard-000002.index.json")
    with pytest.raises(StoreError, match=f"{url}/shard-000002.index.json: cannot be read"):
        LatentStore(url)
