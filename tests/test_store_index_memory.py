"""A latent store's index is held compactly: no Python object per item in LatentStore or LatentStream (names and
label values in one buffer each, digests, offsets and tensor layouts in arrays), so memory per process stays small
for 10⁶–10⁷ items; the columns read like the lists of strings the index was written as."""

from __future__ import annotations

import gc
import pickle
import tracemalloc
from pathlib import Path

import numpy as np

from medlatent.data import LatentStream
from medlatent.data.columns import StrColumn
from medlatent.data.labels import labels_from_rows
from medlatent.data.store import MANIFEST, LatentStore, _new_manifest, _sha256, _Todo, _write_json, _write_shard
from medlatent.data.stream import numeric_labels
from medlatent.latentfile import SUFFIX, write_latent
from test_latent_store import _latent


def _big_store(root: Path, n: int, shard_size: int = 5000) -> Path:
    """``n`` items with the bytes of one small latent file (the index is what is measured), written by the store's
    own shard writer, with a categorical and a numeric label column."""
    src = write_latent(root / ("one" + SUFFIX), _latent(0, 16))
    data = src.read_bytes()
    cols = ["finding", "age"]
    todo = [_Todo(f"sub/case{i:07d}", src, len(data), _sha256(data), {"finding": "abc"[i % 3], "age": str(i % 90)})
            for i in range(n)]
    manifest = _new_manifest(cols)
    store = root / "store"
    store.mkdir()
    for k, a in enumerate(range(0, n, shard_size)):
        manifest["shards"].append(_write_shard(store, k, todo[a:a + shard_size], cols))
    _write_json(store / MANIFEST, manifest)
    return store


def test_index_held_in_few_bytes_per_item(tmp_path):
    n = 20_000
    store = _big_store(tmp_path, n)
    gc.collect()
    tracemalloc.start()
    try:
        st = LatentStore(store)
        stream = LatentStream(st, 64)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        blocks = sum(s.count for s in tracemalloc.take_snapshot().statistics("filename"))
    finally:
        tracemalloc.stop()
    # memory, not time: the same on any machine (~115 B and ~100 allocations here; a list of str names: > 200 B
    # and one allocation per item)
    assert held / n < 400, f"{held / n:.0f} B per item held by the store's index"
    assert blocks < n // 20, f"{blocks} allocations held for {n} items: Python objects per item"
    assert len(st) == n and st.names[n - 1] == f"sub/case{n - 1:07d}" and st.labels["age"][91] == "1"
    assert st.read_bytes(n - 1) == (tmp_path / ("one" + SUFFIX)).read_bytes()
    batch = next(iter(stream))
    assert batch["z"].shape == (64, 1, 4, 4) and batch["label"].shape == (64, 2)
    j = int(batch["index"][0])
    assert batch["label"][0].tolist() == ["abc".index("abc"[j % 3]), j % 90]


def test_columns_read_like_lists():
    names = ["a", "sub/b", "", "é/ü", "a"]
    col = StrColumn.from_strings(names)
    coded = StrColumn.from_strings(names, coded=True)
    parts = [StrColumn.from_strings(names[:2]), StrColumn.from_strings(names[2:])]
    mixed = [StrColumn.from_strings(names[:2]), StrColumn.from_strings(names[2:], coded=True)]
    for c in (col, coded, StrColumn.concat(parts), StrColumn.concat(mixed)):
        assert c == names and list(c) == names and len(c) == 5 and c[-2] == "é/ü" and c[1:3] == names[1:3]
        assert [c[np.int64(j)] for j in range(5)] == names and c.index("sub/b") == 1 and "é/ü" in c
        assert pickle.loads(pickle.dumps(c)) == c
    assert col != names[:4] and col != ["a", "sub/b", "", "e/u", "a"]
    assert coded.factorize()[0] == ["a", "sub/b", "", "é/ü"] and coded.factorize()[1].tolist() == [0, 1, 2, 3, 0]
    assert StrColumn.concat([]) == [] and StrColumn.from_strings([]) == []


def test_numeric_labels_as_from_rows(tmp_path):
    st = LatentStore(_big_store(tmp_path, 300, shard_size=70))
    columns, classes, values = numeric_labels(st)
    lab = labels_from_rows(columns, {str(j): {c: st.labels[c][j] for c in columns} for j in range(len(st))})
    assert classes == lab.classes == {"finding": ["a", "b", "c"]}
    assert values.tolist() == [lab.by_file[str(j)] for j in range(len(st))]
    assert st.layout(5) == ("F16", (1, 4, 4), st.layout(5)[2]) and st.layout(5, "stage2") is None
