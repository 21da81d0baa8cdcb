"""Fast reads of a latent store: tensors by the offsets the index records (``read_tensor``, ``LatentDataset(meta=
False)``) and batches streamed window by window (``LatentStream`` / ``iter_batches``): the same tensors and labels
as the full dataset, every item exactly once over ranks × workers, and damaged bytes named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medlatent.data import LatentDataset, LatentStream, iter_batches
from medlatent.data.store import MANIFEST, LatentStore, _sha256, pack
from medlatent.latentfile import SUFFIX, LatentFileError, write_latent
from test_latent_store import _latent


def _store(root: Path, n: int = 23, shard_size: int = 10, labelled: bool = True) -> Path:
    """``n`` latents (8×8, own metadata each) packed in shards of ``shard_size``, with a categorical label."""
    for i in range(n):
        write_latent(root / "lat" / (f"case{i:03d}" + SUFFIX), _latent(i))
    csv = None
    if labelled:
        csv = root / "labels.csv"
        csv.write_text("name,finding\n" + "".join(f"case{i:03d},{'abc'[i % 3]}\n" for i in range(n)))
    pack(root / "lat", root / "store", csv, shard_size=shard_size)
    return root / "store"


def test_read_tensor_and_dataset_without_meta(tmp_path):
    store = _store(tmp_path)
    st = LatentStore(store)
    full, fast = LatentDataset(store), LatentDataset(store, meta=False)
    for j in range(len(st)):
        z = st.read_tensor(j)
        assert z.dtype == torch.float16 and torch.equal(z, st.load(j).z)
        assert set(fast[j]) == {"z", "label"} and torch.equal(fast[j]["z"], full[j]["z"])
        assert fast[j]["label"] == full[j]["label"]
    assert st.layout(0, "stage2") is None
    with pytest.raises(LatentFileError, match="holds no 'stage2' tensor"):
        st.read_tensor(0, "stage2")


@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_gives_every_item_once_with_its_label(tmp_path, shuffle):
    store = _store(tmp_path)
    full = LatentDataset(store)
    stream = LatentStream(store, batch_size=4, window=3, shuffle=shuffle, seed=7)
    assert stream.classes == full.classes
    seen: list[int] = []
    for b in DataLoader(stream, batch_size=None, num_workers=2):
        assert b["z"].dtype == torch.float32 and b["label"].dtype == torch.int64 and len(b["z"]) <= 4
        for z, y, j in zip(b["z"], b["label"], b["index"].tolist()):
            assert torch.equal(z, full[j]["z"]) and y == full[j]["label"]
            seen.append(j)
    assert sorted(seen) == list(range(23))
    if not shuffle:  # one worker: the store's order
        assert [j for b in stream for j in b["index"].tolist()] == list(range(23))


def test_ranks_and_workers_split_the_windows_disjointly(tmp_path):
    store = _store(tmp_path, n=31, shard_size=7)
    st = LatentStore(store)
    for epoch in (0, 1):
        parts = [[j for b in iter_batches(st, 5, part=(k, 4), window=4, epoch=epoch) for j in b["index"].tolist()]
                 for k in range(4)]
        assert sorted(j for p in parts for j in p) == list(range(31))
        assert max(map(len, parts)) - min(map(len, parts)) <= 4  # one window at most
    e0 = [j for b in iter_batches(st, 5, window=4, epoch=0) for j in b["index"].tolist()]
    e1 = [j for b in iter_batches(st, 5, window=4, epoch=1) for j in b["index"].tolist()]
    assert e0 != e1 and sorted(e0) == sorted(e1)  # a new order per epoch
    sizes = [len(b["z"]) for b in iter_batches(st, 5, window=4, drop_last=True)]
    assert sizes == [5] * 6


def test_damaged_item_is_named(tmp_path):
    store = _store(tmp_path, labelled=False)
    st = LatentStore(store)
    shard = store / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[int(st._offset[14]) + 500] ^= 0xFF  # item 14 = case014, in the second shard
    shard.write_bytes(bytes(data))
    with pytest.raises(LatentFileError, match=r"shard-000001.tar:case014.latent.safetensors: bytes do not match"):
        list(iter_batches(LatentStore(store), 4, shuffle=False))
    with pytest.raises(LatentFileError, match="case014"):
        LatentStore(store).read_tensor(14)
    assert "label" not in next(iter(LatentStream(store, 4, shuffle=False)))


def test_store_packed_without_tensor_places(tmp_path):
    """A store whose index lacks the tensors' places (packed before they were recorded): read_tensor parses the
    header instead, the stream says what to do."""
    store = _store(tmp_path, n=5, labelled=False)
    index = store / "shard-000000.index.json"
    d = json.loads(index.read_text())
    del d["tensors"]
    index.write_text(json.dumps(d))
    m = json.loads((store / MANIFEST).read_text())
    m["shards"][0]["index_sha256"] = _sha256(index.read_bytes())
    (store / MANIFEST).write_text(json.dumps(m))
    st = LatentStore(store)
    assert st.layout(0) is None and torch.equal(st.read_tensor(2), st.load(2).z)
    with pytest.raises(LatentFileError, match="records no 'z' tensor"):
        list(iter_batches(st, 2))


def test_mixed_shapes_cannot_batch(tmp_path):
    write_latent(tmp_path / "lat" / ("a" + SUFFIX), _latent(0, size=32))
    write_latent(tmp_path / "lat" / ("b" + SUFFIX), _latent(1, size=64))
    pack(tmp_path / "lat", tmp_path / "store")
    with pytest.raises(LatentFileError, match=r"b.latent.safetensors: z is .* batches need one latent shape"):
        list(iter_batches(LatentStore(tmp_path / "store"), 2))
    z = LatentStore(tmp_path / "store").read_tensor(1)
    assert z.shape == (1, 16, 16) and np.isfinite(z.float().numpy()).all()
