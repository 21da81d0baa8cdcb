"""Equivalence of medlatent with the official MedVAE implementation, on random weights.

Two halves, run by two interpreters:

1. ``--make-reference DIR`` runs in a *reference* venv that has the official package
   (``pip install torch==2.14.1 torchvision==0.29.1 medvae``). For each of the seven registry configs it
   builds the official model (LoRA adapters injected for the 3-channel members), randomises every weight
   — LoRA up-projections and norms included, so the merge is exercised — saves an official-format
   checkpoint ``{"state_dict": ...}``, and records the official posterior mean, stage-2 features and
   decoding of fixed inputs.
2. ``--check DIR`` runs with medlatent: loads every checkpoint through ``MedVAE.from_pretrained`` and
   compares with the recorded outputs (max abs difference, float32).

Without a mode, it runs both: ``python scripts/compare_official.py --ref-python /path/to/ref/bin/python``.
The official package is imported module by module (its top-level ``__init__`` pulls in the whole training
stack, whose pinned wandb fails under NumPy 2).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

# name → (ch_mult, z/embed channels, image channels, spatial dims, LoRA, input spatial shape)
CONFIGS = {
    "medvae_4_1_2d": ((1, 2, 4), 1, 1, 2, False, (64, 48)),
    "medvae_4_3_2d": ((1, 2, 4), 3, 3, 2, True, (64, 48)),
    "medvae_4_4_2d": ((1, 2, 4), 4, 1, 2, False, (64, 48)),
    "medvae_8_1_2d": ((1, 2, 4, 4), 1, 1, 2, False, (64, 48)),
    "medvae_8_4_2d": ((1, 2, 4, 4), 4, 3, 2, True, (64, 48)),
    "medvae_4_1_3d": ((1, 2, 4), 1, 1, 3, False, (24, 32, 16)),
    "medvae_8_1_3d": ((1, 2, 4, 4), 1, 1, 3, False, (32, 24, 16)),
}
TOLERANCE = 1e-4


@functools.lru_cache(maxsize=None)
def _import_official():
    """Import the official model modules without running ``medvae/__init__``."""
    spec = importlib.util.find_spec("medvae")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the official package 'medvae' is not installed in this interpreter")
    pkg = types.ModuleType("medvae")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["medvae"] = pkg
    ae2d = importlib.import_module("medvae.models.autoencoder_kl")
    ae3d = importlib.import_module("medvae.models.autoencoder_kl_3d")
    lora = importlib.import_module("medvae.utils.lora")
    return ae2d.AutoencoderKL, ae3d.AutoencoderKL, lora.inject_trainable_lora_extended


@torch.no_grad()
def _randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif p.ndim == 1:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def _official_model(name: str) -> torch.nn.Module:
    ae2d, ae3d, inject_lora = _import_official()
    mult, c, io, dims, lora, _ = CONFIGS[name]
    dd = dict(double_z=True, z_channels=c, resolution=256, in_channels=io, out_ch=io, ch=128,
              ch_mult=list(mult), num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    model = (ae2d if dims == 2 else ae3d)(ddconfig=dd, embed_dim=c)
    if lora:
        inject_lora(model, {"ResnetBlock", "AttnBlock"}, r=4)
    return model


def dump_keys(path: Path) -> None:
    """Write the official state-dict keys and shapes of every model (the fixture of tests/test_keys.py)."""
    keys = {name: [[k, list(v.shape)] for k, v in _official_model(name).state_dict().items()] for name in CONFIGS}
    path.write_text(json.dumps(keys, separators=(",", ":")) + "\n")


@torch.no_grad()
def make_reference(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, (_, _, io, _, _, shape)) in enumerate(CONFIGS.items()):
        gen = torch.Generator().manual_seed(1000 + i)
        model = _official_model(name)
        _randomise(model, gen)
        model.eval()
        torch.save({"state_dict": model.state_dict()}, out / f"{name}.ckpt")
        x = torch.rand((2, io, *shape), generator=gen) * 2 - 1
        posterior = model.encode(x)
        z = posterior.mode()
        feats = model.channel_proj(model.channel_ds(z) + z)
        dec = model.decode(z)
        torch.save({"x": x, "mean": z, "logvar": posterior.logvar, "stage2": feats, "decoded": dec},
                   out / f"{name}.expected.pt")
        print(f"reference {name}: latent {tuple(z.shape)}, {len(model.state_dict())} tensors", flush=True)


@torch.no_grad()
def check(ref: Path) -> dict[str, dict[str, float]]:
    from medlatent import MedVAE

    report: dict[str, dict[str, float]] = {}
    for name in CONFIGS:
        model = MedVAE.from_pretrained(name, checkpoint=ref / f"{name}.ckpt")
        exp = torch.load(ref / f"{name}.expected.pt", weights_only=True)
        posterior = model.encode(exp["x"])
        got = {"mean": posterior.mean, "logvar": posterior.logvar,
               "stage2": model.stage2_features(posterior.mean), "decoded": model.decode(posterior.mean)}
        report[name] = {k: (got[k] - exp[k]).abs().max().item() for k in got}
        report[name]["decoded_scale"] = exp["decoded"].abs().max().item()
        print(name, " ".join(f"{k}={v:.2e}" for k, v in report[name].items()), flush=True)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-reference", type=Path, help="(reference venv) write checkpoints + expected outputs")
    ap.add_argument("--check", type=Path, help="(medlatent venv) compare with a reference directory")
    ap.add_argument("--ref-python", help="interpreter of the reference venv (runs both halves)")
    ap.add_argument("--json", type=Path, help="write the max-abs-difference report here")
    ap.add_argument("--dump-keys", type=Path, help="(reference venv) write official keys/shapes as JSON")
    args = ap.parse_args()
    if args.dump_keys:
        dump_keys(args.dump_keys)
        return 0
    if args.make_reference:
        make_reference(args.make_reference)
        return 0
    ref_dir = args.check
    with tempfile.TemporaryDirectory() as tmp:
        if ref_dir is None:
            if not args.ref_python:
                ap.error("give --check DIR, --make-reference DIR, or --ref-python PYTHON")
            ref_dir = Path(tmp)
            subprocess.run([args.ref_python, __file__, "--make-reference", str(ref_dir)], check=True)
        report = check(ref_dir)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    worst = max(v for r in report.values() for k, v in r.items() if k != "decoded_scale")
    print(f"worst max-abs difference: {worst:.3e} (tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
