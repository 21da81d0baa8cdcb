"""Batches streamed from a latent store, for training loops that need the latent and its label only.

:class:`~medlatent.data.LatentDataset` reads one item per ``__getitem__`` and builds its metadata; at 10⁴–10⁵
small latents per second that Python work per item is the limit. Here a store is cut into *windows* of
consecutive items of one shard; each window is one ``pread`` of contiguous bytes, every item's SHA-256 is
checked against the index, and the window's tensors are gathered into one array by the byte offsets the index
records (no metadata parsed), shuffled within the window and emitted in batches. Windows are dealt out,
disjointly and covering the store, to torchrun ranks and then DataLoader workers; with ``shuffle`` their order
is a seeded permutation per epoch. Memory per reader: one window plus one batch, whatever the store's size.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from medlatent.data.store import _TORCH_DTYPES, LatentStore
from medlatent.latentfile import LatentFileError

DEFAULT_WINDOW = 1024  # items per read: ~10 MB of 64×64 float16 latents


def numeric_labels(store: LatentStore, label_columns: Sequence[str] | None = None,
                   ) -> tuple[list[str], dict[str, list[str]], np.ndarray | None]:
    """The store's packed labels as numbers, as :class:`~medlatent.data.LatentDataset` gives them: numeric columns
    stay numbers, others become class indices (sorted names). Returns (columns, classes, ``N×k`` float64 or
    ``None`` without labels)."""
    from medlatent.data.labels import labels_from_rows

    columns = list(label_columns or store.label_columns)
    missing = [c for c in columns if c not in store.label_columns]
    if missing:
        raise ValueError(f"{store.root}: label column(s) {', '.join(missing)} not in the store (columns: "
                         f"{', '.join(store.label_columns) or 'none'})")
    if not columns:
        return [], {}, None
    raw = {str(j): {c: store.labels[c][j] for c in columns} for j in range(len(store))}
    lab = labels_from_rows(columns, raw)
    return columns, lab.classes, np.array([lab.by_file[str(j)] for j in range(len(store))], dtype=np.float64)


def windows(store: LatentStore, window: int = DEFAULT_WINDOW) -> list[tuple[int, int]]:
    """``(first, end)`` item ranges of at most ``window`` consecutive items, never across a shard's end."""
    out = []
    shard = store._shard
    bounds = np.flatnonzero(np.diff(shard)) + 1 if len(shard) else np.zeros(0, dtype=np.int64)
    for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(shard)]):
        out += [(a, min(a + window, hi)) for a in range(lo, hi, window)]
    return out


def _read_window(store: LatentStore, lo: int, hi: int, tensor: str, buf: bytearray,
                 order: np.ndarray | None = None) -> np.ndarray:
    """Items ``lo``..``hi-1`` (one shard, consecutive) as one ``n×…`` array of the stored dtype, in ``order``
    (positions in the window; default: as stored): one read into ``buf`` (reused between windows, grown as
    needed), each item's bytes checked against its SHA-256, tensors gathered by the offsets the index records."""
    first, last = int(store._offset[lo]), int(store._offset[hi - 1] + store._size[hi - 1])
    if len(buf) < last - first:
        buf.extend(bytes(last - first - len(buf)))
    view = memoryview(buf)[: last - first]
    got = os.preadv(store._fd(int(store._shard[lo])), [view], first)
    offs = (store._offset[lo:hi] - first).tolist()
    sizes = store._size[lo:hi].tolist()
    digests = b"".join(hashlib.sha256(view[o:o + s]).digest() for o, s in zip(offs, sizes)) \
        if got == last - first else b""
    if digests != store._digest[lo:hi].tobytes():
        bad = next((lo + i for i in range(hi - lo) if digests[32 * i:32 * i + 32] != store._digest[lo + i].tobytes()),
                   lo)
        raise LatentFileError(store.where(bad), "bytes do not match the SHA-256 in the store's index (shard damaged "
                                                "or truncated); run verify on the store")
    kinds = store._layout[tensor][0][lo:hi]
    if kinds[0] is None or any(k is not kinds[0] for k in kinds):
        _explain_layout(store, lo, hi, tensor)
    dt, shape = kinds[0]
    dtype = np.dtype(_TORCH_DTYPES[dt]) if dt != "BF16" else np.dtype(np.uint16)  # bf16: bits, viewed in torch
    nbytes = math.prod(shape) * dtype.itemsize
    starts = store._layout[tensor][1][lo:hi] + (store._offset[lo:hi] - first)
    if order is not None:
        starts = starts[order]
    gathered = bytearray().join([view[a:a + nbytes] for a in starts.tolist()])  # one copy per item, in C
    return np.frombuffer(gathered, dtype=dtype).reshape(hi - lo, *shape)


def _explain_layout(store: LatentStore, lo: int, hi: int, tensor: str) -> None:
    kinds = store._layout[tensor][0]
    unknown = next((j for j in range(lo, hi) if kinds[j] is None), None)
    if unknown is not None:
        raise LatentFileError(store.where(unknown), f"the store's index records no {tensor!r} tensor for it (the "
                                                    f"item has none, or the store was packed by an older "
                                                    "medlatent: unpack and pack it again, or read it with "
                                                    "LatentDataset)")
    other = next(j for j in range(lo, hi) if kinds[j] is not kinds[lo])
    raise LatentFileError(store.where(other), f"{tensor} is {kinds[other]}, {store.where(lo)} is {kinds[lo]}: "
                                              "batches need one latent shape and dtype; use LatentDataset with a "
                                              "resizing transform for mixed sizes")


def iter_batches(store: LatentStore, batch_size: int, *, tensor: str = "z", labels: np.ndarray | None = None,
                 shuffle: bool = True, seed: int = 0, epoch: int = 0, part: tuple[int, int] = (0, 1),
                 window: int = DEFAULT_WINDOW, dtype: torch.dtype | None = torch.float32,
                 drop_last: bool = False, class_index: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{tensor: B×C×…, "label": B[×k], "index": B}`` of the windows ``part = (k, n)`` takes.

    Args:
        labels: ``N`` or ``N×k`` numbers per store item (:func:`numeric_labels`); absent: no ``label``.
        part: this reader's share: windows ``perm[k::n]`` of the epoch's window order (the same on every reader).
        dtype: the tensors' dtype (default float32, as LatentDataset gives); ``None``: as stored.
        drop_last: leave out a last batch smaller than ``batch_size``.
        class_index: one label column of class indices: ``label`` as int64 (else float32).

    ``index`` is each item's position in the store (its name is ``store.names[index]``).
    """
    k, n = part
    units = windows(store, window)
    order = (torch.randperm(len(units), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
             if shuffle else range(len(units)))
    mine = [units[u] for u in list(order)[k::n]]
    rng = np.random.default_rng([seed, epoch, k, n])
    buf = bytearray()
    carry: tuple[np.ndarray, np.ndarray] | None = None  # items of the last window short of a batch
    for lo, hi in mine:
        order = rng.permutation(hi - lo) if shuffle else None
        z = _read_window(store, lo, hi, tensor, buf, order)
        idx = np.arange(lo, hi) if order is None else lo + order
        start = 0
        if carry is not None:
            start = min(batch_size - len(carry[0]), hi - lo)
            z0, i0 = np.concatenate([carry[0], z[:start]]), np.concatenate([carry[1], idx[:start]])
            carry = None
            if len(z0) < batch_size:
                carry = (z0, i0)
                continue
            yield _batch(z0, i0, tensor, labels, dtype, class_index)
        full = start + (hi - lo - start) // batch_size * batch_size
        for a in range(start, full, batch_size):
            yield _batch(z[a:a + batch_size], idx[a:a + batch_size], tensor, labels, dtype, class_index)
        if full < hi - lo:
            carry = (z[full:].copy(), idx[full:])
    if carry is not None and not drop_last:
        yield _batch(*carry, tensor, labels, dtype, class_index)


def _batch(z: np.ndarray, idx: np.ndarray, tensor: str, labels: np.ndarray | None, dtype: torch.dtype | None,
           class_index: bool) -> dict[str, torch.Tensor]:
    t = torch.from_numpy(z)
    if z.dtype == np.uint16:
        t = t.view(torch.bfloat16)
    out = {tensor: t if dtype is None else t.to(dtype), "index": torch.from_numpy(idx)}
    if labels is not None:
        lab = labels[idx]
        lab_t = torch.from_numpy(lab[:, 0] if lab.shape[1] == 1 else lab)
        out["label"] = lab_t.long() if class_index else lab_t.float()
    return out


class LatentStream(IterableDataset):
    """A latent store as an ``IterableDataset`` of batches: use ``DataLoader(stream, batch_size=None,
    num_workers=W)``. Each epoch (:meth:`set_epoch`), the store's windows are dealt to torchrun ranks
    (``WORLD_SIZE``/``RANK`` or the process group) and then to the DataLoader workers, so every item is read by
    exactly one worker of one rank; ranks get equal numbers of windows ±1 (``⌈windows/world⌉`` at most).

    Args:
        store: a store folder (or an open :class:`LatentStore`).
        label_columns: packed label columns to give as ``label`` (default: all the store has; ``[]``: none).
            As LatentDataset: with one column, ``label`` is ``B`` int64 class indices (a categorical column,
            names in :attr:`classes`) or float32; with several, ``B×k`` float32.
        Others: as :func:`iter_batches`.
    """

    def __init__(self, store: str | Path | LatentStore, batch_size: int, *, tensor: str = "z",
                 label_columns: Sequence[str] | None = None, shuffle: bool = True, seed: int = 0,
                 window: int = DEFAULT_WINDOW, dtype: torch.dtype | None = torch.float32,
                 drop_last: bool = False) -> None:
        self.store = store if isinstance(store, LatentStore) else LatentStore(store)
        if label_columns is not None and not label_columns:
            self.label_columns, self.classes, self._labels = [], {}, None
        else:
            self.label_columns, self.classes, self._labels = numeric_labels(self.store, label_columns)
        self.batch_size, self.tensor, self.shuffle, self.seed = batch_size, tensor, shuffle, seed
        self.window, self.dtype, self.drop_last, self.epoch = window, dtype, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from medlatent.data.latents import _world_and_rank

        world, rank = _world_and_rank()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return iter_batches(self.store, self.batch_size, tensor=self.tensor, labels=self._labels,
                            shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                            part=(rank * workers + worker, world * workers), window=self.window, dtype=self.dtype,
                            drop_last=self.drop_last,
                            class_index=len(self.label_columns) == 1 and self.label_columns[0] in self.classes)
