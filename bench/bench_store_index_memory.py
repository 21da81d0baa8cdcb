"""Memory a latent store's index holds per item: a :class:`~medlatent.data.LatentStore` and a
:class:`~medlatent.data.LatentStream` over it, opened in a fresh process for each ``--count``.

The store is synthetic: every item has the bytes of one small latent file (item bytes do not matter, the index
does), names as the epoch bench gives them (``partNNNN/imgNNNNNNN``), a categorical and a numeric label column;
it is written by the store's own shard writer in shards of 10 000. Reported per item: Python heap held after
opening (``tracemalloc``, numpy arrays included), its peak while opening, and the process's RSS growth.

Example (bench/RESULTS.md; before/after: run it with ``PYTHONPATH`` set to another checkout's ``src``)::

    OMP_NUM_THREADS=1 python bench/bench_store_index_memory.py --count 20000 100000 --workdir /tmp/sim
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_latent_store import make_latents

PROBE = """
import gc, json, sys, tracemalloc
import medlatent.data.labels  # imported by the stream: not part of the index
from medlatent.data import LatentStore, LatentStream

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

n, r0 = int(sys.argv[2]), rss()
tracemalloc.start()
store = LatentStore(sys.argv[1])
gc.collect()
st_held, st_peak = tracemalloc.get_traced_memory()
stream = LatentStream(store, 256)
gc.collect()
held, peak = tracemalloc.get_traced_memory()
print(json.dumps({"count": n, "store_B_per_item": st_held / n, "store_stream_B_per_item": held / n,
                  "peak_B_per_item": peak / n, "rss_growth_B_per_item": (rss() - r0) / n}))
"""


def build(root: Path, count: int) -> Path:
    from medlatent.data.store import MANIFEST, _new_manifest, _sha256, _Todo, _write_json, _write_shard
    from medlatent.latentfile import SUFFIX

    store = root / f"store{count}"
    if (store / MANIFEST).is_file():
        return store
    make_latents(root / "one", 1, 16)
    src = root / "one" / "part0000" / ("img0000000" + SUFFIX)
    data = src.read_bytes()
    cols = ["finding", "age"]
    todo = [_Todo(f"part{i // 1000:04d}/img{i:07d}", src, len(data), _sha256(data),
                  {"finding": ("normal", "benign", "malignant")[i % 3], "age": str(18 + i % 80)}) for i in range(count)]
    manifest = _new_manifest(cols)
    store.mkdir(parents=True)
    for k, a in enumerate(range(0, count, 10_000)):
        manifest["shards"].append(_write_shard(store, k, todo[a:a + 10_000], cols))
    _write_json(store / MANIFEST, manifest)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/store-index-memory"))
    args = ap.parse_args()
    for n in args.count:
        store = build(args.workdir, n)
        out = subprocess.run([sys.executable, "-c", PROBE, str(store), str(n)], check=True, capture_output=True,
                             text=True).stdout
        print(json.dumps({k: round(v) for k, v in json.loads(out).items()}))


if __name__ == "__main__":
    main()
