"""CSV tables with a header row (manifests, label files): one reader for every caller."""

from __future__ import annotations

import csv
from pathlib import Path


def read_csv_rows(path: Path, *, lower: bool = False) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Column names and ``(line number, row)`` pairs, names and values stripped (names lower-cased with ``lower``).

    A UTF-8 byte-order mark is dropped. Callers name the file in their own error type.

    Raises:
        OSError, UnicodeDecodeError, csv.Error: the file cannot be read as a CSV.
    """
    def key(name: str | None) -> str:
        name = (name or "").strip()
        return name.lower() if lower else name

    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [key(c) for c in (reader.fieldnames or [])]
        rows = [(reader.line_num, {key(k): v.strip() if isinstance(v, str) else "" for k, v in row.items()})
                for row in reader]
    return columns, rows
