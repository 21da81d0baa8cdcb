"""Latent store vs one file per latent: epoch read rate, memory, pack/unpack time and size, in one run.

Creates ``--count`` small 2D latents (``--latent-size``² × 1 float16, each with its own metadata), packs them
into a store, then reads both ways:

- ``bytes``: one process reads every item's bytes (files: open/read/close; store: one ``pread`` + SHA-256
  per item; store stream: each shard front to back with ``tarfile``, as from object storage);
- ``epoch``: a ``DataLoader`` (shuffled, ``--workers`` workers, ``--batch-size``), each run in a fresh process
  whose peak RSS (its own and its workers') and CPU time (main process and workers, which on a shared machine
  varies less than the rate) are reported, over: :class:`~medlatent.data.LatentDataset` of the files and of the
  store (items with ``meta``); the store with ``meta=False`` (z + label, one read + view per item); and
  :class:`~medlatent.data.LatentStream` (whole batches per worker, read window by window; ``z`` as float32, and
  as stored, float16). Every batch's ``z`` reaches the main process as a tensor.

The layouts take turns in each of ``--repeats`` rounds; the median and the best round are reported, and the ratios
to the files' epoch are of the medians.

Example (the numbers in bench/RESULTS.md)::

    python bench/bench_latent_store.py --count 100000 --repeats 3 --out bench/results/latent_store_100000.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medlatent.latentfile import SUFFIX, LatentFile, write_latent
from medlatent.preprocessing import Preprocessing

MODEL = {"name": "medvae_4_1_2d", "weights_sha256": "0" * 64, "f": 16.0, "C": 1, "downsample_per_axis": 4,
         "spatial_dims": 2}


def make_latents(root: Path, count: int, size: int) -> None:
    """``count`` latent files of ``C=1, size×size`` (images of ``4·size``², spacings differ per file), 1000 per
    subfolder as an encode of a real archive would mirror."""
    rng = np.random.default_rng(0)
    for i in range(count):
        spacing = 0.1 + (i % 97) / 1000
        rec = Preprocessing(2, [1, 4 * size, 4 * size], np.diag([spacing, spacing, 1.0]).tolist(), "uint16", "xray",
                            {"kind": "minmax", "lo": 0.0, "hi": float(1000 + i % 3000), "clip": False},
                            pad=[[0, 0], [0, 0]], model_shape=[4 * size, 4 * size])
        z = torch.from_numpy(rng.standard_normal((1, size, size), dtype=np.float32))
        write_latent(root / f"part{i // 1000:04d}" / (f"img{i:07d}" + SUFFIX), LatentFile(z, rec, MODEL))


def du(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def bytes_files(root: Path) -> float:
    from medlatent.data import LatentDataset

    paths = LatentDataset(root).paths
    t = time.perf_counter()
    for p in paths:
        Path(p).read_bytes()
    return len(paths) / (time.perf_counter() - t)


def bytes_store(store: Path) -> float:
    from medlatent.data.store import LatentStore

    st = LatentStore(store)
    t = time.perf_counter()
    for j in range(len(st)):
        st.read_bytes(j)
    return len(st) / (time.perf_counter() - t)


def bytes_stream(store: Path) -> float:
    n, t = 0, time.perf_counter()
    for shard in sorted(store.glob("shard-*.tar")):
        with open(shard, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
            for m in tf:
                tf.extractfile(m).read()  # type: ignore[union-attr]
                n += 1
    return n / (time.perf_counter() - t)


MODES = ("dataset", "nometa", "stream", "stream_f16")


def epoch(root: str, workers: int, batch_size: int, mode: str = "dataset") -> dict:
    """One shuffled epoch through a DataLoader; run in its own process (``--epoch``) for a clean peak RSS."""
    from torch.utils.data import DataLoader

    from medlatent.data import LatentDataset, LatentStream

    stream = mode.startswith("stream")
    t0 = time.perf_counter()
    ds = LatentStream(root, batch_size, seed=0, dtype=None if mode == "stream_f16" else torch.float32) if stream \
        else LatentDataset(root, meta=mode != "nometa")
    t1 = time.perf_counter()
    c1 = time.process_time()
    if stream:  # the stream batches (and shuffles) itself
        loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False)
    else:
        loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(0), persistent_workers=False)
    n = 0
    for b in loader:
        n += b["z"].shape[0]
    t2 = time.perf_counter()
    main_cpu = time.process_time() - c1
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, joined at the end of the epoch
    assert n == (len(ds.store) if stream else len(ds))
    return {"items": n, "index_s": t1 - t0, "epoch_s": t2 - t1, "items_per_s": n / (t2 - t1),
            "cpu_main_s": main_cpu, "cpu_workers_s": kids.ru_utime + kids.ru_stime,
            "cpu_us_per_item": (main_cpu + kids.ru_utime + kids.ru_stime) / n * 1e6,
            "peak_rss_main_mb": peak_rss_mb(), "peak_rss_worker_mb": kids.ru_maxrss / 1024}


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ``getrusage``: on Linux its peak carries over an exec from the process that
    forked, here the driver that created the latents; ``VmHWM`` starts afresh with the program."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_epoch(root: Path, args, mode: str = "dataset") -> dict:
    cmd = [sys.executable, __file__, "--epoch", str(root), "--workers", str(args.workers),
           "--batch-size", str(args.batch_size), "--mode", mode]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--latent-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of epochs (median and best reported)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to create the data (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    ap.add_argument("--epoch", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="dataset", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.epoch:
        print(json.dumps(epoch(args.epoch, args.workers, args.batch_size, args.mode)))
        return

    from medlatent.data.store import pack, unpack

    work = Path(tempfile.mkdtemp(prefix="latent-store-bench-", dir=args.workdir))
    res: dict = {"count": args.count, "latent": f"1x{args.latent_size}x{args.latent_size} float16",
                 "workers": args.workers, "batch_size": args.batch_size, "shard_size": args.shard_size,
                 "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        t = time.perf_counter()
        make_latents(work / "files", args.count, args.latent_size)
        res["create_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pack(work / "files", work / "store", shard_size=args.shard_size)
        res["pack_s"] = time.perf_counter() - t
        t = time.perf_counter()
        unpack(work / "store", work / "unpacked")
        res["unpack_s"] = time.perf_counter() - t
        shutil.rmtree(work / "unpacked")
        res["bytes_files"], res["bytes_store"] = du(work / "files"), du(work / "store")
        print(f"created {args.count} in {res['create_s']:.0f} s, packed in {res['pack_s']:.0f} s, unpacked in "
              f"{res['unpack_s']:.0f} s; {res['bytes_files'] / 1e6:.1f} MB as files, "
              f"{res['bytes_store'] / 1e6:.1f} MB as a store", flush=True)
        # both layouts were just written: both are read from the page cache (warm), as in a second epoch
        for name, fn, where in (("read_bytes_files", bytes_files, "files"), ("read_bytes_store", bytes_store, "store"),
                                ("read_bytes_store_stream", bytes_stream, "store")):
            res[name] = max(fn(work / where) for _ in range(args.repeats))
            print(f"{name}: {res[name]:,.0f} items/s", flush=True)
        layouts = (("files", "files", "dataset"), ("store", "store", "dataset"), ("store_nometa", "store", "nometa"),
                   ("store_stream", "store", "stream"), ("store_stream_f16", "store", "stream_f16"))
        # the layouts take turns in each round, so a change of the background load hits them alike
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in layouts}
        for _ in range(args.repeats):
            for name, where, mode in layouts:
                runs[name].append(run_epoch(work / where, args, mode))
        for name, _, _ in layouts:
            ranked = sorted(runs[name], key=lambda r: r["items_per_s"])
            res[f"epoch_{name}"] = med = ranked[len(ranked) // 2]
            res[f"epoch_{name}_best"] = best = ranked[-1]
            res[f"epoch_{name}_rounds"] = [r["items_per_s"] for r in runs[name]]
            print(f"epoch_{name}: median {med['items_per_s']:,.0f} items/s, best {best['items_per_s']:,.0f} (CPU "
                  f"{med['cpu_us_per_item']:.1f} µs/item: main {med['cpu_main_s']:.2f} s, workers "
                  f"{med['cpu_workers_s']:.2f} s; index {med['index_s']:.1f} s, peak RSS main "
                  f"{med['peak_rss_main_mb']:.0f} MB, worker {med['peak_rss_worker_mb']:.0f} MB)", flush=True)
        files = res["epoch_files"]["items_per_s"]
        for name, _, _ in layouts[1:]:
            res[f"ratio_epoch_{name}"] = res[f"epoch_{name}"]["items_per_s"] / files
        res["ratio_epoch"] = res["ratio_epoch_store"]
        res["ratio_bytes"] = res["read_bytes_store"] / res["read_bytes_files"]
        print(f"store / files: epoch {res['ratio_epoch']:.1f}× (meta=False {res['ratio_epoch_store_nometa']:.1f}×, "
              f"stream {res['ratio_epoch_store_stream']:.1f}×, as float16 {res['ratio_epoch_store_stream_f16']:.1f}×), "
              f"bytes {res['ratio_bytes']:.1f}×")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
