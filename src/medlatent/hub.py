"""Fetching official files from the Hugging Face Hub and checking the official YAML configs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from medlatent.registry import ModelInfo

logger = logging.getLogger(__name__)


class WeightsNotFoundError(FileNotFoundError):
    """The weights of a model are neither in the Hugging Face cache nor downloadable.

    ``summary`` says which file is missing and why (``str(e)`` adds how to provide it from Python); callers such
    as the CLI phrase their own way out from ``summary`` and ``download_command``.
    """

    def __init__(self, info: ModelInfo, filename: str, why: str, cache: str | Path) -> None:
        # not ``self.filename``: OSError prints that attribute instead of the message
        self.model, self.repo_id, self.hub_file, self.why = info.name, info.repo_id, filename, why
        self.summary = f"{filename!r} of model {info.name!r} is not in the Hugging Face cache ({cache}) and {why}"
        self.download_command = f"{_download_cli()} download {info.repo_id} {filename}"
        super().__init__(
            f"{self.summary}. Download it where the Hub is reachable (`{self.download_command}`) and pass it with "
            f"`checkpoint=PATH` (Python) or `--checkpoint PATH` (CLI), or copy the Hugging Face cache (HF_HOME) "
            f"that holds it to this machine."
        )


class ConfigMismatchError(ValueError):
    """An official YAML config disagrees with the medlatent registry."""


# Seconds to wait for the Hub's first answer (HF_HUB_ETAG_TIMEOUT overrides it). huggingface_hub's own path
# retries a failed connection five times with back-off, which made an unreachable Hub cost ~30 s per file.
PROBE_TIMEOUT_S = 5.0

# endpoint → why it could not be reached: one process asks an unreachable Hub once, not once per file or model
_unreachable: dict[str, str] = {}


def _download_cli() -> str:
    """The command-line tool of the installed huggingface_hub (``hf`` replaced ``huggingface-cli`` in 0.34)."""
    from huggingface_hub import __version__

    major_minor = tuple(int(p) for p in __version__.split(".")[:2] if p.isdigit())
    return "hf" if major_minor >= (0, 34) else "huggingface-cli"


@contextmanager
def _hub_logs(quiet: bool) -> Iterator[None]:
    """Each huggingface_hub message printed once, and none while ``quiet`` (its failures become our one error).

    huggingface_hub logs through its own handler; with a root handler configured as well, every warning
    (one per retry) appeared twice.
    """
    hub_logger = logging.getLogger("huggingface_hub")
    saved = hub_logger.level, hub_logger.propagate
    if hub_logger.handlers:
        hub_logger.propagate = False
    if quiet:
        hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(saved[0])
        hub_logger.propagate = saved[1]


def _from_cache(info: ModelInfo, filename: str, revision: str | None, cache_dir: str | Path | None) -> Path | None:
    """The cached file, or None. A pure file-system lookup: no request, not even huggingface_hub's headers."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(info.repo_id, filename, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None  # None, or a marker that the Hub lacks the file


def _probe(info: ModelInfo, filename: str, revision: str | None, cache: Path) -> None:
    """One request, no retries, a short timeout: raise :class:`WeightsNotFoundError` unless the Hub has the file."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    endpoint = constants.ENDPOINT
    if endpoint in _unreachable:
        raise WeightsNotFoundError(info, filename, _unreachable[endpoint], cache)
    timeout = constants.HF_HUB_ETAG_TIMEOUT if os.environ.get("HF_HUB_ETAG_TIMEOUT") else PROBE_TIMEOUT_S
    try:
        get_hf_file_metadata(hf_hub_url(info.repo_id, filename, revision=revision), timeout=timeout)
    except HfHubHTTPError as e:  # the Hub answered: missing file, gated or private repository, server error
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsNotFoundError(info, filename, f"the Hub at {endpoint} refused it ({first_line})", cache) from e
    except Exception as e:  # no answer: DNS, refused connection, timeout, proxy or TLS; types differ by HTTP client
        _unreachable[endpoint] = f"the Hub at {endpoint} is unreachable ({type(e).__name__}: {e})"
        raise WeightsNotFoundError(info, filename, _unreachable[endpoint], cache) from e


def hub_download(info: ModelInfo, filename: str, *, revision: str | None = None,
                 cache_dir: str | Path | None = None, local_files_only: bool | None = None) -> Path:
    """Path of ``filename`` from ``info.repo_id``: from the HF cache, or downloaded.

    The cache is tried first, without any network call. Offline (``HF_HUB_OFFLINE`` or ``local_files_only``)
    that is all; otherwise one short request (no retries) checks that the Hub answers before downloading.
    Honours ``HF_HUB_OFFLINE``/``HF_HOME``/``HF_HUB_CACHE``/``HF_ENDPOINT``/``HF_HUB_ETAG_TIMEOUT``. Raises
    :class:`WeightsNotFoundError` with instructions when the file is neither cached nor downloadable.
    """
    from huggingface_hub import constants, hf_hub_download

    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    with _hub_logs(quiet=True):
        cached = _from_cache(info, filename, revision, cache_dir)
        if cached is not None:
            return cached
        if offline:
            raise WeightsNotFoundError(info, filename, "offline mode is on (HF_HUB_OFFLINE / local_files_only)",
                                       cache)
        _probe(info, filename, revision, cache)
    logger.info("downloading %s from %s", filename, info.repo_id)
    try:
        with _hub_logs(quiet=False):
            return Path(hf_hub_download(info.repo_id, filename, revision=revision, cache_dir=cache_dir))
    except Exception as e:  # huggingface_hub raises several types (HTTP, connection, disk, gated)
        raise WeightsNotFoundError(info, filename, f"the download failed ({type(e).__name__}: {e})", cache) from e


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
