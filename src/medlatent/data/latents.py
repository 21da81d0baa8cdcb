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

import csv
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from medlatent.distributed import Shard
from medlatent.io.discover import find_latents
from medlatent.io.tables import read_csv_rows
from medlatent.latentfile import SUFFIX, LatentFile, LatentFileError, read_latent

logger = logging.getLogger(__name__)

TENSORS = ("z", "stage2")
KEY_COLUMNS = ("path", "name")


class LatentDataError(ValueError):
    """A latent dataset cannot be built: no files, an unreadable CSV, or labels that do not match the files."""


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
class _Labels:
    columns: list[str]
    classes: dict[str, list[str]]  # categorical columns: class names in index order
    by_file: dict[str, list[float]]  # real path of a latent file → one number per column


def _read_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        columns, rows = read_csv_rows(csv_path)
    except FileNotFoundError:
        raise LatentDataError(f"{csv_path}: no such label CSV") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LatentDataError(f"{csv_path}: cannot be read as a CSV ({type(e).__name__}: {e})") from e
    return columns, [(line, row) for line, row in rows if any(row.values())]


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _read_labels(csv_path: Path, files: dict[str, Path], names: dict[str, Path],
                 label_columns: Sequence[str] | None) -> _Labels:
    """Rows keyed by ``path`` (relative to the CSV) or ``name`` (relative to the latent folder, without the
    suffix); numeric columns stay numbers, others become class indices (sorted class names)."""
    columns, rows = _read_rows(csv_path)
    key = next((c for c in KEY_COLUMNS if c in columns), None)
    if key is None:
        raise LatentDataError(f"{csv_path}: needs a 'path' or 'name' column (found: {', '.join(columns) or 'none'})")
    wanted = list(label_columns) if label_columns else [c for c in columns if c not in KEY_COLUMNS]
    missing = [c for c in wanted if c not in columns]
    if missing or not wanted:
        raise LatentDataError(f"{csv_path}: label column(s) {', '.join(missing) or '(none left besides ' + key + ')'}"
                              f" not found (columns: {', '.join(columns)})")
    if not rows:
        raise LatentDataError(f"{csv_path}: no rows")
    raw: dict[str, dict[str, str]] = {}
    for line, row in rows:
        where = f"{csv_path}, line {line}"
        target = _row_file(row[key], key, csv_path, files, names, where)
        if target in raw:
            raise LatentDataError(f"{where}: {row[key]!r} is labelled twice")
        empty = [c for c in wanted if not row.get(c)]
        if empty:
            raise LatentDataError(f"{where}: empty {', '.join(empty)}")
        raw[target] = {c: row[c] for c in wanted}
    classes = {c: sorted({r[c] for r in raw.values()}) for c in wanted
               if not all(_is_number(r[c]) for r in raw.values())}
    by_file = {f: [float(classes[c].index(r[c])) if c in classes else float(r[c]) for c in wanted]
               for f, r in raw.items()}
    return _Labels(wanted, classes, by_file)


def _row_file(value: str, key: str, csv_path: Path, files: dict[str, Path], names: dict[str, Path],
              where: str) -> str:
    """The real path of the latent file a CSV row names; an error when the dataset holds no such file."""
    if key == "name":
        name = value[: -len(SUFFIX)] if value.endswith(SUFFIX) else value
        if name not in names:
            raise LatentDataError(f"{where}: no latent file named {value!r} in the dataset (names are paths "
                                  f"relative to the latent folder, without {SUFFIX})")
        return os.path.realpath(names[name])
    path = Path(value).expanduser()
    real = os.path.realpath(path if path.is_absolute() else csv_path.parent / path)
    if real not in files:
        raise LatentDataError(f"{where}: {value} is not a latent file of the dataset (relative paths are relative "
                              "to the CSV's folder)")
    return real


class LatentDataset(Dataset):
    """Latent files under one or more folders (searched recursively) or given as files.

    Args:
        roots: folders and/or latent files.
        labels: optional CSV with a ``path`` (relative to the CSV) or ``name`` column (the file's path relative to
            its folder, without ``.latent.safetensors``) and label columns.
        label_columns: which columns are labels (default: all but ``path``/``name``). Numeric columns give
            numbers; other columns give class indices, their names in :attr:`classes` (sorted).
        tensor: ``"z"`` (the latent of record) or ``"stage2"`` (stage-2 features, 2D files encoded with them).
        unlabelled: files with no CSV row are an ``"error"`` (default) or left out (``"skip"``).
        transform: applied to each item dictionary (e.g. a MONAI ``Compose`` of dictionary transforms, or a
            resize to one latent grid so that items of different sizes batch).

    Items: ``{tensor: float32 C×…, "label": …, "meta": latent_meta(...)}``. With one label column ``label`` is a
    scalar (``int64`` class index for a categorical column, ``float32`` otherwise); with several, a ``float32``
    vector in column order.

    Raises:
        LatentDataError: no latent files, or a CSV that does not fit the files (each problem names the file/line).
        LatentFileError (from ``__getitem__``): a damaged, edited or foreign file, naming it.
    """

    def __init__(self, roots: str | Path | Sequence[str | Path], labels: str | Path | None = None, *,
                 label_columns: Sequence[str] | None = None, tensor: str = "z", unlabelled: str = "error",
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        if tensor not in TENSORS:
            raise ValueError(f"tensor must be one of {', '.join(TENSORS)}, got {tensor!r}")
        if unlabelled not in ("error", "skip"):
            raise ValueError(f"unlabelled must be 'error' or 'skip', got {unlabelled!r}")
        roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
        found = find_latents(roots)
        problems = found.failed + [(p, why) for p, why in found.empty]
        missing = [(r, "does not exist") for r in roots if not r.exists()]
        if missing or problems:
            p, why = (missing or problems)[0]
            raise LatentDataError(f"{p}: {why}")
        self.tensor, self.transform = tensor, transform
        items = [(it.name, it.paths[0]) for it in found.items]
        self.label_columns: list[str] = []
        self.classes: dict[str, list[str]] = {}
        self._labels: list[list[float]] | None = None
        if labels is not None:
            items = self._attach_labels(Path(labels), items, label_columns, unlabelled)
        self.names = [n for n, _ in items]
        self.paths = [p for _, p in items]

    def _attach_labels(self, csv_path: Path, items: list[tuple[str, Path]], label_columns: Sequence[str] | None,
                       unlabelled: str) -> list[tuple[str, Path]]:
        files = {os.path.realpath(p): p for _, p in items}
        lab = _read_labels(csv_path, files, {n: p for n, p in items}, label_columns)
        keep = [(n, p) for n, p in items if os.path.realpath(p) in lab.by_file]
        if len(keep) < len(items) and unlabelled == "error":
            first = next(p for _, p in items if os.path.realpath(p) not in lab.by_file)
            raise LatentDataError(f"{csv_path}: {len(items) - len(keep)} latent file(s) have no label row (first: "
                                  f"{first}); label them, or pass unlabelled='skip' to leave them out")
        if not keep:
            raise LatentDataError(f"{csv_path}: labels none of the dataset's latent files")
        self.label_columns, self.classes = lab.columns, lab.classes
        self._labels = [lab.by_file[os.path.realpath(p)] for _, p in keep]
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
        path = self.paths[i]
        lf = read_latent(path)  # both digests checked: a damaged or edited file is refused, naming it
        item: dict[str, Any] = {self.tensor: select_tensor(lf, self.tensor, path),
                                "meta": latent_meta(lf, self.names[i], path)}
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
