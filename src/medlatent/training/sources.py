"""Training image sources: a folder (walked recursively; DICOM series become volumes), one image file, or a CSV
manifest (columns ``path``, optional ``split`` and ``modality``), read into :class:`Entry` items.

Unlike the official loaders, an unreadable source or row is an error naming the file (and line) — never a blank
image or a silently shorter list.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from medlatent.io.tables import read_csv_rows
from medlatent.training.data_config import MODALITIES, DataError

logger = logging.getLogger("medlatent.training.data")  # the public module's name: log lines read as before

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Entry:
    """One training image: a file, or a DICOM series folder (``files`` = its slices, when known)."""

    path: Path
    modality: str = "auto"
    files: tuple[Path, ...] | None = None


def is_manifest(source: str | Path) -> bool:
    return Path(source).suffix.lower() == ".csv"


def read_source(source: str | Path, *, split: str | None = None, modality: str = "auto",
                required: bool = True) -> list[Entry]:
    """The images of a folder or CSV manifest.

    Args:
        source: a folder (walked recursively with :func:`medlatent.io.discover.discover`), a single image
            file, or a ``.csv`` manifest (columns ``path``, optional ``split`` and ``modality``).
        split: with a CSV that has a ``split`` column, keep only rows of this split (ignored otherwise).
        modality: the modality of entries the CSV gives none for.
        required: an empty selection is an error (else an empty list).

    Raises:
        DataError: missing source, CSV without ``path`` column, a row naming a missing file, a bad
            ``split``/``modality`` value, or (``required``) nothing selected.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder (give a folder of images or a CSV manifest)")
    if is_manifest(source):
        return _read_manifest(source, split=split, modality=modality, required=required)
    from medlatent.io.discover import discover

    items, skipped = discover([source])
    if skipped:
        logger.warning("%s: skipped %d files that are not readable images (first: %s: %s)",
                       source, len(skipped), skipped[0][0], skipped[0][1])
    if not items:
        raise DataError(f"{source}: no readable images found (medlatent reads PNG/JPEG/TIFF/BMP, DICOM, NIfTI, "
                        "NRRD and MHA/MHD)")
    return [Entry(it.source, modality, tuple(it.paths) if it.kind == "dicom-series" else None) for it in items]


def manifest_has_split(source: str | Path) -> bool:
    return is_manifest(source) and "split" in _manifest_rows(Path(source))[0]


def _manifest_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(lower-cased column names, [(line number, row)])."""
    try:
        return read_csv_rows(csv_path, lower=True)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot be read as a CSV manifest ({type(e).__name__}: {e})") from e


def _read_manifest(csv_path: Path, *, split: str | None, modality: str, required: bool) -> list[Entry]:
    columns, rows = _manifest_rows(csv_path)
    if "path" not in columns:
        raise DataError(f"{csv_path}: the manifest needs a 'path' column (found columns: "
                        f"{', '.join(columns) or 'none'}); optional columns: split, modality")
    has_split = "split" in columns
    entries: list[Entry] = []
    for line, row in rows:
        where = f"{csv_path}, line {line}"
        if not any(row.values()):
            continue  # blank line
        if has_split:
            row_split = row.get("split", "").lower()
            if row_split not in SPLITS:
                raise DataError(f"{where}: split must be one of {', '.join(SPLITS)}, got {row.get('split')!r}")
            if split is not None and row_split != split:
                continue
        raw = row.get("path", "")
        if not raw:
            raise DataError(f"{where}: empty path")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = csv_path.parent / path
        if not path.exists():
            raise DataError(f"{where}: file {path} does not exist (relative paths are relative to the CSV's "
                            "folder)")
        mod = row.get("modality", "").lower() or modality
        if mod not in MODALITIES:
            raise DataError(f"{where}: modality must be one of {', '.join(MODALITIES)}, got {row['modality']!r}")
        entries.append(Entry(path, mod))
    if not entries and required:
        what = f" with split {split!r}" if has_split and split is not None else ""
        raise DataError(f"{csv_path}: no rows{what} — nothing to train or validate on")
    return entries

