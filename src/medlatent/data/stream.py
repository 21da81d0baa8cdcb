"""Batches streamed from a latent store, for training loops that need the latent and its label only.

:class:`~medlatent.data.LatentDataset` reads one item per ``__getitem__`` and builds its metadata; at 10⁴–10⁵
small latents per second that Python work per item is the limit. Here a store is cut into *windows* of
consecutive items of one shard; each window is one ``pread`` of contiguous bytes, every item's SHA-256 is
checked against the index, and the items, shuffled within the window, go out in batches whose tensors are
gathered by the byte offsets the index records (no metadata parsed). Windows are dealt out,
disjointly and covering the store, to torchrun ranks and then DataLoader workers; with ``shuffle`` their order
is a seeded permutation per epoch. A worker writes each batch's latent bytes (stored dtype) into shared memory it
reuses and the main process builds the batch from them (:mod:`medlatent.data.handoff`). Memory per reader: one
window plus the batches in flight, whatever the store's size. A store given by fsspec URL is read in place, one
ranged read per window (:mod:`medlatent.data.remote`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from medlatent.data.handoff import hand_over
from medlatent.data.store import _TORCH_DTYPES, LatentStore
from medlatent.latentfile import LatentFileError

DEFAULT_WINDOW = 1024  # items per read: ~10 MB of 64×64 float16 latents
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def numeric_labels(store: LatentStore, label_columns: Sequence[str] | None = None,
                   ) -> tuple[list[str], dict[str, list[str]], np.ndarray | None]:
    """The store's packed labels as numbers, as :class:`~medlatent.data.LatentDataset` gives them: numeric columns
    stay numbers, others become class indices (sorted names). Returns (columns, classes, ``N×k`` float64 or
    ``None`` without labels)."""
    from medlatent.data.labels import _is_number

    columns = list(label_columns or store.label_columns)
    missing = [c for c in columns if c not in store.label_columns]
    if missing:
        raise ValueError(f"{store.root}: label column(s) {', '.join(missing)} not in the store (columns: "
                         f"{', '.join(store.label_columns) or 'none'})")
    if not columns:
        return [], {}, None
    # as labels_from_rows, on each column's distinct values (no Python object per item)
    classes: dict[str, list[str]] = {}
    out = np.zeros((len(store), len(columns)), dtype=np.float64)
    for i, c in enumerate(columns):
        uniq, codes = store.labels[c].factorize()
        if all(_is_number(u) for u in uniq):
            values = [float(u) for u in uniq]
        else:
            classes[c] = sorted(set(uniq))
            rank = {v: float(r) for r, v in enumerate(classes[c])}
            values = [rank[u] for u in uniq]
        out[:, i] = np.asarray(values, dtype=np.float64)[codes]
    return columns, classes, out


def windows(store: LatentStore, window: int = DEFAULT_WINDOW) -> list[tuple[int, int]]:
    """``(first, end)`` item ranges of at most ``window`` consecutive items, never across a shard's end."""
    out = []
    shard = store._shard
    bounds = np.flatnonzero(np.diff(shard)) + 1 if len(shard) else np.zeros(0, dtype=np.int64)
    for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(shard)]):
        out += [(a, min(a + window, hi)) for a in range(lo, hi, window)]
    return out


def _read_window(store: LatentStore, lo: int, hi: int, tensor: str, buf: list[bytearray],
                 order: np.ndarray | None = None) -> tuple[list[memoryview], tuple[str, tuple[int, ...]]]:
    """Items ``lo``..``hi-1`` (one shard, consecutive): one read into ``buf[0]`` (reused between windows; a larger
    one replaces it when needed), each item's bytes checked against its SHA-256, then views of each item's tensor
    bytes in ``order`` (positions in the window; default: as stored), found by the offsets the index records, and
    their layout (safetensors dtype code, shape). The views are valid until ``buf[0]`` is read into again."""
    first, last = int(store._offset[lo]), int(store._offset[hi - 1] + store._size[hi - 1])
    if len(buf[0]) < last - first:
        buf[0] = bytearray(last - first)
    view = memoryview(buf[0])[: last - first]
    got = store.read_into(int(store._shard[lo]), first, view)
    offs = (store._offset[lo:hi] - first).tolist()
    sizes = store._size[lo:hi].tolist()
    digests = b"".join(hashlib.sha256(view[o:o + s]).digest() for o, s in zip(offs, sizes)) \
        if got == last - first else b""
    if digests != store._digest[lo:hi].tobytes():
        bad = next((lo + i for i in range(hi - lo) if digests[32 * i:32 * i + 32] != store._digest[lo + i].tobytes()),
                   lo)
        raise store.damaged(bad)
    codes = store._layout[tensor][0][lo:hi]
    if codes[0] < 0 or (codes != codes[0]).any():
        _explain_layout(store, lo, hi, tensor)
    kind = store._kinds[codes[0]]
    dt, shape = kind
    nbytes = math.prod(shape) * _ITEMSIZE[dt]
    starts = store._layout[tensor][1][lo:hi] + (store._offset[lo:hi] - first)
    if order is not None:
        starts = starts[order]
    return [view[a:a + nbytes] for a in starts.tolist()], kind


def _explain_layout(store: LatentStore, lo: int, hi: int, tensor: str) -> None:
    codes = store._layout[tensor][0]
    unknown = next((j for j in range(lo, hi) if codes[j] < 0), None)
    if unknown is not None:
        raise LatentFileError(store.where(unknown), f"the store's index records no {tensor!r} tensor for it (the "
                                                    f"item has none, or the store was packed by an older "
                                                    "medlatent: unpack and pack it again, or read it with "
                                                    "LatentDataset)")
    other = next(j for j in range(lo, hi) if codes[j] != codes[lo])
    kind_other, kind_lo = store._kinds[codes[other]], store._kinds[codes[lo]]
    raise LatentFileError(store.where(other), f"{tensor} is {kind_other}, {store.where(lo)} is {kind_lo}: "
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
    for chunks, kind, index, label in _batches(store, batch_size, tensor, labels, shuffle, seed, epoch, part, window,
                                               drop_last, class_index):
        yield _assemble(bytearray().join(chunks), tensor, kind, index, label, dtype)


def _batches(store: LatentStore, batch_size: int, tensor: str, labels: np.ndarray | None, shuffle: bool, seed: int,
             epoch: int, part: tuple[int, int], window: int, drop_last: bool, class_index: bool,
             ) -> Iterator[tuple[list[bytes | memoryview], tuple[str, tuple[int, ...]], np.ndarray, np.ndarray | None]]:
    """:func:`iter_batches` before the batches become tensors: per batch, the bytes of its items' tensors (views
    of the window's buffer, valid until the next batch is asked for), their layout, store positions and labels."""
    k, n = part
    units = windows(store, window)
    order = (torch.randperm(len(units), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
             if shuffle else range(len(units)))
    mine = [units[u] for u in list(order)[k::n]]
    rng = np.random.default_rng([seed, epoch, k, n])
    buf = [bytearray()]
    pending: list[bytes | memoryview] = []  # items of the windows so far that did not fill a batch
    pending_idx, pending_kind = np.zeros(0, dtype=np.int64), None
    for lo, hi in mine:
        perm = rng.permutation(hi - lo) if shuffle else None
        views, kind = _read_window(store, lo, hi, tensor, buf, perm)
        idx = np.arange(lo, hi) if perm is None else lo + perm
        if pending and kind != pending_kind:
            _mixed(store, int(pending_idx[0]), pending_kind, lo, kind, tensor)
        items = pending + views
        ids = np.concatenate([pending_idx, idx]) if pending else idx
        full = len(items) // batch_size * batch_size
        for a in range(0, full, batch_size):
            yield items[a:a + batch_size], kind, ids[a:a + batch_size], _labels(labels, ids[a:a + batch_size],
                                                                                  class_index)
        pending = [bytes(v) for v in items[full:]]  # copied: the next window is read into the same buffer
        pending_idx, pending_kind = ids[full:], kind
    if pending and not drop_last:
        yield pending, pending_kind, pending_idx, _labels(labels, pending_idx, class_index)  # type: ignore[misc]


def _labels(labels: np.ndarray | None, index: np.ndarray, class_index: bool) -> np.ndarray | None:
    if labels is None:
        return None
    lab = labels[index]
    return (lab[:, 0] if lab.shape[1] == 1 else lab).astype(np.int64 if class_index else np.float32)


def _assemble(data: bytearray, tensor: str, kind: tuple[str, tuple[int, ...]], index: np.ndarray,
              label: np.ndarray | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A batch ``{tensor: B×C×… in dtype (None: as stored), "index": B, "label": …}`` from its tensors' bytes
    (stored dtype, item after item; the tensor views them when no conversion is asked for)."""
    dt, shape = kind
    z = torch.frombuffer(data, dtype=getattr(torch, _TORCH_DTYPES[dt])).reshape(len(index), *shape)
    out = {tensor: z if dtype is None else z.to(dtype), "index": torch.from_numpy(index)}
    if label is not None:
        out["label"] = torch.from_numpy(label)
    return out


def _mixed(store: LatentStore, a: int, kind_a: Any, b: int, kind_b: Any, tensor: str) -> None:
    raise LatentFileError(store.where(b), f"{tensor} is {kind_b}, {store.where(a)} is {kind_a}: batches need one "
                                          "latent shape and dtype; use LatentDataset with a resizing transform for "
                                          "mixed sizes")


class LatentStream(IterableDataset):
    """A latent store as an ``IterableDataset`` of batches: use ``DataLoader(stream, batch_size=None,
    num_workers=W)``. Each epoch (:meth:`set_epoch`), the store's windows are dealt to torchrun ranks
    (``WORLD_SIZE``/``RANK`` or the process group) and then to the DataLoader workers, so every item is read by
    exactly one worker of one rank; ranks get equal numbers of windows ±1 (``⌈windows/world⌉`` at most).

    From DataLoader workers, a batch's latents leave as their stored bytes through shared memory that each worker
    reuses (:mod:`medlatent.data.handoff`), and the main process builds the batch dictionary as it receives it
    (converting to ``dtype`` there: float16 latents cross as half the bytes). That needs the DataLoader's own
    ``collate_fn`` (``batch_size=None``) and the stream as its dataset; wrapped in another dataset, or with
    ``handoff=False``, workers return the batch dictionaries, which PyTorch moves into new shared memory per
    tensor (slower for small latents).

    Args:
        store: a store folder, its fsspec URL (``s3://…``; :mod:`medlatent.data.remote`), or an open
            :class:`LatentStore` (e.g. one opened with ``storage_options``).
        label_columns: packed label columns to give as ``label`` (default: all the store has; ``[]``: none).
            As LatentDataset: with one column, ``label`` is ``B`` int64 class indices (a categorical column,
            names in :attr:`classes`) or float32; with several, ``B×k`` float32.
        handoff: from DataLoader workers, hand batches over through reused shared memory (see above).
        Others: as :func:`iter_batches`.
    """

    def __init__(self, store: str | Path | LatentStore, batch_size: int, *, tensor: str = "z",
                 label_columns: Sequence[str] | None = None, shuffle: bool = True, seed: int = 0,
                 window: int = DEFAULT_WINDOW, dtype: torch.dtype | None = torch.float32,
                 drop_last: bool = False, handoff: bool = True) -> None:
        self.store = store if isinstance(store, LatentStore) else LatentStore(store)
        if label_columns is not None and not label_columns:
            self.label_columns, self.classes, self._labels = [], {}, None
        else:
            self.label_columns, self.classes, self._labels = numeric_labels(self.store, label_columns)
        self.batch_size, self.tensor, self.shuffle, self.seed = batch_size, tensor, shuffle, seed
        self.window, self.dtype, self.drop_last, self.epoch = window, dtype, drop_last, 0
        self.handoff = handoff

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        from medlatent.data.latents import _world_and_rank

        world, rank = _world_and_rank()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        batches = _batches(self.store, self.batch_size, self.tensor, self._labels, self.shuffle, self.seed,
                           self.epoch, (rank * workers + worker, world * workers), self.window, self.drop_last,
                           len(self.label_columns) == 1 and self.label_columns[0] in self.classes)
        if info is None or not self.handoff or info.dataset is not self:
            return (_assemble(bytearray().join(chunks), self.tensor, kind, index, label, self.dtype)
                    for chunks, kind, index, label in batches)
        # the DataLoader's worker, with this stream as its dataset: the bytes go to the main process through
        # shared memory, and the batch is assembled (and converted to dtype) there
        return hand_over((chunks, sum(map(len, chunks)), _assemble, (self.tensor, kind, index, label, self.dtype))
                         for chunks, kind, index, label in batches)
