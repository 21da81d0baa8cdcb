"""Fetching official files from the Hugging Face Hub and checking the official YAML configs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from medlatent.registry import ModelInfo

logger = logging.getLogger(__name__)


class WeightsNotFoundError(FileNotFoundError):
    """The weights of a model could not be found locally nor downloaded."""


class ConfigMismatchError(ValueError):
    """An official YAML config disagrees with the medlatent registry."""


def hub_download(info: ModelInfo, filename: str, *, revision: str | None = None,
                 cache_dir: str | Path | None = None, local_files_only: bool | None = None) -> Path:
    """Path of ``filename`` from ``info.repo_id``: from the HF cache, or downloaded.

    Honours ``HF_HUB_OFFLINE``/``HF_HOME``/``HF_HUB_CACHE``. Raises :class:`WeightsNotFoundError` with
    instructions when the file is neither cached nor downloadable.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    offline = HF_HUB_OFFLINE if local_files_only is None else local_files_only
    try:
        return Path(hf_hub_download(info.repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=offline))
    except Exception as e:  # huggingface_hub raises several types (offline, HTTP, connection, gated)
        how = (
            f"Download it where the Hub is reachable (`huggingface-cli download {info.repo_id} {filename}`) "
            f"and pass it with `checkpoint=PATH` (Python) or `--checkpoint PATH` (CLI), or copy the Hugging "
            f"Face cache (HF_HOME) that holds it to this machine."
        )
        mode = " in offline mode (HF_HUB_OFFLINE / local_files_only)" if offline else ""
        raise WeightsNotFoundError(
            f"could not get {filename!r} of model {info.name!r} from {info.repo_id}{mode}: "
            f"{type(e).__name__}: {e}. {how}"
        ) from e


# Fields of the official `ddconfig` compared with the registry, with the expected value per model.
def _expected_ddconfig(info: ModelInfo) -> dict[str, Any]:
    c = info.config
    return {
        "double_z": True,
        "z_channels": c.z_channels,
        "in_channels": c.in_channels,
        "out_ch": c.out_channels,
        "ch": c.ch,
        "ch_mult": list(c.ch_mult),
        "num_res_blocks": c.num_res_blocks,
        "attn_resolutions": [],
    }


def check_official_yaml(info: ModelInfo, path: str | Path) -> None:
    """Compare an official MedVAE YAML config with the registry entry; raise on any mismatch.

    Accepts both layouts found in the hub repo: ``{ddconfig, embed_dim}`` at the top level, or nested
    under ``model.params`` (LDM style). The 3D models reuse the 2D YAML: only dims differ.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigMismatchError(f"{path}: cannot read the official config: {e}") from e
    params = doc.get("model", {}).get("params", doc) if isinstance(doc, dict) else None
    if not isinstance(params, dict) or "ddconfig" not in params:
        raise ConfigMismatchError(f"{path}: no 'ddconfig' found (expected at the top level or in model.params)")
    dd, problems = params["ddconfig"], []
    for key, want in _expected_ddconfig(info).items():
        got = dd.get(key, want if key == "attn_resolutions" else None)
        got = list(got) if isinstance(got, (list, tuple)) else got
        if got != want:
            problems.append(f"ddconfig.{key}: file has {got!r}, registry expects {want!r}")
    if params.get("embed_dim") != info.config.embed_dim:
        problems.append(f"embed_dim: file has {params.get('embed_dim')!r}, registry expects {info.config.embed_dim}")
    if problems:
        raise ConfigMismatchError(
            f"{path} does not describe registry model {info.name!r}:\n  " + "\n  ".join(problems)
            + "\nThe checkpoint may belong to another model; pass the matching name."
        )
    logger.debug("official config %s agrees with registry entry %s", path, info.name)
