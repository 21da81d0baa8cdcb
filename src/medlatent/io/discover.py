"""Turn the user's inputs (files and folders, walked recursively) into encode items.

DICOM files in one folder that form a volume series (same SeriesInstanceUID, positions and orientations)
become one 3D item; single DICOM images (radiographs, mammograms, multi-frame files) stay one item each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medlatent.io.image import ImageData
from medlatent.io.readers import is_dicom, is_supported


@dataclass
class InputItem:
    """One thing to encode: a file, or the files of one DICOM series.

    ``name`` is the output path relative to the output folder, without suffix (mirrors the input tree).
    """

    name: str
    paths: list[Path]
    kind: str = "file"  # or "dicom-series"
    problems: list[str] = field(default_factory=list)

    @property
    def source(self) -> Path:
        return self.paths[0].parent if self.kind == "dicom-series" else self.paths[0]


def _strip(name: str) -> str:
    low = name.lower()
    for suf in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".dicom", ".ima", ".png", ".jpg",
                ".jpeg", ".tif", ".tiff", ".bmp"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def discover(inputs: list[str | Path]) -> tuple[list[InputItem], list[tuple[Path, str]]]:
    """Items to encode, and files that were skipped with the reason (unsupported or unreadable)."""
    from medlatent.io.dicom import is_volume_series, scan_dicom_headers

    items: list[InputItem] = []
    skipped: list[tuple[Path, str]] = []
    for raw in inputs:
        root = Path(raw)
        if not root.exists():
            skipped.append((root, "no such file or folder"))
            continue
        if root.is_file():
            items.append(InputItem(_strip(root.name), [root]))
            continue
        by_folder: dict[Path, list[Path]] = {}
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower() in (".raw", ".zraw"):
                continue  # MetaImage pixel files are read through their .mhd header
            if is_dicom(p):
                by_folder.setdefault(p.parent, []).append(p)
            elif is_supported(p):
                items.append(InputItem(str(p.relative_to(root).with_name(_strip(p.name))), [p]))
            else:
                skipped.append((p, f"unsupported file type {p.suffix or '(no extension)'!r}"))
        for folder, files in by_folder.items():
            groups, bad = scan_dicom_headers(files)
            skipped.extend(bad)
            rel = folder.relative_to(root)
            for i, (uid, series) in enumerate(sorted(groups.items())):
                if is_volume_series(series):
                    tag = f"series-{i + 1}" if len(groups) > 1 else "series"
                    items.append(InputItem(str(rel / tag), sorted(f.path for f in series), kind="dicom-series"))
                else:
                    for f in series:
                        items.append(InputItem(str(f.path.relative_to(root).with_name(_strip(f.path.name))),
                                               [f.path]))
    return sorted(items, key=lambda it: it.name), skipped


def read_item(item: InputItem, uneven: str = "refuse") -> ImageData:
    """Read one discovered input (a file, or the files of one DICOM series)."""
    from medlatent.io.readers import read_image, validate

    if item.kind == "dicom-series":
        from medlatent.io.dicom import read_dicom_series

        return validate(read_dicom_series(item.paths[0].parent, uneven=uneven, files=item.paths))
    return read_image(item.paths[0], uneven=uneven)
