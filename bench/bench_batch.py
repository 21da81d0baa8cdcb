"""Throughput of encoding many equal-shaped 2D images: one image per forward pass vs ``--batch`` per pass.

The images are real: ``--count`` crops of ``--size``² at seeded random positions of a computed radiograph
(pydicom-data RG3), as `medlatent encode` would receive a folder of same-sized slices. Both settings run in one
process on the same prepared inputs (preprocessing excluded), alternating, median of ``--repeats``; the largest
difference between their latents is reported too.

    python bench/bench_batch.py --model medvae_4_1_2d --size 256 --count 16 --batch 8 --out bench/results/batch_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medlatent import MedVAE  # noqa: E402
from medlatent.io.image import ImageData  # noqa: E402
from medlatent.pipeline import EncodeOptions, encode_prepared, prepare  # noqa: E402


def crops(size: int, count: int, seed: int = 0) -> list[ImageData]:
    from pydicom.data import get_testdata_file

    from medlatent.io.readers import read_image

    img = read_image(get_testdata_file("RG3_UNCR.dcm", download=False)).array[0]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        i, j = (int(rng.integers(0, n - size + 1)) for n in img.shape)
        out.append(ImageData(img[None, i : i + size, j : j + size].copy(), np.eye(3), source=f"crop_{i}_{j}"))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="medvae_4_1_2d")
    ap.add_argument("--trained", action="store_true", help="the model's weights (default: random weights)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = (MedVAE.from_pretrained(args.model) if args.trained else MedVAE.from_config(args.model)).eval().to(dev)
    imgs = crops(args.size, args.count)
    settings = {"one per pass": EncodeOptions(batch=1, precision=args.precision),
                f"{args.batch} per pass": EncodeOptions(batch=args.batch, precision=args.precision)}
    prepared = [prepare(model, im) for im in imgs]
    times: dict[str, list[float]] = {k: [] for k in settings}
    latents = {}
    for k, opts in settings.items():  # warm-up
        latents[k] = encode_prepared(model, prepared, opts)
    for _ in range(args.repeats):
        for k, opts in settings.items():
            sync(dev)
            t0 = time.perf_counter()
            encode_prepared(model, prepared, opts)
            sync(dev)
            times[k].append(time.perf_counter() - t0)
    a, b = (latents[k] for k in settings)
    diff = max(float((x.z - y.z).abs().max()) for x, y in zip(a, b))
    scale = max(float(x.z.abs().max()) for x in a)
    rows = {k: {"seconds": statistics.median(v), "times": v, "images_per_s": args.count / statistics.median(v)}
            for k, v in times.items()}
    base = rows["one per pass"]["seconds"]
    for k, r in rows.items():
        r["speedup"] = base / r["seconds"]
        print(f"{k:>14s}: {r['seconds']:.2f} s for {args.count} images of {args.size}² "
              f"({r['images_per_s']:.2f}/s, {r['speedup']:.2f}×)")
    print(f"max |Δz| batched vs single: {diff:.2e} (largest |z|: {scale:.3g}; relative {diff / scale:.1e})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                        "max_abs_diff": diff, "max_abs_z": scale, "torch": torch.__version__,
                                        "threads": torch.get_num_threads(), "device": str(dev)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
