"""CPU deployment: the exported ONNX graphs run by ONNX Runtime or OpenVINO behind the model interface the tiling
engine and the pipeline use, and the CPU-feature rule for bf16.

``for_backend(model, "openvino", "bf16")`` returns an object that encodes and decodes like ``model`` (same tiling,
outputs and latent files), exporting the graphs once per weights into a cache folder (``MEDLATENT_CACHE``, else
``~/.cache/medlatent``). ``backend="torch"`` returns ``model`` itself.
"""

from medlatent.deploy.backend import BACKENDS, GraphModel, for_backend
from medlatent.deploy.cache import cache_dir, onnx_graphs, weights_digest
from medlatent.deploy.cpu import PrecisionError, bf16_support, check_precision, resolve

__all__ = ["BACKENDS", "GraphModel", "PrecisionError", "bf16_support", "cache_dir", "check_precision",
           "for_backend", "onnx_graphs", "resolve", "weights_digest"]
