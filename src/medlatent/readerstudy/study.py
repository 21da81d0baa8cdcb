"""Create a blinded reader study from originals and one folder (or CSV rows) of reconstructions per method.

A study is a folder::

    STUDY/study.sqlite    cases, blinded pairs, readers (token digests), per-reader orders, answers
    STUDY/images/*.npy    display images: 16-bit, linear in the original's intensity units
    STUDY/readers.csv     each reader's name, token and link path (created once; keep it private)

Originals and reconstructions of a case share one intensity map (the original's min..max → 0..65535), and the
window is stored as numbers rather than burnt into the pixels: the browser applies window/level, so readers can
change it. 3D files contribute chosen axial slices, displayed radiologically (anterior up, patient's right on
the left). Pairs, cases and images get random ids; method and factor never leave the server.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlatent.io.discover import InputItem, discover, read_item
from medlatent.io.image import ImageData, ImageReadError
from medlatent.readerstudy.db import DB_NAME, IMAGES_DIR, SCHEMA, StudyError, connect, token_digest, transaction

logger = logging.getLogger(__name__)

WINDOW_PERCENTILES = (0.5, 99.5)  # default window: robust to a few extreme pixels (burnt-in labels, metal)


@dataclass(frozen=True)
class MethodSource:
    """Reconstructions of one method at one downsizing factor ``f`` (``factor`` may be empty)."""

    name: str
    folder: Path
    factor: str = ""

    @classmethod
    def parse(cls, spec: str) -> MethodSource:
        """``NAME=DIR`` or ``NAME:FACTOR=DIR`` (e.g. ``medvae:16=recon/f16``)."""
        label, sep, folder = spec.partition("=")
        name, _, factor = label.partition(":")
        if not sep or not name.strip() or not folder.strip():
            raise StudyError(f"method {spec!r} must look like NAME=DIR or NAME:FACTOR=DIR (e.g. medvae:16=recon/f16)")
        return cls(name.strip(), Path(folder.strip()), factor.strip())


@dataclass(frozen=True)
class PairSpec:
    """One original/reconstruction pair before conversion (paths; ``slice`` for 3D files)."""

    original: Path
    reconstruction: Path
    method: str
    factor: str = ""
    slice: int | None = None


# ------------------------------------------------------------------------------------------ pairing
def pairs_from_folders(originals: Path, methods: list[MethodSource]) -> list[PairSpec]:
    """Pair each original with the file of the same relative name (any supported suffix) in every method folder."""
    if not methods:
        raise StudyError("give at least one method: --method NAME[:FACTOR]=DIR")
    names = [(m.name, m.factor) for m in methods]
    if len(set(names)) != len(names):
        raise StudyError(f"each method and factor may appear once; got {names}")
    orig = _items(originals, "originals")
    specs, missing = [], []
    for m in methods:
        recon = _items(m.folder, f"method {m.name}")
        # `medlatent roundtrip` writes NAME.recon.png next to NAME.latent.safetensors
        recon.update({k[: -len(".recon")]: v for k, v in recon.items() if k.endswith(".recon") and k[:-6] not in recon})
        for name, it in orig.items():
            if name not in recon:
                missing.append(f"{m.folder}/{name}.*")
                continue
            specs.append(PairSpec(it.source, recon[name].source, m.name, m.factor))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise StudyError(f"no reconstruction for {len(missing)} original(s): {shown}")
    return specs


def pairs_from_csv(path: Path) -> list[PairSpec]:
    """Rows ``original, reconstruction, method[, factor][, slice]``; paths relative to the CSV's folder."""
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise StudyError(f"{path}: cannot read the pairs CSV ({e})") from None
    need = {"original", "reconstruction", "method"}
    if not rows or not need <= set(rows[0]):
        raise StudyError(f"{path}: needs a header with columns original, reconstruction, method[, factor][, slice]")
    specs = []
    for i, r in enumerate(rows, start=2):
        if not all((r.get(k) or "").strip() for k in need):
            raise StudyError(f"{path}, line {i}: empty original, reconstruction or method")
        sl = (r.get("slice") or "").strip()
        if sl and not sl.lstrip("-").isdigit():
            raise StudyError(f"{path}, line {i}: slice must be an integer index, got {sl!r}")
        specs.append(PairSpec(path.parent / r["original"].strip(), path.parent / r["reconstruction"].strip(),
                              r["method"].strip(), (r.get("factor") or "").strip(), int(sl) if sl else None))
    return specs


def _items(folder: Path, what: str) -> dict[str, InputItem]:
    folder = Path(folder)
    if not folder.is_dir():
        raise StudyError(f"{what}: {folder} is not a folder")
    items, _ = discover([folder])
    if not items:
        raise StudyError(f"{what}: no readable images in {folder}")
    return {it.name: it for it in items}


# ------------------------------------------------------------------------------------------ display images
def _read(path: Path) -> ImageData:
    items, skipped = discover([path])
    if skipped or len(items) != 1:
        why = skipped[0][1] if skipped else "not one image"
        raise StudyError(f"{path}: cannot be read ({why})")
    try:
        return read_item(items[0])
    except (ImageReadError, OSError, ValueError) as e:
        raise StudyError(f"{path}: cannot be read ({e})") from None


def display_slices(img: ImageData, slices: list[int] | str) -> list[tuple[str, np.ndarray]]:
    """``[(label, rows×cols float array)]``: a 2D image as is (colour averaged); 3D: the chosen axial slices.

    ``slices`` for 3D: ``"middle"``, or indices along the volume's third axis (negative counts from the end).
    3D slices are shown radiologically: the RAS+ volume's slice is transposed and flipped so that anterior is up
    and the patient's right is on the viewer's left.
    """
    a = np.asarray(img.array, dtype=np.float64)
    if img.spatial_dims == 2:
        return [("", a.mean(axis=0))]
    n = a.shape[2]
    idx = [n // 2] if slices == "middle" else list(slices)  # type: ignore[arg-type]
    out = []
    for k in idx:
        if not -n <= k < n:
            raise StudyError(f"{img.source}: slice {k} is outside the volume's {n} axial slices")
        k %= n
        out.append((f"z={k}", np.flip(a[:, :, k].T, axis=(0, 1))))
    return out


def _to_u16(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale = 65535.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.rint((a - lo) * scale), 0, 65535).astype("<u2")


# ------------------------------------------------------------------------------------------ creation
def create_study(out: Path, specs: list[PairSpec], readers: list[str], *, seed: int = 0,
                 slices: list[int] | str = "middle", title: str = "Reader study", allow_revision: bool = True,
                 match_range: bool = False, overwrite: bool = False) -> list[tuple[str, str]]:
    """Build the study folder ``out`` and return ``[(reader, token)]``.

    Reconstructions must be in the original's intensity units (e.g. ``medlatent decode --format nifti``), so
    that a global intensity error stays visible. ``match_range=True`` instead maps each reconstruction's
    min..max onto its original's, for exports that were rescaled (8/16-bit PNG); a reconstruction whose values
    plainly are not in the original's units is refused without it.

    The folder appears only when everything succeeded (built next to it, then renamed): an unreadable file or a
    shape mismatch leaves no partial study. Each reader's order is a permutation drawn from
    ``numpy.random.default_rng([seed, reader_index])`` and stored, so it can be audited and reproduced.
    """
    out = Path(out)
    if not specs:
        raise StudyError("no pairs to put in the study")
    names = [r.strip() for r in readers]
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise StudyError(f"readers must be distinct non-empty names, got {readers!r}")
    if out.exists() and not overwrite:
        raise StudyError(f"{out} exists; choose a new folder (or --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokens = _build(tmp, specs, names, seed=seed, slices=slices, title=title, allow_revision=allow_revision,
                        match_range=match_range)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tokens


def _build(root: Path, specs: list[PairSpec], readers: list[str], *, seed: int, slices: list[int] | str,
           title: str, allow_revision: bool, match_range: bool) -> list[tuple[str, str]]:
    (root / IMAGES_DIR).mkdir()
    conn = connect(root / DB_NAME)
    try:
        conn.executescript(SCHEMA)
        with transaction(conn):
            pair_ids = _add_pairs(conn, root, specs, slices, match_range)
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("title", title), ("seed", str(seed)), ("allow_revision", "1" if allow_revision else "0"),
                ("match_range", "1" if match_range else "0"),
                ("format", "medlatent-reader-study/1")])
            tokens = []
            for i, name in enumerate(readers):
                token = secrets.token_urlsafe(24)
                cur = conn.execute("INSERT INTO readers (name, token_sha256, seed) VALUES (?, ?, ?)",
                                   (name, token_digest(token), seed))
                order = np.random.default_rng([seed, i]).permutation(len(pair_ids))
                conn.executemany("INSERT INTO assignments VALUES (?, ?, ?)",
                                 [(cur.lastrowid, pos + 1, pair_ids[k]) for pos, k in enumerate(order)])
                tokens.append((name, token))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    with (root / "readers.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["reader", "token", "link"])
        w.writerows((n, t, f"/r/{t}") for n, t in tokens)
    os.chmod(root / "readers.csv", 0o600)
    return tokens


def _add_pairs(conn, root: Path, specs: list[PairSpec], slices: list[int] | str, match_range: bool) -> list[str]:
    """Convert every pair to display images; one case per (original file, slice). Returns the pair ids."""
    seen: set[tuple] = set()
    cases: dict[tuple[str, str], tuple[str, str, float, float]] = {}  # (file, slice) → case, image, lo, hi
    cache: dict[tuple, list[tuple[str, np.ndarray]]] = {}  # originals are read once for all methods
    pair_ids = []
    for spec in specs:
        key = (spec.original.resolve(), spec.method, spec.factor, spec.slice)
        if key in seen:
            raise StudyError(f"{spec.original}: paired twice with method {spec.method!r} factor {spec.factor!r}")
        seen.add(key)
        want = [spec.slice] if spec.slice is not None else slices
        ok = (spec.original, str(want))
        if ok not in cache:
            cache[ok] = display_slices(_read(spec.original), want)
        originals = cache[ok]
        recons = display_slices(_read(spec.reconstruction), want)
        for (label, o), (_, r) in zip(originals, recons):
            if o.shape != r.shape:
                raise StudyError(f"{spec.reconstruction}: shape {r.shape} differs from the original "
                                 f"{spec.original} {o.shape}{f' ({label})' if label else ''}")
            ck = (str(spec.original), label)
            if ck not in cases:
                cases[ck] = _add_case(conn, root, spec.original, label, o)
            case_id, orig_image, lo, hi = cases[ck]
            r = _in_original_units(r, lo, hi, match_range, spec)
            recon_image = _add_image(conn, root, case_id, _to_u16(r, lo, hi))
            pid = secrets.token_hex(8)
            conn.execute("INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (pid, case_id, spec.method, spec.factor, orig_image, recon_image, str(spec.reconstruction)))
            pair_ids.append(pid)
    logger.info("%d pairs over %d cases", len(pair_ids), len(cases))
    return pair_ids


def _in_original_units(r: np.ndarray, lo: float, hi: float, match_range: bool, spec: PairSpec) -> np.ndarray:
    rlo, rhi = float(r.min()), float(r.max())
    if match_range:
        return (r - rlo) / ((rhi - rlo) or 1.0) * (hi - lo) + lo
    span = hi - lo or 1.0
    plo, phi = (float(v) for v in np.percentile(r, (1, 99)))  # robust to a few overshooting pixels
    if plo < lo - span or phi > hi + span:  # e.g. a PNG export rescaled to 0..65535, or a [-1, 1] model output
        raise StudyError(f"{spec.reconstruction}: values {rlo:g}..{rhi:g} are not in the units of the original "
                         f"{spec.original} ({lo:g}..{hi:g}); decode with `medlatent decode --format nifti` to keep "
                         "the units, or pass --match-range for rescaled exports")
    return r


def _add_case(conn, root: Path, source: Path, label: str, o: np.ndarray) -> tuple[str, str, float, float]:
    lo, hi = float(o.min()), float(o.max())
    wlo, whi = (float(v) for v in np.percentile(o, WINDOW_PERCENTILES))
    if whi <= wlo:
        wlo, whi = lo, hi if hi > lo else lo + 1.0
    case_id = "c" + secrets.token_hex(6)
    conn.execute("INSERT INTO cases VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (case_id, str(source), label, lo, hi, (wlo + whi) / 2, whi - wlo))
    return case_id, _add_image(conn, root, case_id, _to_u16(o, lo, hi)), lo, hi


def _add_image(conn, root: Path, case_id: str, u16: np.ndarray) -> str:
    image_id = secrets.token_hex(8)
    np.save(root / IMAGES_DIR / f"{image_id}.npy", np.ascontiguousarray(u16))
    conn.execute("INSERT INTO images VALUES (?, ?, ?, ?, ?)",
                 (image_id, case_id, f"{image_id}.npy", int(u16.shape[0]), int(u16.shape[1])))
    return image_id
