"""Batches of a latent store leaving DataLoader workers: the bytes of the stored tensor travel as they are (half of
float32 for float16 latents) through reused shared-memory slots and become the batch dictionary, converted to the
asked dtype, in the process that receives them; the same batches as read in one process, writable, whatever the
window and batch boundaries; a slot is written again only after its batch was read out."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from medlatent.data import LatentDataset, LatentStream, handoff, iter_batches
from medlatent.data.handoff import hand_over
from medlatent.data.store import LatentStore, pack
from medlatent.data.stream import _assemble, _batches
from medlatent.latentfile import SUFFIX, LatentFileError, write_latent
from test_latent_store import _latent
from test_latent_stream import _store


def _epoch(stream: LatentStream, workers: int) -> dict[int, dict[str, torch.Tensor]]:
    """Every item the loader gives, by store position: its tensor and label, and the batch's dtypes."""
    out = {}
    for b in DataLoader(stream, batch_size=None, num_workers=workers):
        assert b["index"].dtype == torch.int64 and len(b["index"]) <= stream.batch_size
        for i, j in enumerate(b["index"].tolist()):
            assert j not in out
            out[j] = {k: v[i] for k, v in b.items() if k != "index"}
    return out


@pytest.mark.parametrize("dtype", [torch.float32, None, torch.bfloat16])
def test_worker_batches_equal_in_process_batches(tmp_path, dtype):
    store = _store(tmp_path, n=23, shard_size=10)
    stream = LatentStream(store, 4, window=3, seed=3, dtype=dtype)
    here, there = _epoch(stream, 0), _epoch(stream, 2)
    assert sorted(here) == sorted(there) == list(range(23))
    full = LatentDataset(store)
    for j, item in there.items():
        assert item["z"].dtype == (dtype or torch.float16) and item["label"].dtype == torch.int64
        assert torch.equal(item["z"], here[j]["z"]) and item["label"] == here[j]["label"]
        assert torch.equal(item["z"].float(), full[j]["z"].to(dtype or torch.float16).float())


def _echo(data: bytearray, k: int) -> tuple[bytearray, int]:
    return data, k


def _reused_buffer_batches(n: int):
    """``n`` batches whose chunks are views of one buffer that is overwritten for the next batch."""
    buf = bytearray(16)
    for k in range(n):
        buf[:] = bytes([k]) * 16
        yield [memoryview(buf)[:5], memoryview(buf)[5:]], 16, _echo, (k,)


@pytest.mark.parametrize("memfd", [True, False])
def test_handoff_gives_each_batch_its_own_bytes(monkeypatch, memfd):
    if not memfd:  # as where there is no memfd: the bytes go pickled
        monkeypatch.setattr(handoff.os, "memfd_create", lambda *a: (_ for _ in ()).throw(OSError("no memfd")))
    # all six in flight at once (the receiver reads none before the last is written): six slots
    sent = [pickle.dumps(h, protocol=4) for h in hand_over(_reused_buffer_batches(6))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = [pickle.loads(m) for m in sent]
    assert got == [(bytearray([k]) * 16, k) for k in range(6)]
    assert all(type(d) is bytearray for d, _ in got)  # writable memory of the receiver's own
    # received one by one: two slots (one batch of lookahead), reused
    slots = set()
    for k, h in enumerate(hand_over(_reused_buffer_batches(7))):
        if memfd:
            slots.add(h.slot)
        assert pickle.loads(pickle.dumps(h, protocol=4)) == (bytearray([k]) * 16, k)
    assert slots == ({0, 1} if memfd else set())
    assert not handoff._received  # the last batch closed the slots' descriptors


def test_handoff_bytes_are_the_stored_latents(tmp_path):
    """A batch of float16 latents crosses as its float16 bytes and arrives as float32 (the default dtype)."""
    store = _store(tmp_path, n=12, shard_size=12, labelled=False)
    stream = LatentStream(store, 8, label_columns=[], shuffle=False)
    raw = next(iter(LatentStream(store, 8, label_columns=[], shuffle=False, dtype=None)))["z"]
    batches = _batches(stream.store, 8, "z", None, False, 0, 0, (0, 1), 64, False, False)
    handed = hand_over((c, sum(map(len, c)), _assemble, ("z", kind, i, lab, torch.float32))
                       for c, kind, i, lab in batches)
    first = next(handed)
    assert first.nbytes == raw.numel() * 2
    got = pickle.loads(pickle.dumps(first, protocol=4))
    assert got["z"].dtype == torch.float32 and torch.equal(got["z"], raw.float())
    assert got["index"].tolist() == list(range(8))
    handed.close()


class _Doubled(IterableDataset):
    """A dataset around a stream, changing its batches in the worker."""

    def __init__(self, stream: LatentStream) -> None:
        self.stream = stream

    def __iter__(self):
        for b in self.stream:
            yield {**b, "z2": b["z"] * 2}


def test_wrapped_stream_and_handoff_off_give_dictionaries(tmp_path):
    store = _store(tmp_path, n=11, shard_size=5)
    ref = _epoch(LatentStream(store, 3, window=4), 2)
    off = _epoch(LatentStream(store, 3, window=4, handoff=False), 2)
    assert off.keys() == ref.keys() and all(torch.equal(off[j]["z"], ref[j]["z"]) for j in ref)
    seen = []
    for b in DataLoader(_Doubled(LatentStream(store, 3, window=4)), batch_size=None, num_workers=2):
        assert torch.equal(b["z2"], b["z"] * 2)
        seen += b["index"].tolist()
    assert sorted(seen) == list(range(11))


def test_multi_column_labels_in_workers(tmp_path):
    for i in range(9):
        write_latent(tmp_path / "lat" / (f"c{i}" + SUFFIX), _latent(i))
    (tmp_path / "labels.csv").write_text("name,age,score\n" + "".join(f"c{i},{30 + i},{i / 4}\n" for i in range(9)))
    pack(tmp_path / "lat", tmp_path / "store", tmp_path / "labels.csv", shard_size=4)
    got = _epoch(LatentStream(tmp_path / "store", 2, window=3), 2)
    names = LatentStore(tmp_path / "store").names
    for j, item in got.items():
        i = int(names[j][1:])
        assert item["label"].dtype == torch.float32 and item["label"].tolist() == [30 + i, i / 4]


def test_batches_across_windows_need_one_shape(tmp_path):
    for i, size in enumerate([32, 32, 64, 64]):
        write_latent(tmp_path / "lat" / (f"c{i}" + SUFFIX), _latent(i, size=size))
    pack(tmp_path / "lat", tmp_path / "store", shard_size=2)  # one shape per shard
    st = LatentStore(tmp_path / "store")
    sizes = [b["z"].shape for b in iter_batches(st, 2, shuffle=False)]
    assert sizes == [(2, 1, 8, 8), (2, 1, 16, 16)]  # each batch within one shard: fine
    with pytest.raises(LatentFileError, match=r"c2.latent.safetensors: z is .*:c0.latent.safetensors is .* one latent"):
        list(iter_batches(st, 3, shuffle=False))  # a batch would take items of both


def test_every_batch_size_and_window(tmp_path):
    store = _store(tmp_path, n=17, shard_size=6, labelled=False)
    st = LatentStore(store)
    ref = torch.stack([st.read_tensor(j) for j in range(len(st))])
    for batch_size in (1, 4, 5, 17, 40):
        for window in (1, 4, 6, 100):
            batches = list(iter_batches(st, batch_size, window=window, shuffle=False, dtype=None))
            assert [len(b["z"]) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
            assert torch.equal(torch.cat([b["z"] for b in batches]), ref)
            assert np.array_equal(torch.cat([b["index"] for b in batches]).numpy(), np.arange(17))


_RANK = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from medlatent.data import LatentStream

    dist.init_process_group("gloo")
    stream = LatentStream(sys.argv[2], 3, window=4, seed=5)
    seen = {}
    for epoch in range(2):
        stream.set_epoch(epoch)
        seen[epoch] = [j for b in DataLoader(stream, batch_size=None, num_workers=2) for j in b["index"].tolist()]
    with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as fh:
        json.dump(seen, fh)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_two_gloo_processes_with_workers_stream_each_item_once(tmp_path):
    store = _store(tmp_path, n=29, shard_size=8)
    (tmp_path / "rank.py").write_text(_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "rank.py"), str(tmp_path), str(store)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert a and b and set(a).isdisjoint(b) and sorted(a + b) == list(range(29))  # each item once per epoch
    assert ranks[0]["0"] + ranks[1]["0"] != ranks[0]["1"] + ranks[1]["1"]


def test_damaged_item_in_a_worker_is_named(tmp_path):
    store = _store(tmp_path, n=12, shard_size=12, labelled=False)
    shard = store / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[int(LatentStore(store)._offset[7]) + 300] ^= 0xFF
    shard.write_bytes(bytes(data))
    # PyTorch raises it again in the main process, as a LatentFileError holding the worker's message
    with pytest.raises(LatentFileError, match=r"(?s)LatentFileError.*shard-000000.tar:case007.latent.safetensors: "
                                              "bytes do not match"):
        list(DataLoader(LatentStream(store, 4, window=4), batch_size=None, num_workers=2))
