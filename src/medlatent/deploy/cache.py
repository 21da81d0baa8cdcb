"""The exported graphs of a model, written once per weights into a cache folder and reused.

Layout: ``<cache>/onnx/<key>/`` holds ``encoder.onnx``, ``decoder.onnx`` and ``onnx.json`` (what
:func:`medlatent.export.to_onnx` writes), where ``key`` is the SHA-256 of the weights (every tensor's name, dtype,
shape and bytes), the architecture and the exporter's version. The graphs are float32 whatever precision runs them;
OpenVINO keeps its compiled form per precision under ``<cache>/openvino`` (its own ``CACHE_DIR``, keyed by graph,
device and precision hint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from medlatent.latentfile import tensor_bytes
from medlatent.model.autoencoder import MedVAE

logger = logging.getLogger(__name__)

CACHE_ENV = "MEDLATENT_CACHE"
ONNX_META = "onnx.json"
_GRAPH_VERSION = 1  # raise when the exported graphs change for the same weights


def cache_dir() -> Path:
    """``$MEDLATENT_CACHE``, else ``$XDG_CACHE_HOME/medlatent``, else ``~/.cache/medlatent``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medlatent"


def weights_digest(model: MedVAE) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes, bytes in C order) and its config.

    Computed from the tensors in memory rather than taken from ``weights_info``: random or fine-tuned weights
    have no file digest, and a model changed after loading must not reuse another's graphs.
    """
    h = hashlib.sha256()
    h.update(json.dumps([_GRAPH_VERSION, model.config.to_dict()], sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def onnx_graphs(model: MedVAE, digest: str | None = None) -> Path:
    """The folder of ``model``'s ONNX graphs in the cache, exported first if it is not there yet.

    A concurrent process exporting the same weights is harmless: the export is staged and moved into place whole,
    and whichever lands second uses the first one's folder.
    """
    from medlatent.export import ExportError, to_onnx

    target = cache_dir() / "onnx" / (digest or weights_digest(model))[:32]
    if (target / ONNX_META).is_file():
        logger.debug("ONNX graphs from the cache: %s", target)
        return target
    logger.info("exporting ONNX graphs once for these weights into %s", target)
    try:
        to_onnx(model, target)
    except (ExportError, OSError):
        if not (target / ONNX_META).is_file():  # not a concurrent export that landed first
            raise
    return target
