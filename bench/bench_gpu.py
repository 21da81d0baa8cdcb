"""GPU benchmark (prepared for the device tool; not yet run — no GPU was lent when it was written).

Cases (issue 4): 2D 1024² batch encode and decode (medlatent bf16 and fp32 vs the official code in fp32, same
random weights), 3D 256³ tiled encode + decode, 3D 512³ tiled decode. Reports seconds (CUDA-synchronised,
median of repeats), peak allocated GPU memory and achieved TFLOP/s (FLOPs counted with
torch.utils.flop_counter on one tile / batch) against the GPU's bf16 dense peak given by --peak-tflops.

    python bench/bench_gpu.py --out bench/results/gpu.json --peak-tflops 989
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medlatent import MedVAE  # noqa: E402
from medlatent.engine.tiled import TiledAutoencoder, TileSettings  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median seconds, peak GiB) of ``fn`` on the current CUDA device."""
    fn()  # warm-up (cuDNN autotune, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def official_2d(name: str, state_dict):
    spec = importlib.util.find_spec("medvae")
    if spec is None:
        return None
    pkg = types.ModuleType("medvae")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["medvae"] = pkg
    from medvae.models.autoencoder_kl import AutoencoderKL

    from medlatent.registry import get_model_info

    c = get_model_info(name).config
    dd = dict(double_z=True, z_channels=c.z_channels, resolution=256, in_channels=c.in_channels,
              out_ch=c.out_channels, ch=c.ch, ch_mult=list(c.ch_mult), num_res_blocks=c.num_res_blocks,
              attn_resolutions=[], dropout=0.0)
    m = AutoencoderKL(ddconfig=dd, embed_dim=c.embed_dim)
    m.load_state_dict(state_dict)
    return m.eval().cuda()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100/H200 SXM: 989)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    torch.backends.cudnn.benchmark = True
    rows = []

    def record(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")

    torch.manual_seed(0)
    for name in ("medvae_4_1_2d", "medvae_8_1_2d"):
        model = MedVAE.from_config(name).eval().cuda()
        s = model.downsample_per_axis
        x = torch.rand(args.batch, 1, 1024, 1024, device="cuda") * 2 - 1
        z = torch.randn(args.batch, model.C, 1024 // s, 1024 // s, device="cuda")
        off = official_2d(name, {k: v.cpu() for k, v in model.state_dict().items()})
        for op, ours, theirs in (
            ("encode", lambda: model.encode(x).mean, (lambda: off.encode(x).sample()) if off else None),
            ("decode", lambda: model.decode(z), (lambda: off.decode(z)) if off else None),
        ):
            with torch.inference_mode():
                fl = flops(ours)
                for prec in ("fp32", "bf16"):
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16"):
                        sec, peak = timed(ours, args.repeats)
                    record(case=f"{name} 1024² ×{args.batch} {op}", impl=f"medlatent {prec}", seconds=sec,
                           peak_gib=peak, images_per_s=args.batch / sec, tflops=fl / sec / 1e12,
                           peak_fraction=fl / sec / 1e12 / args.peak_tflops)
                if theirs is not None:
                    try:
                        sec, peak = timed(theirs, args.repeats)
                        record(case=f"{name} 1024² ×{args.batch} {op}", impl="official fp32", seconds=sec,
                               peak_gib=peak, images_per_s=args.batch / sec)
                    except torch.cuda.OutOfMemoryError:
                        record(case=f"{name} 1024² ×{args.batch} {op}", impl="official fp32", status="OOM")
                        torch.cuda.empty_cache()
        model = off = None  # free the GPU memory (the lambdas above only read them inside the loop)
        torch.cuda.empty_cache()

    for name, size, ops in (("medvae_4_1_3d", 256, ("encode", "decode")), ("medvae_4_1_3d", 512, ("decode",))):
        model = MedVAE.from_config(name).eval().cuda()
        s = model.downsample_per_axis
        runner = TiledAutoencoder(model, TileSettings(max_memory_gb=20.0))
        x = torch.rand(1, 1, size, size, size, device="cuda") * 2 - 1
        z = torch.randn(1, 1, size // s, size // s, size // s, device="cuda")
        for op in ops:
            fn = (lambda: runner.encode(x)) if op == "encode" else (lambda: runner.decode(z))
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                sec, peak = timed(fn, 1)
            record(case=f"{name} {size}³ {op}", impl="medlatent bf16 tiled", seconds=sec, peak_gib=peak,
                   tile=runner.tile_and_overlap(op, torch.bfloat16))
        model = runner = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
