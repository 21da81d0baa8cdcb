"""Held-out reconstruction quality of a 2D model against interpolation at the same downsizing factor.

For every held-out image: medlatent's preprocessing (the same as `medlatent encode`) maps it to [-1, 1]; the
model encodes it to the posterior mean z through the tiling engine with its default settings, as `medlatent
encode` does (the whole image when it fits the memory budget and the model's `max_tile`, overlapping tiles
otherwise); z is stored as float16 (as `medlatent encode` writes it) and decoded the same way. Baselines shrink
the same image by the model's per-axis factor with nearest / bilinear / bicubic
(antialiased for bilinear and bicubic) and enlarge it back with the same method. PSNR and MS-SSIM are computed on
the original grid with both images mapped to [0, 1] (data range 1), as `medlatent roundtrip` reports them.

    python scripts/evaluate_default_model.py HELDOUT_DIR [--model medlatent_small_4_4_2d] [--out results.json]
        [--max-tile N]   # evaluate a run's weights with the tile limit `ship` will give them
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from medlatent.evaluation.baselines import INTERPOLATION, roundtrip

METHODS = INTERPOLATION[2]  # nearest, bilinear, bicubic


@torch.inference_mode()
def evaluate(heldout: Path, model_name: str, out: Path | None = None, max_tile: int | None = None) -> dict:
    from medlatent import MedVAE
    from medlatent.engine.tiled import TiledAutoencoder
    from medlatent.io.discover import discover
    from medlatent.io.readers import read_image
    from medlatent.metrics import ms_ssim, psnr
    from medlatent.preprocessing import preprocess

    model = MedVAE.from_pretrained(model_name).eval()
    if max_tile:
        model.max_tile = max_tile
    engine = TiledAutoencoder(model)
    s = model.downsample_per_axis
    items, skipped = discover([heldout])
    if skipped:
        raise SystemExit(f"unreadable held-out inputs: {skipped}")
    rows = []
    for item in items:
        img = read_image(item.source)
        if img.spatial_dims == 3:  # a volume: its middle axial slice, with the volume's intensity map
            x3, rec = preprocess(img, spatial_dims=3, in_channels=1, downsample=1)
            arr = x3[0][:, :, x3.shape[-1] // 2][None]
        else:
            arr, rec = preprocess(img, spatial_dims=2, in_channels=1, downsample=1)
        h, w = arr.shape[1:]
        pad = ((0, 0), (0, (-h) % s), (0, (-w) % s))
        x = torch.from_numpy(np.pad(arr, pad, mode="edge"))[None]
        z = engine.encode(x).half().float()
        recons = {"medlatent": engine.decode(z)}
        recons.update({m: roundtrip(x, s, m) for m in METHODS})
        truth = ((x[0, :, :h, :w] + 1) / 2).clamp(0, 1)
        row = {"image": item.source.name, "shape": [h, w]}
        for name, y in recons.items():
            y = ((y[0, :, :h, :w] + 1) / 2).clamp(0, 1)
            row[name] = {"psnr": round(psnr(truth, y), 3), "ms_ssim": round(ms_ssim(truth, y), 5)}
        rows.append(row)
        print(row["image"], {k: v for k, v in row.items() if isinstance(v, dict)})
    methods = ["medlatent", *METHODS]
    summary = {m: {k: round(float(np.nanmean([r[m][k] for r in rows])), 4) for k in ("psnr", "ms_ssim")}
               for m in methods}
    result = {"model": model_name, "weights": model.weights_info, "f": model.f, "C": model.C,
              "max_tile": model.max_tile,
              "per_axis": s, "latent_dtype": "float16", "images": rows, "mean": summary,
              "torch": torch.__version__, "machine": platform.machine()}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("heldout", type=Path)
    ap.add_argument("--model", default="medlatent_small_4_4_2d")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--max-tile", type=int, help="the model's tile limit (default: its config.json's)")
    args = ap.parse_args(argv)
    res = evaluate(args.heldout, args.model, args.out, args.max_tile)
    beats = all(res["mean"]["medlatent"][k] > res["mean"]["bicubic"][k] for k in ("psnr", "ms_ssim"))
    print("beats bicubic on both PSNR and MS-SSIM:", beats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
