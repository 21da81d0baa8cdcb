"""Training checkpoints that resume exactly: weights, optimisers, step counters and every RNG.

Layout of one checkpoint directory ``checkpoints/step_0001000``::

    model.safetensors        the autoencoder as trained (LoRA adapters kept as adapters)
    config.json              the architecture (MedVAEConfig) — the folder also loads with ``MedVAE.from_pretrained``
    state.pt                 optimisers, discriminator (when the GAN is on), EMA, counters (tensors and plain
                             values only)
    rng_<rank>.pt            Python / NumPy / torch (CPU and CUDA) generator states of each process

Everything is read back with ``torch.load(weights_only=True)``: no pickled code. A checkpoint is written to a
temporary folder and renamed, so a killed run never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from medlatent.checkpoints import WEIGHTS_FILE, save_pretrained
from medlatent.model import MedVAE

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root/checkpoints``, oldest first."""
    base = Path(root) / "checkpoints"
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(int(v) for v in state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model: MedVAE, state: dict[str, Any], rank: int, world_size: int,
                    is_main: bool, barrier) -> None:
    """Write one checkpoint; all ranks call this (each writes its RNG state), rank 0 writes the rest."""
    tmp = directory.with_name(directory.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp)
        torch.save({**state, "world_size": world_size}, tmp / "state.pt")
    barrier()
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    barrier()
    if is_main:
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    barrier()


def load_checkpoint_state(directory: Path, model: MedVAE, rank: int, world_size: int) -> dict[str, Any]:
    """Restore the model weights and this rank's RNG; return the rest of the training state."""
    state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
    if state.get("world_size", 1) != world_size:
        raise RuntimeError(
            f"{directory}: saved by {state.get('world_size')} processes, resumed with {world_size}; an exact "
            "resume needs the same number of processes (start a new output_dir to change it)"
        )
    weights = load_file(str(directory / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{directory}: checkpoint does not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}); was the config changed since it was written?")
    rng_file = directory / f"rng_{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state


def prune(root: str | Path, keep: int) -> None:
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
