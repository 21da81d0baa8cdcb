"""Make medlatent's 3D default `medlatent_small_4_1_3d` (3D, f=64, C=1) from the 2D default, as the paper makes
its 3D members: inflate the 2D model to 3D, then train on random 3D patches with per-slice losses.

    python scripts/default_model_data.py gather --out data/default_model     # the 2D default's files (once)
    python scripts/train_default_3d.py split         # writes scripts/default_model_split_3d.json (once)
    python scripts/train_default_3d.py manifest      # data/default_model/manifest_3d.csv (+ test_manifest_3d.csv)
    python scripts/train_default_3d.py codec --from scripts/default_model_resume/medlatent_small_4_1_2d \
        --patches 12 --sweeps 5      # what the shipped weights are: inflated, linear path re-fitted on 3D patches
    python scripts/train_default_3d.py train --from src/medlatent/weights/medlatent_small_4_1_2d   # the paper's
        # stage 2 (gradient training on 3D patches; not used for the shipped weights, see the model card)
    python scripts/evaluate_default_model.py data/default_model/test_manifest_3d.csv --model DIR -o OUT   # ONCE

Which volumes (rule fixed before any 3D training, from the 2D split of ``scripts/default_model_split.json``):
the 2D default was trained on slices of every volume of its training split, so those volumes train the 3D model
too (a model inflated from it has seen them anyway); volumes of the 2D validation and test splits were never
trained on, and are the 3D test set. Volumes with fewer than :data:`MIN_SIDE` voxels along any axis (a
two-frame "enhanced CT") are not volumes for this purpose. There is no 3D validation set: the public pip
packages hold too few volumes to spare one; the one held-out volume is looked at once, by ``test``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
SPLIT_2D = HERE / "default_model_split.json"
SPLIT_3D = HERE / "default_model_split_3d.json"
PRESET = "medlatent_small_4_1_3d-stage2_3d"
MODEL = "medlatent_small_4_1_3d"
MIN_SIDE = 8
RESULTS = HERE.parent / "bench" / "results"


def make_split() -> dict:
    files = json.loads(SPLIT_2D.read_text())["files"]
    rows = []
    for f in files:
        if f["dims"] != 3:
            continue
        small = min(f["shape"]) < MIN_SIDE
        split = "excluded" if small else ("train" if f["split"] == "train" else "test")
        rows.append({"name": f["name"], "modality": f["modality"], "shape": f["shape"], "split_2d": f["split"],
                     "split": split, **({"why": f"under {MIN_SIDE} voxels along an axis"} if small else {})})
    return {"rule": __doc__.split("Which volumes")[1].strip(), "min_side": MIN_SIDE, "files": rows}


def split() -> None:
    new = make_split()
    if SPLIT_3D.is_file():
        if json.loads(SPLIT_3D.read_text())["files"] != new["files"]:
            raise SystemExit(f"{SPLIT_3D} exists and differs from what the 2D split gives now: not rewritten")
        print(f"{SPLIT_3D} is up to date")
        return
    SPLIT_3D.write_text(json.dumps(new, indent=1) + "\n")
    print(f"wrote {SPLIT_3D}: " + ", ".join(f"{r['name']} → {r['split']}" for r in new["files"]))


def manifest(data: Path) -> tuple[Path, Path]:
    """``manifest_3d.csv`` (train rows) and ``test_manifest_3d.csv`` beside the 2D gather's files."""
    rows = json.loads(SPLIT_3D.read_text())["files"]
    written = []
    for name, keep in (("manifest_3d.csv", ("train",)), ("test_manifest_3d.csv", ("test",))):
        out = data / name
        with out.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "split", "source_modality"])
            for r in rows:
                if r["split"] in keep:
                    folder = {"train": "train", "val": "val", "test": "test"}[r["split_2d"]]
                    path = data / folder / r["name"]
                    if not path.is_file():
                        raise SystemExit(f"{path} is missing: run `python scripts/default_model_data.py gather`")
                    w.writerow([f"{folder}/{r['name']}", r["split"], r["modality"]])
        written.append(out)
        print(f"wrote {out}")
    return written[0], written[1]


def config(data: Path, run: Path, from_2d: Path, overrides: list[str]):
    from medlatent.training.config import load_config

    return load_config(PRESET, [f"data.train={data / 'manifest_3d.csv'}", f"train.output_dir={run}",
                                f"model.inflate_from={from_2d}", *overrides])


def train(data: Path, run: Path, from_2d: Path, overrides: list[str]) -> None:
    from medlatent.training.run import run as run_training
    from medlatent.training.trainer import TrainingInterrupted

    try:
        result = run_training(config(data, run, from_2d, overrides))
    except TrainingInterrupted as e:  # SIGINT/SIGTERM: the step's checkpoint is saved; `train` resumes there
        print(e, file=sys.stderr)
        raise SystemExit(128 + int(e.signum)) from None
    print(json.dumps(result, indent=2))


def codec(data: Path, run: Path, from_2d: Path, patches: int, sweeps: int, maps: int, overrides: list[str]) -> Path:
    """The 2D default inflated (``model.inflate_resample`` of the preset) → ``RUN/inflated``; then its linear main
    path re-fitted in closed form on ``patches`` random 3D training patches (alternating least squares, as the 2D
    default's codec initialisation) → ``RUN/codec``. The residual branches stay the identity."""
    import time

    import torch

    from medlatent import MedVAE
    from medlatent.training.build import architecture, inflate
    from medlatent.training.codec_init import fit_linear_path_als, init_as_codec
    from medlatent.training.data import build_datasets

    cfg = config(data, run, from_2d, overrides)
    arch = architecture(cfg)
    inflated = inflate(MedVAE.from_pretrained(from_2d), arch, cfg.model.inflate_resample)
    inflated.save_pretrained(run / "inflated", name=MODEL)
    levels = len(arch.ch_mult) - 1
    train_ds, _ = build_datasets(cfg.data, downsample=2 ** levels, seed=cfg.train.seed)
    x = torch.stack([train_ds[(i % len(train_ds), 10_000 + i)]["image"] for i in range(patches)])
    t0 = time.time()
    path = fit_linear_path_als(x, 3, levels, maps=maps, latent=arch.z_channels, max_sweeps=sweeps)
    torch.manual_seed(cfg.train.seed)
    model = init_as_codec(inflated, path)
    out = model.save_pretrained(run / "codec", name=MODEL)
    record = {"patches": patches, "patch_size": cfg.data.size, "maps": maps, "sweeps": len(path.history) - 1,
              "mse_per_sweep": path.history, "fit_seconds": round(time.time() - t0)}
    (out / "codec_fit.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"inflated model in {run / 'inflated'}, fitted codec in {out}: {record}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("split", help="write the 3D split (once)")
    m = sub.add_parser("manifest", help="the 3D training and test manifests beside the gathered files")
    m.add_argument("--data", type=Path, default=Path("data/default_model"))
    t = sub.add_parser("train", help="inflate the 2D default and train (resumes RUN's newest checkpoint)")
    t.add_argument("--data", type=Path, default=Path("data/default_model"))
    t.add_argument("--run", type=Path, default=Path(f"runs/{MODEL}"))
    t.add_argument("--from", dest="from_2d", type=Path, required=True, help="the 2D default's model folder")
    t.add_argument("overrides", nargs="*")
    c = sub.add_parser("codec", help="inflate the 2D default, then re-fit its linear path on 3D patches")
    c.add_argument("--data", type=Path, default=Path("data/default_model"))
    c.add_argument("--run", type=Path, default=Path(f"runs/{MODEL}"))
    c.add_argument("--from", dest="from_2d", type=Path, required=True, help="the 2D default's model folder")
    c.add_argument("--patches", type=int, default=24)
    c.add_argument("--sweeps", type=int, default=8)
    c.add_argument("--maps", type=int, default=4)
    c.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.cmd == "split":
        split()
    elif args.cmd == "manifest":
        manifest(args.data)
    elif args.cmd == "codec":
        codec(args.data, args.run, args.from_2d, args.patches, args.sweeps, args.maps, args.overrides)
    elif args.cmd == "train":
        train(args.data, args.run, args.from_2d, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
