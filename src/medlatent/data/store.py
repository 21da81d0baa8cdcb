"""A sharded latent store: many latent files in a few tar shards, for archives and for training at scale.

Layout of a store folder::

    store.json                   format, label columns, and per shard: item count, bytes, SHA-256 of the tar
                                 and of its index
    shard-000000.tar             the latent files, bytes unchanged, as ``NAME.latent.safetensors`` members
    shard-000000.index.json      per item: name, offset and size of its bytes in the tar, their SHA-256, labels
                                 and where its tensors lie in them (dtype, shape, offset: reads without
                                 parsing the metadata, :mod:`medlatent.data.stream`)

A shard is a plain (POSIX pax) tar, so ``tar``, WebDataset or any streaming reader opens it; it is read front to
back by :func:`unpack` and :func:`verify` (local disk, NFS or object storage alike) and by offset, one item per
``pread``, by :class:`LatentStore` (what :class:`~medlatent.data.LatentDataset` uses for random access).

Writing: every input is checked in full (both digests of the latent file format) before anything is written;
shards are written under temporary names, flushed and renamed, then listed in ``store.json``, which is replaced
atomically. Shards are never changed once listed: appending writes new shards. A pack that was killed left at
most unlisted shard files, which the next :func:`pack` into the store removes and redoes (finished shards are
kept, and items already in the store are skipped), so a resumed pack gives the same store as an uninterrupted one.

Reading: each item's bytes are checked against the SHA-256 its shard's index recorded when they were packed
(after they passed every check of :func:`~medlatent.latentfile.read_latent`), so the per-read cost is one digest
instead of re-validating the metadata; :func:`verify` checks whole shards against ``store.json``. A store is also
read where it lies by fsspec URL (``LatentStore("s3://…")``: manifest and indexes whole, shards by byte range;
:mod:`medlatent.data.remote`); it is written on a local or network file system (copy it whole to object storage:
its shards never change once listed).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from medlatent.data.columns import StrColumn
from medlatent.data.remote import RemoteFolder, is_url
from medlatent.io.atomic import atomic_write, temporary_path
from medlatent.latentfile import SUFFIX, LatentFile, LatentFileError, latent_from_bytes

if TYPE_CHECKING:
    import torch

FORMAT = "medlatent-latent-store"
FORMAT_VERSION = 1
MANIFEST = "store.json"
DEFAULT_SHARD_SIZE = 10_000  # items: ~100 MB of small 2D latents
DEFAULT_SHARD_BYTES = 1 << 30  # a shard closes before it passes 1 GiB (large 3D latents)
_BLOCK = tarfile.BLOCKSIZE


class StoreError(ValueError):
    """A store cannot be written or read: bad input, a damaged shard, or a folder that is not a store."""


def is_store(path: str | Path | RemoteFolder) -> bool:
    """Whether ``path`` (a folder, or an fsspec URL: :mod:`medlatent.data.remote`) is a latent store: it holds
    ``store.json``."""
    if is_url(path) or isinstance(path, RemoteFolder):
        try:
            return (path if isinstance(path, RemoteFolder) else RemoteFolder(str(path))).exists(MANIFEST)
        except (OSError, ValueError):
            return False
    return (Path(path) / MANIFEST).is_file()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


#: tensors of a latent file whose place in the item's bytes the index records (reads without parsing the metadata)
TENSOR_NAMES = ("z", "stage2")
_TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _tensor_layout(data: bytes | memoryview) -> dict[str, tuple[str, list[int], int]]:
    """Per tensor of a latent file's bytes: safetensors dtype code, shape, and where its data start in the bytes.

    A safetensors file is an 8-byte header length, the JSON header (dtype, shape and data offsets of each
    tensor, relative to the end of the header), then the data.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + n]))
    return {name: (header[name]["dtype"], list(header[name]["shape"]), 8 + n + header[name]["data_offsets"][0])
            for name in TENSOR_NAMES if name in header}


def _shard_names(k: int) -> tuple[str, str]:
    return f"shard-{k:06d}.tar", f"shard-{k:06d}.index.json"


# ------------------------------------------------------------------------------------------------ manifest
def _read_file(store: Path | RemoteFolder, name: str) -> tuple[str, bytes]:
    """A file of the store folder (local or by URL): how messages name it, and its bytes."""
    where = str(store / name) if isinstance(store, Path) else store.name(name)
    try:
        return where, (store / name).read_bytes() if isinstance(store, Path) else store.read(name)
    except OSError as e:
        raise StoreError(f"{where}: cannot be read ({e.strerror or e})") from e


def _read_manifest(store: Path | RemoteFolder) -> dict[str, Any]:
    path, data = _read_file(store, MANIFEST)
    try:
        m = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{path}: not a medlatent latent store manifest (format {m.get('format')!r})"
                         if isinstance(m, dict) else f"{path}: not a medlatent latent store manifest")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {m.get('format_version')!r} is not supported by this "
                         f"medlatent (up to {FORMAT_VERSION}); upgrade medlatent")
    shards, cols = m.get("shards"), m.get("label_columns")
    keys = {"tar", "index", "count", "bytes", "sha256", "index_sha256"}
    if not isinstance(shards, list) or not all(isinstance(s, dict) and keys <= set(s) for s in shards) \
            or not isinstance(cols, list) or not all(isinstance(c, str) for c in cols):
        raise StoreError(f"{path}: damaged manifest (needs label_columns and shards with {', '.join(sorted(keys))})")
    return m


def _new_manifest(label_columns: list[str]) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "label_columns": label_columns, "shards": []}


def _write_json(path: Path, obj: Any) -> bytes:
    data = (json.dumps(obj, indent=None, separators=(",", ":")) + "\n").encode()
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return data


@dataclass
class _Index:
    """One shard's index, columnar (compact to keep and quick to parse for 10⁵ items)."""

    names: list[str]
    offsets: list[int]
    sizes: list[int]
    sha256: list[str]
    labels: dict[str, list[str]]
    tensors: dict[str, dict[str, list]] = field(default_factory=dict)  # see _tensor_layout; absent in older stores


def _read_index(store: Path | RemoteFolder, entry: dict[str, Any], label_columns: list[str]) -> _Index:
    path, data = _read_file(store, entry["index"])
    if _sha256(data) != entry["index_sha256"]:
        raise StoreError(f"{path}: SHA-256 does not match {MANIFEST} (index damaged or edited)")
    d = json.loads(data)
    idx = _Index(d["names"], d["offsets"], d["sizes"], d["sha256"], d.get("labels", {}), d.get("tensors", {}))
    n = entry["count"]
    if not (len(idx.names) == len(idx.offsets) == len(idx.sizes) == len(idx.sha256) == n) \
            or sorted(idx.labels) != sorted(label_columns) or any(len(v) != n for v in idx.labels.values()) \
            or any(len(col) != n for t in idx.tensors.values() for col in t.values()):
        raise StoreError(f"{path}: does not list the {n} items {MANIFEST} says it holds, with their labels")
    return idx


# ------------------------------------------------------------------------------------------------- reading
def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _narrow(a: np.ndarray) -> np.ndarray:
    """``int32`` when the values fit (tensor starts: a header's length), else as given."""
    return a.astype(np.int32) if not len(a) or (a.min() >= -(1 << 31) and a.max() < (1 << 31)) else a


_Bytes = TypeVar("_Bytes", bytes, bytearray)


class LatentStore:
    """Random access to the items of a store, for :class:`~medlatent.data.LatentDataset`.

    Holds the index (names, offsets, sizes, digests, labels as written) in compact arrays and no open files
    when pickled: each process (DataLoader worker, torchrun rank) opens the shards it reads itself.

    Args:
        root: the store folder, or its fsspec URL (``s3://bucket/latents.store``, :mod:`medlatent.data.remote`):
            then the manifest and indexes are read whole, and shards by byte range, where they lie.
        storage_options: for a URL, the filesystem's options (credentials, endpoint …), as fsspec takes them.

    Raises:
        StoreError: a missing or damaged manifest or index (naming the file).
    """

    def __init__(self, root: str | Path, *, storage_options: dict[str, Any] | None = None) -> None:
        self.root: Path | str = str(root).rstrip("/") if is_url(root) else Path(root)
        self._remote = RemoteFolder(str(root), storage_options) if is_url(root) else None
        where = self._remote or Path(root)
        if not is_store(where):
            raise StoreError(f"{self.root}: not a latent store (no {MANIFEST})")
        m = _read_manifest(where)
        self.label_columns: list[str] = list(m["label_columns"])
        self.shard_tars: list[str] = [s["tar"] for s in m["shards"]]
        self.shard_files: list[Path | str] = [where / t if isinstance(where, Path) else where.name(t)
                                              for t in self.shard_tars]
        # per item only arrays and one buffer of names (no Python object per item: 10⁷ items fit in ~1 GB);
        # built shard by shard, so only one shard's parsed JSON is alive at a time
        names, shard, offsets, sizes, digests = [], [], [], [], []
        labels: dict[str, list[StrColumn]] = {c: [] for c in self.label_columns}
        kinds: dict[tuple, int] = {}  # (dtype code, *shape) → its number in self._kinds
        layout: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {t: ([], []) for t in TENSOR_NAMES}
        for k, entry in enumerate(m["shards"]):
            idx = _read_index(where, entry, self.label_columns)
            n = len(idx.names)
            names.append(StrColumn.from_strings(idx.names))
            shard.append(np.full(n, k, dtype=np.int32))
            offsets.append(np.asarray(idx.offsets, dtype=np.int64).reshape(n))
            sizes.append(np.asarray(idx.sizes, dtype=np.int64).reshape(n))
            digests.append(np.frombuffer(bytes.fromhex("".join(idx.sha256)), dtype=np.uint8).reshape(n, 32))
            for c in self.label_columns:
                labels[c].append(StrColumn.from_strings(idx.labels[c], coded=True))
            for t, (code, start) in layout.items():
                col = idx.tensors.get(t)  # older stores: unknown (-1), found by parsing the header when read
                code.append(np.fromiter((-1 if dt is None else kinds.setdefault((dt, *sh), len(kinds))
                                         for dt, sh in zip(col["dtype"], col["shape"])), dtype=np.int32, count=n)
                            if col else np.full(n, -1, dtype=np.int32))
                start.append(np.array([-1 if v is None else v for v in col["start"]], dtype=np.int64).reshape(n)
                             if col else np.full(n, -1, dtype=np.int64))
            del idx
        #: distinct tensor layouts (safetensors dtype code, shape); per tensor, each item's number here (-1: none
        #: or not recorded) and where the tensor's data start in the item's bytes
        self._kinds: list[tuple[str, tuple[int, ...]]] = [(key[0], tuple(key[1:])) for key in kinds]
        self._layout = {t: (_cat(code, np.int32), _narrow(_cat(start, np.int64)))
                        for t, (code, start) in layout.items()}
        self.names: StrColumn = StrColumn.concat(names)
        self.labels: dict[str, StrColumn] = {c: StrColumn.concat(v) for c, v in labels.items()}
        self._shard = _cat(shard, np.int32)
        self._offset = _cat(offsets, np.int64)
        self._size = _cat(sizes, np.int64)
        self._digest = np.concatenate(digests) if digests else np.zeros((0, 32), dtype=np.uint8)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                os.close(fd)

    def where(self, j: int) -> str:
        """How errors name item ``j``: ``SHARD.tar:NAME.latent.safetensors``."""
        return f"{self.shard_files[self._shard[j]]}:{self.names[j]}{SUFFIX}"

    def _fd(self, k: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent; open our own
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(k)
        if fd is None:
            try:
                fd = self._fds[k] = os.open(self.shard_files[k], os.O_RDONLY)
            except OSError as e:
                raise StoreError(f"{self.shard_files[k]}: cannot be opened ({e.strerror or e})") from e
        return fd

    def read_into(self, k: int, offset: int, buf: memoryview | bytearray) -> int:
        """Read shard ``k``'s bytes from ``offset`` into ``buf`` (as many as fit); returns how many were read."""
        if self._remote is None:
            return os.preadv(self._fd(k), [buf], offset)
        data = self._read_range(k, offset, len(buf))
        buf[: len(data)] = data
        return len(data)

    def _read_range(self, k: int, offset: int, size: int) -> bytes:
        if self._remote is None:
            return os.pread(self._fd(k), size, offset)
        try:
            return self._remote.read_range(self.shard_tars[k], offset, size)
        except OSError as e:
            raise StoreError(f"{self.shard_files[k]}: cannot be read ({e.strerror or e})") from e

    def read_bytes(self, j: int) -> bytes:
        """Item ``j``'s latent file, bit for bit, checked against its recorded SHA-256."""
        size = int(self._size[j])
        data = self._read_range(int(self._shard[j]), int(self._offset[j]), size)
        return self._checked(j, data, len(data))

    def _read_checked(self, j: int) -> bytearray:
        """Item ``j``'s bytes in a writable buffer (tensors can view it without a copy), digest checked."""
        buf = bytearray(int(self._size[j]))
        return self._checked(j, buf, self.read_into(int(self._shard[j]), int(self._offset[j]), buf))

    def _checked(self, j: int, data: _Bytes, got: int) -> _Bytes:
        """``data`` (``got`` bytes read of item ``j``) when they are the item's, by size and SHA-256."""
        if got != int(self._size[j]) or hashlib.sha256(data).digest() != self._digest[j].tobytes():
            raise self.damaged(j)
        return data

    def damaged(self, j: int) -> LatentFileError:
        """The error for item ``j`` whose bytes do not match the index (one message for every read path)."""
        return LatentFileError(self.where(j), "bytes do not match the SHA-256 in the store's index (shard damaged "
                                              "or truncated); run verify on the store")

    def layout(self, j: int, tensor: str = "z") -> tuple[str, tuple[int, ...], int] | None:
        """Where ``tensor`` lies in item ``j``'s bytes: (safetensors dtype code, shape, byte offset), from the
        index; ``None`` when the item has no such tensor, or the store was packed before indexes recorded it."""
        code, start = self._layout[tensor]
        return None if code[j] < 0 else (*self._kinds[code[j]], int(start[j]))

    def read_tensor(self, j: int, tensor: str = "z") -> "torch.Tensor":
        """Item ``j``'s ``z`` (or ``stage2``) as stored (e.g. float16 ``C×…``): one read, the SHA-256 check, and a
        view of the bytes; no metadata parsed when the index records the tensor's place (stores packed since)."""
        import torch

        buf = self._read_checked(j)
        where = self.layout(j, tensor)
        if where is None:  # an older index: the header tells
            try:
                lay = _tensor_layout(buf)
            except (ValueError, KeyError) as e:
                raise LatentFileError(self.where(j), f"damaged safetensors header ({e})") from e
            if tensor not in lay:
                raise LatentFileError(self.where(j), f"holds no {tensor!r} tensor")
            dt, shape, start = lay[tensor]
        else:
            dt, shape, start = where
        dtype = getattr(torch, _TORCH_DTYPES[dt])
        return torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)

    def load(self, j: int) -> LatentFile:
        """Item ``j`` as a :class:`LatentFile` (its bytes checked against the index, see the module docstring)."""
        data = self.read_bytes(j)
        try:
            return latent_from_bytes(data, "", checked=False)
        except LatentFileError as e:  # named here: building the name for every read costs more than the parse
            raise LatentFileError(self.where(j), str(e).removeprefix(": ")) from e


# ------------------------------------------------------------------------------------------------- writing
@dataclass
class PackReport:
    """What :func:`pack` did."""

    store: Path
    added: int = 0
    already: int = 0  # items the store held already (same bytes): a resumed pack, or a folder packed twice
    shards: list[str] = field(default_factory=list)  # shard files written
    discarded: list[str] = field(default_factory=list)  # unfinished shards of an interrupted pack, removed


@dataclass
class _Todo:
    name: str
    path: Path
    size: int
    sha256: str
    labels: dict[str, str]


@contextmanager
def _locked(store: Path) -> Iterator[None]:
    """One writer per store: a second pack fails at once instead of interleaving shards."""
    import fcntl

    with open(store / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreError(f"{store}: another pack is writing this store") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_target(store: Path) -> None:
    """A folder ``pack`` can write: new, empty (dot files aside) or a store; :class:`StoreError` otherwise."""
    if store.exists() and not store.is_dir():
        raise StoreError(f"{store}: exists and is not a folder; choose a new folder or an existing store")
    if store.is_dir() and not is_store(store) and any(not p.name.startswith(".") for p in store.iterdir()):
        raise StoreError(f"{store}: a folder that is not empty and is not a latent store (no {MANIFEST})")


@dataclass(frozen=True)
class ItemLabels:
    """Labels to pack, as written in a label CSV: ``rows[name][column]``, read by :func:`read_item_labels`."""

    source: str  # the CSV, for messages
    columns: list[str]
    rows: dict[str, dict[str, str]]


def read_item_labels(labels_csv: str | Path, items: Mapping[str, Sequence[str | Path]],
                     label_columns: Sequence[str] | None = None) -> ItemLabels:
    """The rows of a label CSV for ``items`` (item name → the files it was made from): a row names its item by
    ``name`` or by the ``path`` of one of those files, relative to the CSV (what :class:`~medlatent.data.
    LatentDataset` takes; :func:`pack` passes the latent files, ``encode --store`` the images).

    Raises:
        StoreError: the CSV does not fit the items (naming its line), or cannot be read.
    """
    from medlatent.data.labels import LatentDataError, read_label_rows

    files = {os.path.realpath(p): name for name, paths in items.items() for p in paths}
    try:
        wanted, rows = read_label_rows(Path(labels_csv), files, {n: n for n in items}, label_columns)
    except LatentDataError as e:
        raise StoreError(str(e)) from e
    return ItemLabels(str(labels_csv), wanted, rows)


def _inputs(latent_dir: Path, labels: str | Path | ItemLabels | None, label_columns: Sequence[str] | None,
            ) -> tuple[list[tuple[str, Path]], list[str], dict[str, dict[str, str]]]:
    """The latent files under ``latent_dir`` (dataset order) and their labels as written, keyed by name."""
    from medlatent.io.discover import find_latents

    if not latent_dir.is_dir():
        raise StoreError(f"{latent_dir}: {'no such folder' if not latent_dir.exists() else 'not a folder'}")
    found = find_latents([latent_dir])
    problems = found.failed + found.empty
    if problems:
        raise StoreError(f"{problems[0][0]}: {problems[0][1]}")
    items = [(it.name, it.paths[0]) for it in found.items]
    if labels is None:
        return items, [], {}
    if not isinstance(labels, ItemLabels):
        labels = read_item_labels(labels, {n: [p] for n, p in items}, label_columns)
    unlabelled = [p for n, p in items if n not in labels.rows]
    if unlabelled:
        raise StoreError(f"{labels.source}: {len(unlabelled)} latent file(s) have no label row (first: "
                         f"{unlabelled[0]}); every packed item needs its labels")
    return items, labels.columns, labels.rows


def _plan(items: list[tuple[str, Path]], labels: dict[str, dict[str, str]], held: dict[str, tuple[str, dict]],
          ) -> tuple[list[_Todo], int]:
    """Check every input in full; return those the store does not hold yet, and how many it holds already."""
    todo, already = [], 0
    for name, path in items:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StoreError(f"{path}: cannot be read ({e.strerror or e})") from e
        digest = _sha256(data)
        row = labels.get(name, {})
        if name in held:
            if held[name][0] != digest:
                raise StoreError(f"{path}: the store already holds an item {name!r} with other bytes; rename the "
                                 "file or pack it into another store")
            if held[name][1] != row:
                raise StoreError(f"{path}: the store already holds {name!r} with other labels ({held[name][1]})")
            already += 1
            continue
        latent_from_bytes(data, path, checked=True)  # LatentFileError naming the file
        todo.append(_Todo(name, path, len(data), digest, row))
    return todo, already


def _chunks(todo: list[_Todo], shard_size: int, shard_bytes: int) -> Iterator[list[_Todo]]:
    chunk: list[_Todo] = []
    size = 0
    for t in todo:
        member = _BLOCK * 3 + t.size  # header (+ a pax header for long names) and padding, at most
        if chunk and (len(chunk) >= shard_size or size + member > shard_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(t)
        size += member
    if chunk:
        yield chunk


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A member header that depends on the name and size only, so the same items give the same shard bytes."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def _write_shard(store: Path, k: int, chunk: list[_Todo], label_columns: list[str]) -> dict[str, Any]:
    """Write shard ``k`` under a temporary name, flush it and rename it; then its index. Returns its entry."""
    tar_name, index_name = _shard_names(k)
    offsets = []
    layouts: list[dict[str, tuple[str, list[int], int]]] = []
    tmp = temporary_path(store / tar_name)
    try:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for t in chunk:
                    data = t.path.read_bytes()
                    if _sha256(data) != t.sha256:
                        raise StoreError(f"{t.path}: changed while being packed; run pack again")
                    layouts.append(_tensor_layout(data))
                    tf.addfile(_tarinfo(t.name + SUFFIX, len(data)), io.BytesIO(data))
                    offsets.append(tf.offset - -(-len(data) // _BLOCK) * _BLOCK)  # data start: before its padding
            fh.flush()
            os.fsync(fh.fileno())
        digest, size = _file_sha256(tmp), tmp.stat().st_size
        os.replace(tmp, store / tar_name)
    finally:
        tmp.unlink(missing_ok=True)
    index = {"names": [t.name for t in chunk], "offsets": offsets, "sizes": [t.size for t in chunk],
             "sha256": [t.sha256 for t in chunk], "labels": {c: [t.labels[c] for t in chunk] for c in label_columns},
             "tensors": {name: {"dtype": [lay[name][0] if name in lay else None for lay in layouts],
                                "shape": [lay[name][1] if name in lay else None for lay in layouts],
                                "start": [lay[name][2] if name in lay else None for lay in layouts]}
                         for name in TENSOR_NAMES}}
    data = _write_json(store / index_name, index)
    return {"tar": tar_name, "index": index_name, "count": len(chunk), "bytes": size, "sha256": digest,
            "index_sha256": _sha256(data)}


def _discard_unfinished(store: Path, manifest: dict[str, Any]) -> list[str]:
    """Remove what an interrupted pack left: temporary files and shards ``store.json`` does not list."""
    listed = {s[key] for s in manifest["shards"] for key in ("tar", "index")}
    gone = []
    for p in sorted(store.iterdir()):
        unfinished = p.name.startswith(".tmp-") or (p.name.startswith("shard-") and p.name not in listed)
        if unfinished and p.is_file():
            p.unlink()
            gone.append(p.name)
    return gone


def _held(store: Path, manifest: dict[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """Name → (SHA-256, labels) of every item the store holds."""
    held = {}
    cols = manifest["label_columns"]
    for entry in manifest["shards"]:
        idx = _read_index(store, entry, cols)
        for j, name in enumerate(idx.names):
            held[name] = (idx.sha256[j], {c: idx.labels[c][j] for c in cols})
    return held


def check_label_columns(store: Path, columns: Sequence[str], source: str | Path) -> None:
    """:class:`StoreError` unless ``store`` (when it holds items) has these label columns: a store's items all have
    the same (``source``: what gave the columns, for the message)."""
    if is_store(store):
        _check_columns(store, _read_manifest(store), list(columns), source)


def _check_columns(store: Path, manifest: dict[str, Any], columns: list[str], source: str | Path) -> None:
    if manifest["shards"] and manifest["label_columns"] != columns:
        have = ", ".join(manifest["label_columns"]) or "no labels"
        raise StoreError(f"{source}: the store {store} has {have}; packing into it needs the same label columns "
                         f"(got {', '.join(columns) or 'no labels'})")


def pack(latent_dir: str | Path, store: str | Path, labels_csv: str | Path | ItemLabels | None = None, *,
         shard_size: int = DEFAULT_SHARD_SIZE, shard_bytes: int = DEFAULT_SHARD_BYTES,
         label_columns: Sequence[str] | None = None) -> PackReport:
    """Pack the latent files under ``latent_dir`` (recursively, dataset order) into ``store`` (new or existing).

    Into an existing store, items it holds already (same name and bytes) are skipped and the others go into new
    shards: that appends a folder, and resumes an interrupted pack of the same folder (see the module docstring).

    Args:
        labels_csv: a CSV as :class:`~medlatent.data.LatentDataset` takes (``path`` or ``name`` column), or
            labels read already (:func:`read_item_labels`); every item needs a row. Its label values are kept as
            written, and the dataset reads them from the store.
        shard_size: at most this many items per shard; ``shard_bytes``: a shard closes before passing this size.

    Raises:
        StoreError / LatentFileError: a bad input (naming the file), checked before anything is written; or a
            store that is damaged, not a store, or being written by another pack.
    """
    latent_dir, store = Path(latent_dir), Path(store)
    if shard_size < 1 or shard_bytes < 1:
        raise StoreError(f"shard size must be at least 1 item and 1 byte, got {shard_size} items, {shard_bytes} B")
    check_target(store)
    items, columns, labels = _inputs(latent_dir, labels_csv, label_columns)
    source = labels_csv.source if isinstance(labels_csv, ItemLabels) else labels_csv
    manifest = _read_manifest(store) if is_store(store) else _new_manifest(columns)
    _check_columns(store, manifest, columns, source or latent_dir)
    todo, already = _plan(items, labels, _held(store, manifest))
    store.mkdir(parents=True, exist_ok=True)
    report = PackReport(store, already=already)
    with _locked(store):
        manifest = _read_manifest(store) if is_store(store) else manifest  # as it is now that we hold the lock
        if not manifest["shards"]:
            manifest["label_columns"] = columns
        report.discarded = _discard_unfinished(store, manifest)
        held = _held(store, manifest)
        todo = [t for t in todo if t.name not in held]  # packed meanwhile by a pack that finished first
        for chunk in _chunks(todo, shard_size, shard_bytes):
            entry = _write_shard(store, len(manifest["shards"]), chunk, columns)
            manifest["shards"].append(entry)
            _write_json(store / MANIFEST, manifest)  # the shard is finished once listed here
            report.shards.append(entry["tar"])
            report.added += len(chunk)
        if not is_store(store):  # nothing to add to a new store: still a valid, empty store
            _write_json(store / MANIFEST, manifest)
    return report


# ---------------------------------------------------------------------------------------- verify, unpack
def verify(store: str | Path) -> list[str]:
    """Check every shard against ``store.json`` (SHA-256 and size) and its index (tar members, offsets, sizes
    and per-item SHA-256), reading each shard front to back once. Returns the problems, one line each (empty:
    the store is intact).

    Raises:
        StoreError: ``store`` is not a readable store (no or a damaged manifest).
    """
    store = Path(store)
    if not is_store(store):
        raise StoreError(f"{store}: not a latent store (no {MANIFEST})")
    manifest = _read_manifest(store)
    problems = []
    for entry in manifest["shards"]:
        path = store / entry["tar"]
        try:
            idx = _read_index(store, entry, manifest["label_columns"])
            problems += _verify_shard(path, entry, idx)
        except StoreError as e:
            problems.append(str(e))
        except OSError as e:
            problems.append(f"{path}: cannot be read ({e.strerror or e})")
    return problems


def _verify_shard(path: Path, entry: dict[str, Any], idx: _Index) -> list[str]:
    if not path.is_file():
        return [f"{path}: missing (listed in {MANIFEST})"]
    if path.stat().st_size != entry["bytes"]:
        return [f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {entry['bytes']} (truncated or replaced)"]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        raw = _HashingReader(fh, h)
        try:
            with tarfile.open(fileobj=raw, mode="r|") as tf:  # streaming: sequential reads only
                members = [(m.name, m.offset_data, m.size, _sha256(tf.extractfile(m).read()))  # type: ignore
                           for m in tf]
        except (tarfile.TarError, EOFError) as e:
            members = []
            bad = f"{path}: not a readable tar ({e})"
        else:
            bad = ""
        while raw.read(1 << 20):  # the rest (end-of-archive padding) for the digest
            pass
    if h.hexdigest() != entry["sha256"]:
        return [f"{path}: SHA-256 does not match {MANIFEST} (shard damaged or edited)"]
    if bad:
        return [bad]
    want = [(n + SUFFIX, o, s, d) for n, o, s, d in zip(idx.names, idx.offsets, idx.sizes, idx.sha256)]
    if members != want:
        return [f"{path}: members do not match its index {entry['index']}"]
    return []


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through it (one pass: verify while parsing the tar)."""

    def __init__(self, fh: Any, h: Any) -> None:
        self.fh, self.h = fh, h

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.h.update(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


@dataclass
class UnpackReport:
    """What :func:`unpack` did."""

    written: int = 0
    already: int = 0  # identical files that were in the output folder already


def unpack(store: str | Path, out_dir: str | Path) -> UnpackReport:
    """Write every item of ``store`` to ``out_dir/NAME.latent.safetensors``, bit-identical to the packed file.

    The store is verified first, and files land under temporary names and are renamed only when all are
    written, so a damaged store or a failure leaves no partial output. An existing file with the same bytes is
    kept; one with other bytes is an error (before anything is written).

    Raises:
        StoreError: naming the damaged shard or the conflicting file.
    """
    store, out_dir = Path(store), Path(out_dir)
    problems = verify(store)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise StoreError(problems[0] + more)
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(f"{out_dir}: exists and is not a folder")
    reader = LatentStore(store)
    report = UnpackReport()
    todo = []
    for j, name in enumerate(reader.names):
        target = out_dir / (name + SUFFIX)
        if target.exists():
            if not target.is_file() or _file_sha256(target) != reader._digest[j].tobytes().hex():
                raise StoreError(f"{target}: exists with other contents than the store's {name!r}; unpack into "
                                 "another folder")
            report.already += 1
        else:
            todo.append(j)
    written: list[tuple[Path, Path]] = []
    try:
        for j in todo:
            target = out_dir / (reader.names[j] + SUFFIX)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_path(target)
            written.append((tmp, target))
            tmp.write_bytes(reader.read_bytes(j))
        for tmp, target in written:
            os.replace(tmp, target)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
    report.written = len(written)
    return report
