"""Labels of latents from a CSV: rows naming latent files by ``path`` (relative to the CSV) or ``name`` (relative to
the latent folder, without the suffix), read for a dataset (:mod:`medlatent.data.latents`) or packed into a store
(:mod:`medlatent.data.store`)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medlatent.io.tables import read_csv_rows
from medlatent.latentfile import SUFFIX

KEY_COLUMNS = ("path", "name")


class LatentDataError(ValueError):
    """A latent dataset cannot be built: no files, an unreadable CSV, or labels that do not match the files."""


@dataclass(frozen=True)
class Labels:
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


def read_label_rows(csv_path: Path, files: dict[str, str], names: dict[str, str],
                    label_columns: Sequence[str] | None) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The label columns and, for each item a row labels (by its key), its label values as written.

    Rows name items by ``path`` (relative to the CSV) or ``name`` (relative to the latent folder, without the
    suffix). ``files`` maps the real paths of the dataset's files to item keys, ``names`` item names to keys.

    Raises:
        LatentDataError: naming the CSV (and line) and what does not fit.
    """
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
    return wanted, raw


def labels_from_rows(wanted: list[str], raw: dict[str, dict[str, str]]) -> Labels:
    """Label values as written → numbers: numeric columns stay numbers, others become class indices (sorted)."""
    classes = {c: sorted({r[c] for r in raw.values()}) for c in wanted
               if not all(_is_number(r[c]) for r in raw.values())}
    by_file = {f: [float(classes[c].index(r[c])) if c in classes else float(r[c]) for c in wanted]
               for f, r in raw.items()}
    return Labels(wanted, classes, by_file)


def _row_file(value: str, key: str, csv_path: Path, files: dict[str, str], names: dict[str, str],
              where: str) -> str:
    """The key of the item a CSV row names; an error when the dataset holds no such item."""
    if key == "name":
        name = value[: -len(SUFFIX)] if value.endswith(SUFFIX) else value
        if name not in names:
            raise LatentDataError(f"{where}: no latent file named {value!r} in the dataset (names are paths "
                                  f"relative to the latent folder, without {SUFFIX})")
        return names[name]
    path = Path(value).expanduser()
    real = os.path.realpath(path if path.is_absolute() else csv_path.parent / path)
    if real not in files:
        raise LatentDataError(f"{where}: {value} is not a latent file of the dataset (relative paths are relative "
                              "to the CSV's folder)")
    return files[real]
