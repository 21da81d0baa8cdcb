"""State-dict keys and shapes equal those of the official implementation.

``tests/data/official_keys.json`` was written by the official code itself
(``scripts/compare_official.py --dump-keys``, in a venv with ``pip install medvae``).
"""

import json
from pathlib import Path

import pytest
import torch

from medlatent import MedVAE
from medlatent.checkpoints import merge_lora

OFFICIAL = json.loads((Path(__file__).parent / "data" / "official_keys.json").read_text())


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_keys_and_shapes_match_official(name):
    official = {k: tuple(s) for k, s in OFFICIAL[name]}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in MedVAE.from_config(name).state_dict().items()}
    if any("lora_down" in k for k in official):
        # the LoRA members: merging the adapters must give exactly our plain layout
        fake = {k: torch.empty(s, device="meta") for k, s in official.items()}
        merged = {k: tuple(v.shape) for k, v in merge_lora(fake).items()}
        assert merged == ours
        assert len(official) > len(ours)
    else:
        assert official == ours
