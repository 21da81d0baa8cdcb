"""The CAD manifest: a CSV of columns ``path,label,split`` and optionally ``patient`` (no patient may appear in two
splits); ``split`` is ``train``, ``val`` or ``test``; labels are integers or strings (mapped to ids in sorted
order); relative paths are relative to the CSV's folder. Every data error names the CSV line and the file."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from medlatent.io.tables import read_csv_rows

SPLITS = ("train", "val", "test")


class CADDataError(ValueError):
    """A CAD task that cannot be run; the message names the CSV line, file or patient and what to do."""


@dataclass(frozen=True)
class CADEntry:
    """One CSV row: the file, its class id, split and (optional) patient; ``line`` for error messages."""

    line: int
    path: Path
    label: int
    split: str
    patient: str = ""


@dataclass
class CADTask:
    """A parsed CSV: rows, class names (id → name) and the CSV path."""

    csv_path: Path
    entries: list[CADEntry]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices(self, split: str) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e.split == split]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in SPLITS:
            labels = [e.label for e in self.entries if e.split == s]
            if labels:
                out[s] = {self.class_names[k]: labels.count(k) for k in range(self.num_classes)}
        return out



def label_order(raw: list[str]) -> list[str]:
    """Distinct labels sorted numerically when all are integers, else as strings."""
    distinct = sorted(set(raw))
    try:
        return sorted(distinct, key=lambda s: int(s))
    except ValueError:
        return distinct


def read_cad_csv(csv_path: str | Path) -> CADTask:
    """Parse and check a CAD manifest.

    Raises:
        CADDataError: missing columns, empty cells, unknown split, missing file, a patient in two splits,
            fewer than two classes, or a class absent from train or test (AUROC would be undefined).
    """
    try:
        columns, rows = read_csv_rows(csv_path, lower=True)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CADDataError(f"{csv_path}: cannot be read as a CSV ({type(e).__name__}: {e})") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CADDataError(f"{csv_path}: cannot be read as a CSV ({type(e).__name__}: {e})") from e
    missing = [c for c in ("path", "label", "split") if c not in columns]
    if missing:
        raise CADDataError(f"{csv_path}: missing column(s) {', '.join(missing)} "
                           f"(found: {', '.join(columns) or 'none'});"
                           " a CAD manifest has columns path,label,split and optionally patient")
    has_patient = "patient" in columns
    parsed: list[tuple[int, Path, str, str, str]] = []
    for line, row in rows:
        if not any(row.values()):
            continue
        where = f"{csv_path}, line {line}"
        for col in ("path", "label", "split"):
            if not row.get(col):
                raise CADDataError(f"{where}: empty {col}")
        split = row["split"].lower()
        if split not in SPLITS:
            raise CADDataError(f"{where}: split must be one of {', '.join(SPLITS)}, got {row['split']!r}")
        path = Path(row["path"]).expanduser()
        if not path.is_absolute():
            path = csv_path.parent / path
        if not path.exists():
            raise CADDataError(f"{where}: file {path} does not exist (relative paths are relative to the CSV's folder)")
        patient = row.get("patient", "") if has_patient else ""
        if has_patient and not patient:
            raise CADDataError(f"{where}: empty patient (the CSV has a patient column; fill it for every row)")
        parsed.append((line, path, row["label"], split, patient))
    if not parsed:
        raise CADDataError(f"{csv_path}: no rows")

    first_seen: dict[str, tuple[str, int]] = {}
    for line, _, _, split, patient in parsed:
        if not patient:
            continue
        if patient in first_seen and first_seen[patient][0] != split:
            s0, l0 = first_seen[patient]
            raise CADDataError(f"{csv_path}: patient {patient!r} appears in split {s0!r} (line {l0}) and split "
                               f"{split!r} (line {line}); all images of a patient must be in one split")
        first_seen.setdefault(patient, (split, line))

    class_names = label_order([p[2] for p in parsed])
    if len(class_names) < 2:
        raise CADDataError(f"{csv_path}: only one class ({class_names[0]!r}); a CAD task needs at least two")
    ids = {name: i for i, name in enumerate(class_names)}
    entries = [CADEntry(line, path, ids[label], split, patient) for line, path, label, split, patient in parsed]
    task = CADTask(csv_path, entries, class_names)
    counts = task.counts()
    for split in ("train", "test"):
        absent = [c for c, n in counts.get(split, {c: 0 for c in class_names}).items() if n == 0]
        if absent:
            raise CADDataError(f"{csv_path}: split {split!r} has no rows of class(es) {', '.join(map(repr, absent))}; "
                               f"every class must appear in train and test (AUROC is undefined otherwise)")
    return task
