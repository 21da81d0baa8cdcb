"""The images a reconstruction evaluation reads: files, folders (DICOM series grouped, as ``medlatent encode``
does) and CSVs of ``path[,modality]``; one :class:`EvalInput` each, read by :func:`load_input`."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medlatent.io.image import ImageData


class EvaluationInputError(ValueError):
    """An input list, CSV or ROI file is unusable; the message names the file (and line)."""


@dataclass
class EvalInput:
    """One image to evaluate: a file or a DICOM series folder, with an optional modality from a CSV."""

    name: str
    paths: list[Path]
    kind: str = "file"
    modality: str | None = None

    @property
    def source(self) -> Path:
        return self.paths[0].parent if self.kind == "dicom-series" else self.paths[0]

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


def csv_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a CSV with a header, or of a headerless CSV whose first column is the path."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationInputError(f"{path}: cannot read the CSV ({e})") from e
    rows = [r for r in csv.reader(text.splitlines())]
    numbered = [(i + 1, [c.strip() for c in r]) for i, r in enumerate(rows) if r and any(c.strip() for c in r)]
    if not numbered:
        raise EvaluationInputError(f"{path}: the CSV is empty")
    header = [c.lower() for c in numbered[0][1]]
    if "path" in header:
        body = numbered[1:]
    else:
        header = ["path", "modality", "x0", "y0", "x1", "y1", "z0", "z1"][: len(numbered[0][1])]
        body = numbered
    out = []
    for line, cells in body:
        out.append((line, {h: (cells[i] if i < len(cells) else "") for i, h in enumerate(header)}))
    return out




def resolve_path(base: Path, p: str) -> Path:
    """A path as a CSV writes it: relative ones are taken from ``base`` (the CSV's folder)."""
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def gather_inputs(inputs: Sequence[str | Path]) -> tuple[list[EvalInput], list[tuple[Path, str]]]:
    """Images to evaluate, and inputs that were skipped with the reason (missing, unsupported, unreadable).

    Args:
        inputs: image files, folders (walked recursively, DICOM series grouped, as ``medlatent encode`` does)
            and CSV files with a ``path`` column and an optional ``modality`` column (relative paths are taken
            from the CSV's folder; a headerless CSV is ``path[,modality]``).
    """
    from medlatent.io.discover import discover

    items: list[EvalInput] = []
    skipped: list[tuple[Path, str]] = []
    plain: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_file() and p.suffix.lower() == ".csv":
            for line, row in csv_rows(p):
                if not row.get("path"):
                    raise EvaluationInputError(f"{p}, line {line}: no path")
                target = resolve_path(p.parent, row["path"])
                found, bad = discover([target])
                skipped += bad
                mod = (row.get("modality") or "").strip().lower() or None
                rel = Path(row["path"])
                for it in found:  # names keep the CSV's relative folders (figure names, results rows)
                    name = (rel / it.name if target.is_dir() else rel.parent / it.name).as_posix()
                    items.append(EvalInput(name, it.paths, it.kind, mod))
        else:
            plain.append(p)
    if plain:
        found, bad = discover(plain)
        skipped += bad
        items += [EvalInput(it.name, it.paths, it.kind) for it in found]
    names: dict[str, int] = {}
    for it in items:  # two inputs with the same relative name (two folders) must not share outputs
        k = names.get(it.name, 0)
        names[it.name] = k + 1
        if k:
            it.name = f"{it.name}~{k}"
    return items, skipped


def load_input(item: EvalInput, uneven: str = "refuse") -> "ImageData":
    """Read one input (a file, or the files of one DICOM series)."""
    from medlatent.io.readers import read_image, validate

    if item.kind == "dicom-series":
        from medlatent.io.dicom import read_dicom_series

        return validate(read_dicom_series(item.paths[0].parent, uneven=uneven, files=item.paths))
    return read_image(item.paths[0], uneven=uneven)
