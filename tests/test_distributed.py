"""Sharded encode across two processes with torchrun (gloo on CPU): disjoint shards, one merged manifest."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import randomise, tiny_config
from medlatent import MedVAE
from medlatent.distributed import Shard, shard_from

PIL = pytest.importorskip("PIL.Image")


def test_shard_selection_is_disjoint_and_complete():
    items = list(range(11))
    parts = [Shard(r, 3).take(items) for r in range(3)]
    assert sorted(sum(parts, [])) == items and all(set(a).isdisjoint(b) for a in parts for b in parts if a is not b)
    assert shard_from("1/4") == Shard(1, 4)
    with pytest.raises(ValueError, match="rank/world"):
        shard_from("two")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        shard_from("2/2")


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    model_dir = tmp_path / "model"
    randomise(MedVAE(tiny_config())).save_pretrained(model_dir, name="tiny")
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        PIL.fromarray(rng.integers(0, 255, (32, 32)).astype(np.uint8)).save(src / f"img{i}.png")
    (src / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medlatent.cli", "encode", str(src), "-o", str(out), "--model", str(model_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0  # one input is broken: the run reports failure …
    assert "broken.png" in res.stderr + res.stdout
    names = sorted(p.name for p in out.glob("*.latent.safetensors"))
    assert names == [f"img{i}.latent.safetensors" for i in range(7)]  # … but every good input is done
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert not list(out.glob("manifest.rank*.jsonl"))  # merged by rank 0
    by_rank = {r: {rec["item"] for rec in records if rec["rank"] == r} for r in (0, 1)}
    assert by_rank[0] and by_rank[1] and by_rank[0].isdisjoint(by_rank[1])
    assert len(records) == 8
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # resume: nothing recomputed
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sum(r["status"] == "skipped" for r in records[8:]) == 7
