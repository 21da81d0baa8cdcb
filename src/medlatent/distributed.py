"""Sharding a batch run across processes, GPUs and nodes (torchrun / torch.distributed).

Each rank takes a disjoint, deterministic shard of the sorted items (``items[rank::world]``), writes its own
manifest (``manifest.rank<R>.jsonl``), and — when launched by torchrun — rank 0 merges all rank manifests into
``manifest.jsonl`` after a barrier. Resuming works per rank as for a single process: finished outputs are skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from medlatent.batch import MANIFEST


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def take(self, items: list) -> list:
        return items[self.rank :: self.world]

    @property
    def manifest_name(self) -> str:
        return MANIFEST if not self.active else f"manifest.rank{self.rank}.jsonl"


def shard_from(spec: str | None) -> Shard:
    """``"R/N"`` explicitly, else torchrun's ``RANK``/``WORLD_SIZE`` environment, else a single shard."""
    if spec:
        try:
            r, n = (int(v) for v in spec.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like 0/4 (rank/world), got {spec!r}") from None
        if not 0 <= r < n:
            raise ValueError(f"--shard rank must be in [0, {n}), got {r}")
        return Shard(r, n)
    return Shard(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ)


def device_for(device: str) -> str:
    """``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun so that each process drives its own GPU."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def finish(shard: Shard, out: Path, failed_here: int) -> int:
    """Barrier; rank 0 merges the rank manifests. Returns the number of failures over all ranks."""
    import torch
    import torch.distributed as dist

    if not (shard.active and launched_by_torchrun()):
        return failed_here
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        total = torch.tensor([failed_here], dtype=torch.int64)
        dist.all_reduce(total)  # also a barrier: every rank has finished its manifest
        if shard.rank == 0:
            merge_manifests(out, shard.world)
        dist.barrier()
        return int(total.item())
    finally:
        if own:
            dist.destroy_process_group()


def merge_manifests(out: Path, world: int) -> Path:
    """Append every rank manifest's records to ``manifest.jsonl`` (tagged with the rank), in rank order."""
    merged = out / MANIFEST
    with open(merged, "a") as fh:
        for r in range(world):
            part = out / f"manifest.rank{r}.jsonl"
            if not part.exists():
                continue
            for line in part.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    rec["rank"] = r
                    fh.write(json.dumps(rec) + "\n")
            part.unlink()
    return merged
