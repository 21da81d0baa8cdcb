"""Tiled vs untiled on real images small enough to run untiled: PSNR and the border-gradient seam ratio.

    python bench/bench_seams.py --model medvae_4_1_2d --size 512 --tiles 128 256 --out bench/results/seams.json

Uses random weights unless ``--checkpoint`` is given or ``--trained`` loads the model's own weights (the bundled
default, or an official member from the Hugging Face cache) (results with random weights are pessimistic: an untrained
network's GroupNorm and attention react strongly to what lies outside a tile). The image is a real radiograph
(pydicom-data RG3, block-averaged to ``--size``) mapped to [-1, 1].
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medlatent import MedVAE  # noqa: E402
from medlatent.engine.seams import seam_report  # noqa: E402
from medlatent.engine.tiled import TiledAutoencoder, TileSettings, norm_options  # noqa: E402


def real_image(size: int) -> torch.Tensor:
    from pydicom.data import get_testdata_file

    from medlatent.io.readers import read_image
    from medlatent.samples import block_mean

    arr = read_image(get_testdata_file("RG3_UNCR.dcm", download=False)).array[0].astype(np.float64)
    f = max(1, min(arr.shape) // size)
    arr = block_mean(arr, f, (0, 1))[:size, :size]
    arr = (arr - arr.min()) / (arr.max() - arr.min()) * 2 - 1
    return torch.from_numpy(arr.astype(np.float32))[None, None]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="medvae_4_1_2d")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--trained", action="store_true", help="the model's released/bundled weights")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--tiles", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--norms", nargs="+", default=["tile"],
                    help="GroupNorm statistics: tile, image or image:PASSES (each is measured)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.checkpoint or args.trained:
        model = MedVAE.from_pretrained(args.model, checkpoint=args.checkpoint).eval()
    else:
        model = MedVAE.from_config(args.model).eval()
    s = model.downsample_per_axis
    x = real_image(args.size)
    rows = []
    with torch.inference_mode():
        z = model.encode(x).mean
        y = model.decode(z)
        for tile, norm in ((t, n) for t in args.tiles for n in args.norms):
            runner = TiledAutoencoder(model, TileSettings(tile=tile, **norm_options(norm)))
            t, ov = runner.tile_and_overlap("encode")
            t0 = time.perf_counter()
            zt = runner.encode(x)
            t1 = time.perf_counter()
            yt = runner.decode(z)
            t2 = time.perf_counter()
            enc = seam_report(zt[0, 0], z[0, 0], t // s, ov // s)
            dec = seam_report(yt[0, 0], y[0, 0], t // s, ov // s, scale=s)
            row = {"model": args.model, "size": args.size, "tile": t, "overlap": ov, "norm": norm,
                   "encode_seconds": t1 - t0, "decode_seconds": t2 - t1,
                   "weights": "trained" if args.checkpoint or args.trained else "random",
                   "encode_psnr_vs_untiled": enc["psnr_vs_untiled"],
                   "decode_psnr_vs_untiled": dec["psnr_vs_untiled"],
                   "decode_border_gradient_ratio": dec["border_gradient_ratio"],
                   "decode_border_gradient_ratio_untiled": dec["border_gradient_ratio_untiled"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
