"""Turn the user's inputs (files and folders, walked recursively) into encode items.

DICOM files in one folder that form a volume series (same SeriesInstanceUID, positions and orientations)
become one 3D item; single DICOM images (radiographs, mammograms, multi-frame files) stay one item each.
DICOM is recognised by content (the ``DICM`` preamble) as well as by extension, so extensionless files count.

Everything found that does not become an item is accounted for, never dropped silently:

- *ignored*, with what it is: files known not to be images — BIDS and other sidecars (``.json``, ``.bval``,
  ``.bvec``, ``.tsv``, ``.txt``, ``README``), DICOMDIR indexes (the DICOM files they list are read on their own),
  OS clutter (``.DS_Store``, AppleDouble ``._*``, ``Thumbs.db``), hidden files and folders (``.git``,
  ``.datalad``; not searched) and the run's own output folder;
- *failed*, with the reason: unknown file types, empty files, unreadable DICOM headers, broken or looping
  symbolic links, devices and FIFOs;
- *empty*: inputs that yield no item at all, with why.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medlatent.io.image import ImageData
from medlatent.io.readers import is_dicom, is_supported

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage

# known non-image files: what each is (shown as the reason it was skipped)
_NAMED = {
    ".ds_store": "macOS folder metadata",
    "thumbs.db": "Windows thumbnail cache",
    "ehthumbs.db": "Windows thumbnail cache",
    "desktop.ini": "Windows folder settings",
    "dicomdir": "DICOMDIR index; the DICOM files it lists are read on their own",
    "readme": "text file (README)",
    "changes": "text file (CHANGES)",
    "license": "text file (LICENSE)",
}
_SUFFIXES = {
    ".json": "JSON sidecar (metadata)",
    ".jsonl": "JSON lines (e.g. a manifest)",
    ".bval": "diffusion b-values",
    ".bvec": "diffusion gradient directions",
    ".tsv": "table (TSV)",
    ".csv": "table (CSV)",
    ".txt": "text file",
    ".md": "text file",
    ".rst": "text file",
    ".raw": "MetaImage pixel data (read through its .mhd header)",
    ".zraw": "MetaImage pixel data (read through its .mhd header)",
}
_LATENT = ".latent.safetensors"


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


@dataclass
class Discovery:
    """What the inputs hold: items to encode and, with reasons, everything else (see the module docstring)."""

    items: list[InputItem] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    empty: list[tuple[Path, str]] = field(default_factory=list)


def _strip(name: str) -> str:
    low = name.lower()
    for suf in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".dicom", ".ima", ".png", ".jpg",
                ".jpeg", ".tif", ".tiff", ".bmp"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def non_image_kind(path: Path) -> str | None:
    """What ``path`` is if its name marks a known non-image file (sidecar, index, OS clutter), else ``None``."""
    low = path.name.lower()
    if low.startswith("._"):
        return "macOS AppleDouble metadata"
    if low in _NAMED:
        return _NAMED[low]
    if low.startswith("."):
        return "hidden file"
    if low.endswith(_LATENT):
        return "medlatent latent file (decode it with medlatent decode)"
    return _SUFFIXES.get(Path(low).suffix)


def is_dicomdir(path: Path) -> bool:
    """A DICOMDIR index, by name (the standard's file ID) or by its SOP class in the file meta."""
    if path.name.upper() == "DICOMDIR":
        return True
    from pydicom.filereader import read_file_meta_info

    try:
        with open(path, "rb") as fh:  # the UID sits in the file meta at the start: skip pydicom for images
            if DICOMDIR_SOP_CLASS.encode() not in fh.read(2048):
                return False
        return str(read_file_meta_info(str(path)).get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS
    except Exception:  # no readable file meta: not a DICOMDIR (the header scan reports unreadable files)
        return False


def _entry_problem(path: Path) -> tuple[str, os.stat_result | None]:
    """``("", stat)`` for a reachable entry, else the reason it cannot be used (broken/looping link, no access)."""
    try:
        return "", path.stat()
    except FileNotFoundError:
        if not path.is_symlink():
            return "no longer exists (removed while being searched)", None
        return f"broken symbolic link (points to {os.readlink(path)}, which does not exist)", None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (the link resolves to itself)", None
        return f"cannot be accessed ({e.strerror})", None


def _walk(folder: Path, found: Discovery, exclude: Path | None, ancestors: frozenset[str]) -> Iterator[Path]:
    """Regular files under ``folder`` (symbolic links followed, hidden entries skipped), sorted by name."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        found.failed.append((folder, f"folder cannot be listed ({e.strerror})"))
        return
    for entry in entries:
        p = Path(entry.path)
        if entry.name.startswith("."):
            what = "hidden folder (not searched)" if entry.is_dir() else non_image_kind(p)
            found.ignored.append((p, what or "hidden file"))
            continue
        problem, st = _entry_problem(p)
        if st is None:
            found.failed.append((p, problem))
        elif stat.S_ISDIR(st.st_mode):
            real = os.path.realpath(p)
            if exclude is not None and real == os.path.realpath(exclude):
                found.ignored.append((p, "the output folder of this run"))
            elif real in ancestors:
                found.failed.append((p, f"symbolic link loop (points back to its parent folder {real})"))
            else:
                yield from _walk(p, found, exclude, ancestors | {real})
        elif stat.S_ISREG(st.st_mode):
            yield p
        else:
            found.failed.append((p, "not a regular file (a device, FIFO or socket)"))


def _classify(p: Path, root: Path, found: Discovery, dicom: dict[Path, list[Path]]) -> None:
    """Sort one regular file found in a folder: DICOM (grouped later), image item, ignored or failed."""
    kind = non_image_kind(p)
    if kind is not None:
        found.ignored.append((p, kind))
    elif p.stat().st_size == 0:
        found.failed.append((p, "file is empty"))
    elif is_dicom(p):
        if is_dicomdir(p):
            found.ignored.append((p, _NAMED["dicomdir"]))
        else:
            dicom.setdefault(p.parent, []).append(p)
    elif is_supported(p):
        found.items.append(InputItem(str(p.relative_to(root).with_name(_strip(p.name))), [p]))
    else:
        found.failed.append((p, f"unsupported file type {p.suffix or '(no extension)'!r}"))


def _group_dicom(root: Path, by_folder: dict[Path, list[Path]], found: Discovery) -> None:
    """DICOM files of each folder: volume series become one item each, other files one item per file."""
    from medlatent.io.dicom import is_volume_series, scan_dicom_headers

    for folder, files in by_folder.items():
        groups, bad = scan_dicom_headers(files)
        found.failed.extend(bad)
        rel = folder.relative_to(root)
        for i, (_uid, series) in enumerate(sorted(groups.items())):
            if is_volume_series(series):
                tag = f"series-{i + 1}" if len(groups) > 1 else "series"
                found.items.append(InputItem(str(rel / tag), sorted(f.path for f in series), kind="dicom-series"))
            else:
                for f in series:
                    found.items.append(InputItem(str(f.path.relative_to(root).with_name(_strip(f.path.name))),
                                                 [f.path]))


def _discover_one(root: Path, found: Discovery, exclude: Path | None) -> None:
    problem, st = _entry_problem(root) if root.is_symlink() or root.exists() else ("no such file or folder", None)
    if st is None:
        found.failed.append((root, problem))
    elif stat.S_ISREG(st.st_mode):
        kind = non_image_kind(root)
        if kind is None:  # named explicitly: the reader decides, and says why if it cannot
            found.items.append(InputItem(_strip(root.name), [root]))
        else:
            found.ignored.append((root, kind))
            suffix = root.suffix or "(no extension)"
            found.empty.append((root, f"not an image ({kind}; unsupported file type {suffix!r}) — medlatent reads "
                                      "PNG/JPEG/TIFF/BMP, DICOM, NIfTI, NRRD and MHA/MHD"))
    elif stat.S_ISDIR(st.st_mode):
        before = (len(found.items), len(found.failed), len(found.ignored))
        by_folder: dict[Path, list[Path]] = {}
        for p in _walk(root, found, exclude, frozenset({os.path.realpath(root)})):
            _classify(p, root, found, by_folder)
        _group_dicom(root, by_folder, found)
        if len(found.items) == before[0]:
            n_failed, n_ignored = len(found.failed) - before[1], len(found.ignored) - before[2]
            found.empty.append((root, f"holds no images ({n_ignored} non-image files skipped, {n_failed} failed)"
                                if n_failed or n_ignored else "holds no files"))
    else:
        found.failed.append((root, "not a regular file or folder (a device, FIFO or socket)"))


def discover_inputs(inputs: Sequence[str | Path], exclude: str | Path | None = None) -> Discovery:
    """Items to encode from files and folders, with everything else accounted for (see the module docstring).

    Args:
        inputs: image files and folders (walked recursively, symbolic links followed).
        exclude: a folder not to search (the run's output folder, when it lies inside an input).
    """
    found = Discovery()
    for raw in inputs:
        _discover_one(Path(raw), found, Path(exclude) if exclude is not None else None)
    found.items.sort(key=lambda it: it.name)
    return found


def discover(inputs: Sequence[str | Path]) -> tuple[list[InputItem], list[tuple[Path, str]]]:
    """Items to encode, and the files that failed with the reason (known non-image files are left out)."""
    found = discover_inputs(inputs)
    return found.items, found.failed


def find_latents(inputs: list[Path], exclude: Path | None = None) -> Discovery:
    """Latent files (``*.latent.safetensors``) among files and folders, as items named by their relative path.

    Named files are taken whatever their name (reading says what is wrong); in folders, other files are ignored.
    """
    found = Discovery()
    for root in inputs:
        if not root.is_dir():
            name = root.name[: -len(_LATENT)] if root.name.endswith(_LATENT) else root.stem
            found.items.append(InputItem(name, [root]))
            continue
        walked = Discovery()
        for p in _walk(root, walked, exclude, frozenset({os.path.realpath(root)})):
            if p.name.endswith(_LATENT):
                walked.items.append(InputItem(str(p.relative_to(root))[: -len(_LATENT)], [p]))
        found.items += walked.items
        # other files do not concern decoding; broken latent links and unsearchable folders do
        found.failed += [(p, why) for p, why in walked.failed
                         if p.name.endswith(_LATENT) or why.startswith(("symbolic link loop", "folder cannot"))]
        if not walked.items:
            found.empty.append((root, f"holds no latent files (*{_LATENT})"))
    return found


def read_item(item: InputItem, uneven: str = "refuse") -> ImageData:
    """Read one discovered input (a file, or the files of one DICOM series)."""
    from medlatent.io.readers import read_image, validate

    if item.kind == "dicom-series":
        from medlatent.io.dicom import read_dicom_series

        return validate(read_dicom_series(item.paths[0].parent, uneven=uneven, files=item.paths))
    return read_image(item.paths[0], uneven=uneven)
