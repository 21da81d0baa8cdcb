"""A folder of latent files as a PyTorch dataset, with labels from a CSV, for training on latents at scale.

The dataset holds paths only: each ``__getitem__`` opens, verifies (both digests of the latent file format) and
closes one file, so it pickles into DataLoader workers and torchrun processes without open handles, and a damaged
file fails with its name instead of feeding a model wrong numbers. Items are dictionaries that the default
``collate_fn`` batches: the chosen tensor (``z`` or ``stage2``), ``label`` when a CSV is given, and ``meta``
(what a model needs: model name, spatial dims, f, C, reduction, original shape, affines).

For many processes, :class:`ExactDistributedSampler` gives every item to exactly one rank per epoch (PyTorch's
``DistributedSampler`` pads with repeats, or drops items with ``drop_last``, when the count does not divide).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medlatent.data.labels import LatentDataError, labels_from_rows, read_label_rows
from medlatent.data.remote import is_url
from medlatent.data.store import LatentStore, StoreError, is_store
from medlatent.distributed import Shard
from medlatent.io.discover import find_latents
from medlatent.latentfile import LatentFile, LatentFileError, read_latent

logger = logging.getLogger(__name__)

TENSORS = ("z", "stage2")


def latent_meta(lf: LatentFile, name: str = "", path: str | Path = "") -> dict[str, Any]:
    """What a model needs to know about one latent, as values the default ``collate_fn`` batches.

    ``affine`` is the source image's (``(d+1)×(d+1)``; 3D: RAS mm), ``latent_affine`` the latent grid's.
    """
    rec, m = lf.preprocessing, lf.model
    return {
        "name": name,
        "path": str(path),
        "model": str(m["name"]),
        "weights_sha256": str(m["weights_sha256"]),
        "spatial_dims": int(rec.spatial_dims),
        "f": float(m["f"]),
        "C": int(m["C"]),
        "downsample": int(m["downsample_per_axis"]),
        "modality": rec.modality,
        "original_shape": torch.tensor(rec.original_shape, dtype=torch.int64),
        "affine": torch.tensor(rec.original_affine, dtype=torch.float64),
        "latent_affine": torch.from_numpy(lf.latent_affine),
    }


def select_tensor(lf: LatentFile, tensor: str, path: str | Path) -> torch.Tensor:
    """``z`` or the stage-2 features of a latent file as float32 ``C×…``; a file without them is an error."""
    if tensor not in TENSORS:
        raise ValueError(f"tensor must be one of {', '.join(TENSORS)}, got {tensor!r}")
    t = lf.z if tensor == "z" else lf.stage2
    if t is None:
        raise LatentFileError(path, "holds no stage-2 features (encode with --stage2, or use tensor='z')")
    return t.float()


@dataclass(frozen=True)
class _Item:
    name: str
    path: Path | str  # a store item: SHARD.tar:NAME.latent.safetensors
    key: str  # what labels are matched by: a file's real path, a store item's path
    store: int = -1  # index into the dataset's stores; -1: a file
    pos: int = -1  # position in its store


class LatentDataset(Dataset):
    """Latent files under one or more folders (searched recursively), given as files, or in latent stores
    (:mod:`medlatent.data.store`; a store lists its items in the order they were packed, which for one folder
    is the order this class lists the folder in).

    Args:
        roots: folders, latent files and/or stores: store folders, stores by fsspec URL (``s3://…``,
            :mod:`medlatent.data.remote`) or open :class:`~medlatent.data.LatentStore` objects (for a URL that
            needs ``storage_options``).
        labels: optional CSV with a ``path`` (relative to the CSV) or ``name`` column (the file's path relative to
            its folder, without ``.latent.safetensors``; store items are matched by ``name``) and label columns.
            Without it, labels packed into the stores are used.
        label_columns: which columns are labels (default: all but ``path``/``name``). Numeric columns give
            numbers; other columns give class indices, their names in :attr:`classes` (sorted).
        tensor: ``"z"`` (the latent of record) or ``"stage2"`` (stage-2 features, 2D files encoded with them).
        unlabelled: files with no CSV row are an ``"error"`` (default) or left out (``"skip"``).
        transform: applied to each item dictionary (e.g. a MONAI ``Compose`` of dictionary transforms, or a
            resize to one latent grid so that items of different sizes batch).
        meta: ``False``: items without ``meta``; a store item is then one read, its SHA-256 check and a view of
            the tensor's bytes, no metadata parsed (several times faster; :class:`~medlatent.data.LatentStream`
            streams whole batches faster still).

    Items: ``{tensor: float32 C×…, "label": …, "meta": latent_meta(...)}``. With one label column ``label`` is a
    scalar (``int64`` class index for a categorical column, ``float32`` otherwise); with several, a ``float32``
    vector in column order.

    Raises:
        LatentDataError: no latent files, or a CSV that does not fit the files (each problem names the file/line).
        LatentFileError (from ``__getitem__``): a damaged, edited or foreign file, naming it.
    """

    def __init__(self, roots: str | Path | LatentStore | Sequence[str | Path | LatentStore],
                 labels: str | Path | None = None, *,
                 label_columns: Sequence[str] | None = None, tensor: str = "z", unlabelled: str = "error",
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None, meta: bool = True) -> None:
        if tensor not in TENSORS:
            raise ValueError(f"tensor must be one of {', '.join(TENSORS)}, got {tensor!r}")
        if unlabelled not in ("error", "skip"):
            raise ValueError(f"unlabelled must be 'error' or 'skip', got {unlabelled!r}")
        roots = [roots] if isinstance(roots, (str, Path, LatentStore)) else list(roots)
        self.tensor, self.transform, self.meta = tensor, transform, meta
        self._stores: list[LatentStore] = []
        items = self._find(roots)
        self.label_columns: list[str] = []
        self.classes: dict[str, list[str]] = {}
        self._labels: list[list[float]] | None = None
        if labels is not None:
            files = {os.path.realpath(it.path): it.key for it in items if it.store < 0}
            wanted, raw = read_label_rows(Path(labels), files, {it.name: it.key for it in items}, label_columns)
            items = self._attach_labels(str(labels), items, wanted, raw, unlabelled)
        elif any(st.label_columns for st in self._stores):
            items = self._attach_labels(", ".join(str(st.root) for st in self._stores if st.label_columns),
                                        items, *self._stored_labels(items, label_columns), unlabelled)
        self.names = [it.name for it in items]
        self.paths: list[Path | str] = [it.path for it in items]
        # per item: which store (-1: a file) and its position there; arrays, compact for 10⁵–10⁶ items
        self._store = np.array([it.store for it in items], dtype=np.int32)
        self._pos = np.array([it.pos for it in items], dtype=np.int64)

    def _find(self, roots: list[str | Path | LatentStore]) -> list[_Item]:
        """Items of folders (searched recursively), latent files and stores, in the order given."""
        items: list[_Item] = []
        missing, problems = [], []
        for r in roots:
            root = r if isinstance(r, LatentStore) or is_url(r) else Path(r)
            if isinstance(root, Path) and not root.exists():
                missing.append((root, "does not exist"))
            elif not isinstance(root, Path) or is_store(root):  # a store: open, by URL, or a folder
                try:
                    st = root if isinstance(root, LatentStore) else LatentStore(root)
                except StoreError as e:
                    raise LatentDataError(str(e)) from e
                if not len(st):
                    problems.append((st.root, "latent store holds no items"))
                s = len(self._stores)
                self._stores.append(st)
                items += [_Item(n, st.where(j), st.where(j), s, j) for j, n in enumerate(st.names)]
            else:
                found = find_latents([root])
                problems += found.failed + [(p, why) for p, why in found.empty]
                items += [_Item(it.name, it.paths[0], os.path.realpath(it.paths[0])) for it in found.items]
        if missing or problems:
            p, why = (missing or problems)[0]
            raise LatentDataError(f"{p}: {why}")
        return items

    def _stored_labels(self, items: list[_Item], label_columns: Sequence[str] | None,
                       ) -> tuple[list[str], dict[str, dict[str, str]]]:
        """The labels packed into the stores (as written), keyed like the items."""
        have = {tuple(st.label_columns) for st in self._stores if st.label_columns}
        if len(have) > 1:
            raise LatentDataError(f"the stores have different label columns ({'; '.join(map(', '.join, have))}); "
                                  "give one labels CSV for all")
        columns = list(have.pop())
        wanted = list(label_columns) if label_columns else columns
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise LatentDataError(f"label column(s) {', '.join(missing)} not in the stores (columns: "
                                  f"{', '.join(columns)})")
        raw = {it.key: {c: self._stores[it.store].labels[c][it.pos] for c in wanted}
               for it in items if it.store >= 0 and self._stores[it.store].label_columns}
        return wanted, raw

    def _attach_labels(self, source: str, items: list[_Item], wanted: list[str], raw: dict[str, dict[str, str]],
                       unlabelled: str) -> list[_Item]:
        lab = labels_from_rows(wanted, raw)
        keep = [it for it in items if it.key in lab.by_file]
        if len(keep) < len(items) and unlabelled == "error":
            first = next(it.path for it in items if it.key not in lab.by_file)
            raise LatentDataError(f"{source}: {len(items) - len(keep)} latent file(s) have no label row (first: "
                                  f"{first}); label them, or pass unlabelled='skip' to leave them out")
        if not keep:
            raise LatentDataError(f"{source}: labels none of the dataset's latent files")
        self.label_columns, self.classes = lab.columns, lab.classes
        self._labels = [lab.by_file[it.key] for it in keep]
        return keep

    def __len__(self) -> int:
        return len(self.paths)

    def _label(self, i: int) -> torch.Tensor:
        values = self._labels[i]  # type: ignore[index]
        if len(values) == 1:
            col = self.label_columns[0]
            return torch.tensor(int(values[0])) if col in self.classes else torch.tensor(values[0],
                                                                                          dtype=torch.float32)
        return torch.tensor(values, dtype=torch.float32)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, s = self.paths[i], int(self._store[i])
        if not self.meta and s >= 0:  # the index says where the tensor lies: one read, digest, a view
            item: dict[str, Any] = {self.tensor: self._stores[s].read_tensor(int(self._pos[i]), self.tensor).float()}
        else:
            # a file: both digests checked; a store item: its bytes against the digest recorded when packed
            lf = read_latent(path) if s < 0 else self._stores[s].load(int(self._pos[i]))
            item = {self.tensor: select_tensor(lf, self.tensor, path)}
            if self.meta:
                item["meta"] = latent_meta(lf, self.names[i], path)
        if self._labels is not None:
            item["label"] = self._label(i)
        return self.transform(item) if self.transform is not None else item


class ExactDistributedSampler(Sampler[int]):
    """Each index on exactly one rank per epoch: a seeded permutation per epoch (the same on every rank), split
    ``perm[rank::world]`` as ``medlatent encode`` shards its inputs.

    Ranks get ``⌈n/world⌉`` or ``⌊n/world⌋`` items. Use it where every item must be seen once (feature extraction,
    evaluation, one pass of an epoch-based job); DDP training whose ranks must take the same number of steps
    needs equal counts (PyTorch's ``DistributedSampler`` repeats items to get them, or ``Join``).

    Args:
        num_replicas, rank: default to the initialised process group, else torchrun's ``WORLD_SIZE``/``RANK``.
    """

    def __init__(self, dataset: Sequence[Any], num_replicas: int | None = None, rank: int | None = None, *,
                 shuffle: bool = True, seed: int = 0) -> None:
        world, me = _world_and_rank()
        self.num_replicas = world if num_replicas is None else int(num_replicas)
        self.rank = me if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        self.n = len(dataset)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(Shard(self.rank, self.num_replicas).take(self._order()))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def _world_and_rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
