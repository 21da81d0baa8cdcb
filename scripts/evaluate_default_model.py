"""Honest held-out comparison of a model: quality at equal storage and bytes on disk, per image and per modality.

For each image: the model through a real latent file (float16 z, read back and decoded), interpolation
(bicubic in 2D, cubic-spline in 3D) at the model's f and at the same number of stored values as the latent
(÷ s / C^(1/d) per axis), lossy JPEG 2000 at the latent file's bytes, and the bytes of the source file, of
`xz -9e` of it and of lossless JPEG 2000 — see `medlatent.evaluation.honest` for the protocol. Writes
`results.json` (every number) and `report.md` (tables) to the output folder.

    python scripts/evaluate_default_model.py INPUT... -o OUT [--model NAME_OR_FOLDER] [--modality auto] [--no-j2k]

INPUT: image files, folders, or CSV manifests (`path` column, relative to the CSV; a `group` or
`source_modality` column groups the per-modality table, e.g. data/default_model/test_manifest.csv).
Without --model each image's dimensionality picks the bundled default (2D or 3D).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from medlatent.evaluation.honest import (
        csv_groups,
        evaluate_image_honestly,
        summarise_honestly,
        write_honest_report,
    )
    from medlatent.evaluation.recon import gather_inputs, load_input
    from medlatent.registry import default_model
    from medlatent.runs.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--model", help="registry name or model folder (default: the bundled default per dimensionality)")
    ap.add_argument("--modality", default="auto", help="auto or ct/mri/xray/other, as medlatent encode --modality")
    ap.add_argument("--no-j2k", action="store_true", help="leave out the JPEG 2000 rows")
    args = ap.parse_args(argv)

    items, skipped = gather_inputs(args.inputs)
    if skipped:
        raise SystemExit("unreadable inputs: " + "; ".join(f"{p}: {why}" for p, why in skipped))
    if not items:
        raise SystemExit("no images among the inputs")
    groups: dict[Path, str] = {}
    for p in args.inputs:
        if p.suffix.lower() == ".csv":
            groups.update(csv_groups(p))
    models: dict[str, torch.nn.Module] = {}

    def model_for(item) -> tuple[str, torch.nn.Module]:
        name = args.model or default_model(load_input(item).spatial_dims)
        if name is None:
            raise SystemExit(f"{item.source}: no bundled default model for its dimensionality; give --model")
        if name not in models:
            models[name] = load_model(name)
        return name, models[name]

    rows, started = [], time.time()
    for item in items:
        name, net = model_for(item)
        row = evaluate_image_honestly(item, net, modality=args.modality, j2k=not args.no_j2k)
        row["model"] = name
        rows.append(row)
        m = row["methods"]
        print(f"{row['image']}: model {m['model']['psnr']:.2f} dB, equal values {m['interp_equal_values']['psnr']:.2f},"
              f" latent {row['bytes']['latent']} B vs xz {row['bytes']['xz']} B", flush=True)
    group_of = {it.name: groups[it.source.resolve()] for it in items if it.source.resolve() in groups}
    summary = summarise_honestly(rows, group_of)
    files = write_honest_report(args.out, rows, summary, models, {
        "groups": group_of, "seconds": round(time.time() - started, 1), "torch": torch.__version__,
        "machine": platform.machine()})
    print(f"wrote {files['json']} and {files['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
