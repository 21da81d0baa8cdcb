#!/usr/bin/env bash
# Issue 6, the paper's Figure 2 at full size on one GPU (prepared for the device tool; not yet run: no GPU was
# lent when it was written). Needs the eval extra with timm (HRNet-w64): on x86_64
#   pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[eval]"
# Writes out/eff-gpu-2d and out/eff-gpu-3d (report.md + JSON); copy the JSON to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# HRNet-w64 on 1024² images vs their f=16 / f=64 latents: latency (batch 32), throughput, max batch size
$PY -m medlatent.cli evaluate efficiency -o out/eff-gpu-2d --classifier hrnet_w64 --dims 2 --size 1024 \
    -f 16 -f 64 --batch-size 32 --repeats 5 --warmup 2 --limit 4096 --device cuda
# SEResNet-152 on 256³ volumes vs their f=64 / f=512 latents
$PY -m medlatent.cli evaluate efficiency -o out/eff-gpu-3d --classifier seresnet152 --dims 3 --size 256 \
    -f 64 -f 512 --batch-size 4 --repeats 5 --warmup 2 --limit 4096 --device cuda
