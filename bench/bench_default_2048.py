"""Encode + decode of a 2048² image with the bundled 2D default on this CPU: wall time, achieved FLOP/s and peak
memory (issue target: ≤ 20 s and ≤ 2 GB on the 2-core CPU).

    python bench/bench_default_2048.py [--size 2048] [--precision fp32|bf16] [--plan balanced|fixed]

The image is a real radiograph (pydicom-data RG1, resized); the run goes through the tiling engine as
`medlatent encode`/`decode` do (automatic tiles). FLOPs are counted once, on the whole image, with
torch.utils.flop_counter on the meta device (2 per multiply-add).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

from medlatent import MedVAE
from medlatent.engine.tiled import TiledAutoencoder
from medlatent.registry import DEFAULT_MODEL


def flops(model: MedVAE, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    meta = MedVAE(model.config).to("meta").eval()
    x = torch.zeros(1, 1, size, size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta.decode(meta.encode(x).mean)
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--plan", choices=("balanced", "fixed"), default="balanced",
                    help="balanced tiles (the engine), or fixed tiles of the maximum size (before session 8)")
    args = ap.parse_args()
    if args.plan == "fixed":
        from medlatent.engine import tiling

        tiling.balanced_tile = lambda size, tile, overlap, multiple=1: min(tile, size)
    from bench_seams import real_image

    x = F.interpolate(real_image(512), size=(args.size, args.size), mode="bicubic").clamp(-1, 1)
    model = MedVAE.from_pretrained(DEFAULT_MODEL).eval()
    engine = TiledAutoencoder(model)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=args.precision == "bf16"):
        z = engine.encode(x)
        t1 = time.perf_counter()
        y = engine.decode(z)
    t2 = time.perf_counter()
    total = flops(model, args.size)
    from medlatent.metrics import psnr

    quality = psnr(y.float().clamp(-1, 1), x, 2.0)  # against the (resized) original
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    print(json.dumps({"model": DEFAULT_MODEL, "size": args.size, "precision": args.precision, "plan": args.plan,
                      "threads": torch.get_num_threads(), "encode_s": round(t1 - t0, 2),
                      "decode_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2), "gflop": round(total / 1e9, 1),
                      "gflop_per_s": round(total / 1e9 / (t2 - t0), 1), "peak_rss_gib": round(rss, 2),
                      "psnr_db": round(float(quality), 3),
                      "tile": engine.tile_and_overlap("encode")}, indent=1))
    assert y.shape == x.shape


if __name__ == "__main__":
    main()
