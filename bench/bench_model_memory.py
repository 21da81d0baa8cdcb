"""Peak memory and time of one encode / one decode, medlatent vs the official MedVAE code (CPU).

Both implementations run the *same random weights* (one official-format checkpoint per model) in fresh
worker processes of the *same interpreter*, so torch version and threads are identical. Each case is
watched from outside: its resident memory is sampled and the worker is killed when it passes
``--limit-gb`` (reported as OOM), which is how the official dense attention fails on large images.

Usage (the interpreter needs torch, and the official ``medvae`` package for the official side):

    python bench/bench_model_memory.py --models medvae_4_1_2d medvae_8_1_2d --sizes 512 1024 \
        --repeats 1 --out bench/results/model_memory.json
    python bench/bench_model_memory.py --models medvae_4_1_3d medvae_8_1_3d --sizes 64 --repeats 3 \
        --out bench/results/model_memory_3d_64.json

``--impls`` takes ``official``, ``medlatent`` (fp32) and ``medlatent-bf16`` (bf16 autocast, as ``--precision bf16``;
only on CPUs with native bf16, see ``medlatent.deploy.cpu``), and medlatent's exported graphs through its CPU
deployment backends: ``medlatent-onnxruntime`` (fp32), ``medlatent-openvino`` (fp32) and ``medlatent-openvino-bf16``
(as ``--backend openvino --precision bf16``; the graphs are exported and compiled before the timed call, as the CLI
does once per model; set ``MEDLATENT_CACHE`` to keep them between workers). ``--warmup`` runs every implementation
once, untimed, on a small input first (one-off primitive creation and graph compilation), the same for all.

``--sizes`` is the edge of a square image or cubic volume. Up to 160 voxels per axis, the official 3D
inference (MONAI's sliding window with 160-voxel windows) is a single window, i.e. the model call timed here.

medlatent is imported from ``src/`` of this checkout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_gb(pid: int, field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


# ------------------------------------------------------------------------------------------ worker side
def _official_model(name: str, ckpt: str):
    import torch

    spec = importlib.util.find_spec("medvae")
    if spec is None:
        raise SystemExit("official package 'medvae' not installed in this interpreter")
    pkg = types.ModuleType("medvae")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["medvae"] = pkg  # skip medvae/__init__ (imports the whole training stack)
    sys.path.insert(0, str(ROOT / "src"))
    from medlatent.registry import get_model_info

    c = get_model_info(name).config
    if c.spatial_dims == 3:  # at ≤160 voxels per axis the official MONAI sliding window is this one call
        from medvae.models.autoencoder_kl_3d import AutoencoderKL
    else:
        from medvae.models.autoencoder_kl import AutoencoderKL
    dd = dict(double_z=True, z_channels=c.z_channels, resolution=256, in_channels=c.in_channels,
              out_ch=c.out_channels, ch=c.ch, ch_mult=list(c.ch_mult), num_res_blocks=c.num_res_blocks,
              attn_resolutions=[], dropout=0.0)
    model = AutoencoderKL(ddconfig=dd, embed_dim=c.embed_dim)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"], strict=True)
    return model.eval(), lambda x: model.encode(x).sample(), model.decode


def _medlatent_model(name: str, ckpt: str, bf16: bool = False, backend: str = "torch"):
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from medlatent import MedVAE

    model = MedVAE.from_pretrained(name, checkpoint=ckpt)
    if backend != "torch":  # exported graphs: the deployment path, fp32 or bf16 by the backend's own precision hint
        from medlatent.deploy import for_backend

        graph = for_backend(model, backend, "bf16" if bf16 else "fp32")
        return model, lambda x: graph.encode(x).mean, graph.decode
    if not bf16:
        return model, lambda x: model.encode(x).mean, model.decode

    def autocast(fn):  # `--precision bf16`: autocast, GroupNorm statistics in float32, result back in float32
        def run(t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(t).float()
        return run

    return model, autocast(lambda x: model.encode(x).mean), autocast(model.decode)


IMPLS = ("official", "medlatent", "medlatent-bf16", "medlatent-onnxruntime", "medlatent-openvino",
         "medlatent-openvino-bf16")


def worker(impl: str, name: str, size: int, op: str, ckpt: str, repeats: int, warmup: bool = False) -> None:
    import resource

    import torch

    if impl == "official":
        model, enc, dec = _official_model(name, ckpt)
    else:
        backend = next((b for b in ("onnxruntime", "openvino") if b in impl), "torch")
        model, enc, dec = _medlatent_model(name, ckpt, bf16=impl.endswith("bf16"), backend=backend)
    cfg_s = 2 ** (len(model.encoder.down) - 1)
    c = model.quant_conv.out_channels // 2
    g = torch.Generator().manual_seed(0)
    dims = model.quant_conv.weight.ndim - 2
    x = torch.rand((1, model.encoder.conv_in.in_channels, *(size,) * dims), generator=g) * 2 - 1
    z = torch.randn((1, c, *(size // cfg_s,) * dims), generator=g)
    if warmup:  # untimed, at 4 latent voxels per axis: primitive creation / graph compilation happen here
        with torch.no_grad():
            small = (4 * cfg_s,) * dims
            enc(x[(..., *(slice(0, n) for n in small))]) if op == "encode" else dec(z[(..., *(slice(0, 4),) * dims)])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = enc(x) if op == "encode" else dec(z)
            times.append(time.perf_counter() - t0)
            del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": statistics.median(times), "times": times, "baseline_gb": base, "peak_gb": peak,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


# ------------------------------------------------------------------------------------------ parent side
def run_case(python: str, impl: str, name: str, size: int, op: str, ckpt: Path, repeats: int,
             limit_gb: float, timeout: float, warmup: bool = False) -> dict:
    cmd = [python, __file__, "--worker", impl, name, str(size), op, str(ckpt), str(repeats), str(int(warmup))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched, status, t0 = 0.0, "ok", time.time()
    while proc.poll() is None:
        rss = _rss_gb(proc.pid)
        watched = max(watched, rss)
        if rss > limit_gb:
            proc.kill()
            status = f"OOM (> {limit_gb:g} GB)"
        elif time.time() - t0 > timeout:
            proc.kill()
            status = f"timeout (> {timeout:g} s)"
        time.sleep(0.02)
    out, err = proc.communicate()
    row = {"impl": impl, "model": name, "size": size, "op": op, "status": status, "watched_peak_gb": watched}
    if status == "ok":
        if proc.returncode != 0:
            row["status"] = f"error (rc {proc.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}"
        else:
            row.update(json.loads(out.strip().splitlines()[-1]))
    return row


def make_checkpoint(name: str, directory: Path) -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from medlatent import MedVAE

    torch.manual_seed(0)
    model = MedVAE.from_config(name)
    path = directory / f"{name}.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)  # official key layout
    return path


def summary(rows: list[dict], impls: list[str]) -> str:
    """Markdown table: per case, each implementation's best time over the rounds and its speed-up against the first
    implementation (e.g. official)."""
    best: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if "seconds" in r:
            cell = best.setdefault((r["model"], r["size"], r["op"]), {})
            cell[r["impl"]] = min(cell.get(r["impl"], float("inf")), r["seconds"])
    lines = ["| model | size | op | " + " | ".join(impls) + " |", "|---" * (3 + len(impls)) + "|"]
    for (model, size, op), cell in best.items():
        base = cell.get(impls[0])
        cells = []
        for impl in impls:
            t = cell.get(impl)
            ratio = f" ({base / t:.2f}×)" if t and base and impl != impls[0] else ""
            cells.append("-" if t is None else f"{t:.2f} s{ratio}")
        lines.append(f"| {model} | {size} | {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["medvae_4_1_2d", "medvae_8_1_2d"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--ops", nargs="+", default=["encode", "decode"])
    ap.add_argument("--impls", nargs="+", default=["official", "medlatent"], choices=IMPLS)
    ap.add_argument("--warmup", action="store_true", help="one untimed call on a small input before timing")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="run every case this many times, interleaved; best kept")
    ap.add_argument("--limit-gb", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.worker:
        impl, name, size, op, ckpt, repeats, warmup = args.worker
        worker(impl, name, int(size), op, ckpt, int(repeats), warmup == "1")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = {name: make_checkpoint(name, Path(tmp)) for name in args.models}
        # rounds outermost: each case's implementations run back to back in every round, so a change of machine
        # load between cases hits them alike; the summary takes each one's best round
        for rnd in range(args.rounds):
            for name in args.models:
                for size in args.sizes:
                    for op in args.ops:
                        for impl in args.impls:
                            row = run_case(args.python, impl, name, size, op, ckpts[name], args.repeats,
                                           args.limit_gb, args.timeout, args.warmup)
                            row["round"] = rnd
                            rows.append(row)
                            secs = f"{row['seconds']:.2f} s" if "seconds" in row else "-"
                            peak = f"{row.get('peak_gb', row['watched_peak_gb']):.2f} GB"
                            case = f"{name} {size}{'³' if '3d' in name else '²'} {op:6s} {impl:23s} r{rnd}"
                            print(f"{case} {row['status']:>20s} {secs:>10s} peak {peak}", flush=True)
                            if args.out:
                                args.out.parent.mkdir(parents=True, exist_ok=True)
                                args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(summary(rows, args.impls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
