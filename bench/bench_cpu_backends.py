"""CPU backends side by side: torch fp32 / bf16 autocast, ONNX Runtime fp32, OpenVINO fp32 / bf16 (medlatent.deploy).

Per released member (random weights, the same for every path, one process): one encode of a ``1×C_in×S^d`` image and
one decode of a ``1×C×(S/s)^d`` latent per path, timed after a warm-up at a small size; max |Δz| and max |Δx| against
torch fp32 (decode: of the torch fp32 latent); and the achieved FLOP/s against the CPU's peak. FLOPs are the model's
own multiply-adds ×2, counted once per member and op from its config by running the standard (training-time) graph
on the meta device under ``torch.utils.flop_counter`` (no data, no time): convolutions with nearest ×2 upsampling as
the exported graphs have them, attention and linear layers; norms and activations are not counted.

    python bench/bench_cpu_backends.py --out bench/results/cpu_backends.json
    python bench/bench_cpu_backends.py --models medvae_4_1_2d --size2d 1024 --size3d 128   # larger

``--peak-fp32`` / ``--peak-bf16`` (GFLOP/s) default to this machine: 2 cores × 2.6 GHz × 2 AVX-512 FMA units
(64 fp32 FLOP/cycle) and AMX-BF16 (1024 bf16 FLOP/cycle per core); give your CPU's figures elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medlatent.deploy import for_backend  # noqa: E402
from medlatent.model.autoencoder import MedVAE  # noqa: E402

MEMBERS = ["medvae_4_1_2d", "medvae_4_3_2d", "medvae_8_1_2d", "medvae_8_4_2d", "medvae_4_1_3d", "medvae_8_1_3d"]
PATHS = ["torch-fp32", "torch-bf16", "onnxruntime-fp32", "openvino-fp32", "openvino-bf16"]


def model_flops(net: MedVAE, shape: tuple[int, ...]) -> tuple[float, float]:
    """FLOPs (2 × multiply-adds) of one encode of a ``1×C_in×shape`` image and one decode of its latent."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = MedVAE(net.config).to("meta").eval()
    cfg, s = net.config, net.downsample_per_axis
    x = torch.zeros(1, cfg.in_channels, *shape, device="meta")
    z = torch.zeros(1, cfg.embed_dim, *(n // s for n in shape), device="meta")
    out = []
    with torch.enable_grad():  # the standard graph (what the exported graphs compute), not the sub-pixel variant
        for fn, a in ((lambda t: meta.quant_conv(meta.encoder(t)), x),
                      (lambda t: meta.decoder(meta.post_quant_conv(t)), z)):
            with FlopCounterMode(display=False) as fc:
                fn(a)
            out.append(float(fc.get_total_flops()))
    return out[0], out[1]


def runner(net: MedVAE, path: str):
    """(encode, decode) callables of ``path``, and the seconds spent preparing it (export and compile)."""
    backend, precision = path.split("-")
    t0 = time.perf_counter()
    if backend == "torch":
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
        m = net
    else:
        ctx = nullcontext
        m = for_backend(net, backend, precision)
    prep = time.perf_counter() - t0

    def enc(x):
        with torch.inference_mode(), ctx():
            return m.encode(x, check_finite=False).mean.float()

    def dec(z):
        with torch.inference_mode(), ctx():
            return m.decode(z, check_finite=False).float()

    return enc, dec, prep


def timed(fn, a, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(a)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MEMBERS)
    ap.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS)
    ap.add_argument("--size2d", type=int, default=512)
    ap.add_argument("--size3d", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per case (the fastest is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-fp32", type=float, default=2 * 2.6 * 64, help="CPU fp32 peak, GFLOP/s")
    ap.add_argument("--peak-bf16", type=float, default=2 * 2.6 * 1024, help="CPU bf16 peak, GFLOP/s")
    ap.add_argument("--out", type=Path, default=None, help="JSON rows (rewritten after every case)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for name in args.models:
        torch.manual_seed(0)
        net = MedVAE.from_config(name).eval()
        d, s = net.spatial_dims, net.downsample_per_axis
        shape = (args.size2d,) * 2 if d == 2 else (args.size3d,) * 3
        x = torch.rand(1, net.config.in_channels, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        small = torch.rand(1, net.config.in_channels, *(4 * s,) * d) * 2 - 1
        f_enc, f_dec = model_flops(net, shape)
        z_ref = x_ref = None
        for path in args.paths:
            enc, dec, prep = runner(net, path)
            dec(enc(small))  # warm-up: primitive creation, shape-independent compilation
            t_enc, z = timed(enc, x, args.repeats)
            if z_ref is None:  # torch-fp32 comes first: the reference of both ops
                z_ref = z
            t_dec, y = timed(dec, z_ref, args.repeats)
            if x_ref is None:
                x_ref = y
            peak = args.peak_bf16 if path.endswith("bf16") else args.peak_fp32
            for op, t, fl, delta in (("encode", t_enc, f_enc, (z - z_ref).abs().max().item()),
                                     ("decode", t_dec, f_dec, (y - x_ref).abs().max().item())):
                row = dict(model=name, size=shape[0], dims=d, path=path, op=op, seconds=round(t, 3),
                           max_abs_delta=delta, gflop=round(fl / 1e9, 1), gflops_per_s=round(fl / t / 1e9, 1),
                           peak_fraction=round(fl / t / 1e9 / peak, 4), prepare_s=round(prep, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"threads": args.threads, "peak_fp32_gflops": args.peak_fp32,
                                                "peak_bf16_gflops": args.peak_bf16, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
