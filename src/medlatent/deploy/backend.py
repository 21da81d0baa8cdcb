"""A MedVAE whose encoder and decoder run as exported ONNX graphs on ONNX Runtime or OpenVINO (CPU).

:class:`GraphModel` has the interface the tiling engine (:class:`medlatent.engine.tiled.TiledAutoencoder`) and the
pipeline use — ``encode(x).mean``, ``decode(z, grayscale)``, ``stage2_features(z)`` and the torch model's
attributes (config, reduction, ``max_tile``, ``weights_info``, …) — so tiling, outputs and latent files are those of
the torch path. The stage-2 head (a few small convolutions on ``z``) stays in torch: the pipeline applies it to the
blended ``z`` of the whole image, which the encoder graph's per-tile ``stage2`` output is not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medlatent.deploy.cache import cache_dir, onnx_graphs, weights_digest
from medlatent.deploy.cpu import check_precision
from medlatent.model.autoencoder import MedVAE
from medlatent.optional import import_optional

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
DEPLOY_INSTALL = "pip install 'medlatent[deploy]'"

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class _Posterior:
    """What the engine reads of an encoding: the posterior mean (the graphs compute nothing else)."""

    mean: torch.Tensor


@dataclass
class _Runners:
    encode: Runner
    decode: Runner


# compiled graphs per (weights digest, backend, precision), shared by every model object with those weights
_RUNNERS: dict[tuple[str, str, str], _Runners] = {}


def _threads() -> int:
    return max(1, torch.get_num_threads())  # what torch would use here (OMP_NUM_THREADS, torch.set_num_threads)


def _onnxruntime(graphs: Path, precision: str) -> _Runners:
    ort = import_optional("onnxruntime", "--backend onnxruntime", DEPLOY_INSTALL)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def session(name: str) -> Runner:
        s = ort.InferenceSession(str(graphs / name), opts, providers=["CPUExecutionProvider"])
        inp, out = s.get_inputs()[0].name, s.get_outputs()[0].name
        return lambda a: s.run([out], {inp: a})[0]

    return _Runners(session("encoder.onnx"), session("decoder.onnx"))


def _openvino(graphs: Path, precision: str) -> _Runners:
    ov = import_optional("openvino", "--backend openvino", DEPLOY_INSTALL)
    core = ov.Core()
    # an explicit hint: on bf16-capable CPUs OpenVINO would otherwise choose bf16 by itself
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "INFERENCE_NUM_THREADS": _threads(), "PERFORMANCE_HINT": "LATENCY",
              "CACHE_DIR": str(cache_dir() / "openvino")}

    def compiled(name: str) -> Runner:
        net = core.compile_model(core.read_model(str(graphs / name)), "CPU", config)
        request = net.create_infer_request()
        out = net.output(0)
        return lambda a: np.array(request.infer([a])[out], copy=True)

    return _Runners(compiled("encoder.onnx"), compiled("decoder.onnx"))


_MAKERS = {"onnxruntime": _onnxruntime, "openvino": _openvino}


class GraphModel:
    """``model`` with encode/decode run by ``backend`` in ``precision``; every other attribute is ``model``'s.

    Inputs and outputs are float32 torch tensors on the CPU, ``B×C×…`` as for :class:`MedVAE`.
    """

    def __init__(self, model: MedVAE, backend: str, precision: str, runners: _Runners) -> None:
        self.net, self.backend, self.precision, self._runners = model, backend, precision, runners

    def __getattr__(self, name: str):  # only for what this class does not define: the torch model's attributes
        if name == "net":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.net, name)

    def __repr__(self) -> str:
        return f"GraphModel({self.net.weights_info.get('model', 'medvae')}, {self.backend}, {self.precision})"

    def modules(self):
        raise RuntimeError(f"--backend {self.backend} runs exported graphs, whose GroupNorms compute per tile: "
                           "image-wide statistics (--norm image) need --backend torch")

    def _array(self, t: torch.Tensor, what: str, channels: int, multiple: int, check_finite: bool) -> np.ndarray:
        rank = self.net.spatial_dims + 2
        if t.ndim != rank or any(n % multiple or n < multiple for n in t.shape[2:]):
            raise ValueError(f"{what} must be B×C×… with {rank - 2} spatial sizes that are positive multiples of "
                             f"{multiple}, got shape {tuple(t.shape)}")
        if check_finite and not torch.isfinite(t).all():
            raise ValueError(f"{what} holds NaN or infinite values")
        if t.shape[1] != channels:
            if t.shape[1] != 1:
                raise ValueError(f"{what} must have {channels} channel(s), got {t.shape[1]}")
            t = t.expand(-1, channels, *t.shape[2:])  # grayscale into a 3-channel model, as MedVAE.encode does
        return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())

    def encode(self, x: torch.Tensor, *, check_finite: bool = True) -> _Posterior:
        """Posterior mean of images ``x`` (``B×in_channels×…`` in [-1, 1]); ``.mean`` is ``B×C×…/s``."""
        a = self._array(x, "image", self.net.config.in_channels, self.net.downsample_per_axis, check_finite)
        return _Posterior(torch.from_numpy(self._runners.encode(a)))

    def decode(self, z: torch.Tensor, grayscale: bool = False, *, check_finite: bool = True) -> torch.Tensor:
        """Images ``B×out_channels×…`` (one channel, the mean, with ``grayscale``) of latents ``z`` (``B×C×…``)."""
        if z.ndim >= 2 and z.shape[1] != self.net.C:
            raise ValueError(f"latent z must have {self.net.C} channel(s), got {z.shape[1]}")
        out = torch.from_numpy(self._runners.decode(self._array(z, "latent z", self.net.C, 1, check_finite)))
        return out.mean(dim=1, keepdim=True) if grayscale and out.shape[1] > 1 else out

    def stage2_features(self, z: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """The torch model's stage-2 head on ``z`` (see the module's note)."""
        return self.net.stage2_features(z.float())


def for_backend(model: MedVAE, backend: str = "torch", precision: str = "fp32") -> MedVAE | GraphModel:
    """``model`` run by ``backend`` in ``precision``: ``model`` itself for torch, else a :class:`GraphModel`.

    The graphs are exported once per weights into the cache (:func:`medlatent.deploy.cache.onnx_graphs`) and compiled
    once per process for each backend and precision.

    Raises:
        PrecisionError: the backend cannot run ``precision`` here (see :mod:`medlatent.deploy.cpu`).
        OptionalDependencyError: the backend's package is not installed.
    """
    if isinstance(model, GraphModel):
        model = model.net
    check_precision(precision, backend, str(next(model.parameters()).device))
    if backend == "torch":
        return model
    digest = weights_digest(model)
    key = (digest, backend, precision)
    if key not in _RUNNERS:
        import_optional(backend, f"--backend {backend}", DEPLOY_INSTALL)  # before a possibly long export
        graphs = onnx_graphs(model, digest)
        meta = json.loads((graphs / "onnx.json").read_text())
        logger.info("%s %s: graphs %s (opset %s)", backend, precision, graphs, meta.get("opset"))
        _RUNNERS[key] = _MAKERS[backend](graphs, precision)
    return GraphModel(model, backend, precision, _RUNNERS[key])


def backend_of(model: MedVAE | GraphModel) -> str:
    """``torch`` or the backend a :class:`GraphModel` runs."""
    return model.backend if isinstance(model, GraphModel) else "torch"
