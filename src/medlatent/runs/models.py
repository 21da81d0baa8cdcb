"""Which model a run uses: one loader for every command, and the default model per input dimensionality."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from medlatent.io.image import ImageData
from medlatent.model.autoencoder import MedVAE
from medlatent.registry import default_model, get_model_info, list_models

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run cannot start or go on; the message is one line for the user (the CLI prints it and exits 1)."""


class ModelLoadError(RunError):
    """A model could not be built or loaded; the message says why and what to do."""


def load_model(model: str | Path, checkpoint: str | Path | None = None, *, random_weights: bool = False,
               provide: str | None = None, device: str | None = None) -> MedVAE:
    """A model by registry name, model folder or checkpoint file, in eval mode (on ``device`` when given).

    Args:
        random_weights: build the registry architecture without weights (timings only).
        provide: how the caller can be given weights when the Hub cannot (e.g. the options of a command); it ends
            the message of a missing download.

    Raises:
        ModelLoadError: one line saying why.
    """
    from medlatent.checkpoints import CheckpointError
    from medlatent.hub import ConfigMismatchError, WeightsNotFoundError

    try:
        net = (MedVAE.from_config(str(model)) if random_weights
               else MedVAE.from_pretrained(model, checkpoint=checkpoint)).eval()
    except WeightsNotFoundError as e:
        if provide is None:
            raise ModelLoadError(str(e)) from e
        raise ModelLoadError(f"{e.summary}. Download it where the Hub is reachable (`{e.download_command}`) "
                             f"and give {provide}.") from e
    except (KeyError, FileNotFoundError, CheckpointError, ConfigMismatchError) as e:
        raise ModelLoadError(e.args[0] if isinstance(e, KeyError) else str(e)) from e
    return net if device is None else net.to(device)


def deployed(net: MedVAE, backend: str = "torch", precision: str = "fp32") -> MedVAE:
    """``net`` as ``backend`` runs it (:func:`medlatent.deploy.for_backend`); torch: ``net`` itself.

    Raises:
        RunError: the backend cannot run ``precision`` on this machine, its package is missing, or the export fails.
    """
    if backend == "torch":
        return net
    from medlatent.deploy import for_backend
    from medlatent.optional import OptionalDependencyError

    try:
        return for_backend(net, backend, precision)  # type: ignore[return-value]  # a GraphModel, used as one
    except (ValueError, OptionalDependencyError) as e:
        raise RunError(str(e)) from e


def check_run_options(backend: str, precision: str, device: str, compile: bool = False, norm: str = "tile") -> None:
    """Refuse, before any weights are loaded, a backend/precision/device/option mix this machine cannot run."""
    from medlatent.deploy import PrecisionError, check_precision

    try:
        check_precision(precision, backend, device)
    except PrecisionError as e:
        raise RunError(str(e)) from e
    if backend != "torch" and compile:
        raise RunError(f"--compile applies to --backend torch only (--backend {backend} compiles its own graphs)")
    if backend != "torch" and norm != "tile":
        raise RunError(f"--norm {norm} needs --backend torch: the exported graphs compute GroupNorm per tile")


#: the models compile_model has compiled (kept here rather than marked on the model; forgotten with the model)
_COMPILED: weakref.WeakSet[MedVAE] = weakref.WeakSet()


def compile_model(net: MedVAE, enabled: bool = True) -> MedVAE:
    """``torch.compile`` the encoder and decoder in place (state-dict keys unchanged), once per model."""
    if enabled and net not in _COMPILED:
        net.encoder.compile()
        net.decoder.compile()
        _COMPILED.add(net)
    return net


def model_name(net: MedVAE, fallback: str = "") -> str:
    return str(net.weights_info.get("model") or fallback or "unnamed model")


def _example(spatial_dims: int) -> str:
    """An official member of that dimensionality, to name in messages."""
    names = [n for n in list_models() if n.startswith("medvae_") and get_model_info(n).spatial_dims == spatial_dims]
    return names[0] if names else "NAME"


class ModelChoice:
    """The model for each input: the one given, else the default for the input's dimensionality.

    A given name is loaded at once (so that a wrong name fails before any output); defaults are loaded on first
    use, once each, from whichever loader thread needs them first. A default that is missing or fails to load fails
    every input that needs it, with the same reason, without trying again.
    """

    def __init__(self, model: str | Path | MedVAE | None, checkpoint: str | Path | None = None, *,
                 device: str = "cpu", compile: bool = False, provide: str | None = None,
                 on_load: Callable[[str, str], None] | None = None, backend: str = "torch",
                 precision: str = "fp32") -> None:
        self.device, self.compile, self.provide = device, compile, provide
        self.backend, self.precision = backend, precision
        self.on_load = on_load or (lambda name, note: None)
        self._lock = threading.Lock()
        self._defaults: dict[int, MedVAE | RunError] = {}
        self.given: MedVAE | None = None
        if model is None and checkpoint is not None:  # a checkpoint alone is one of the 2D default (as before)
            model = default_model(2)
        if isinstance(model, MedVAE):
            self.given = compile_model(model.to(device), compile)
        elif model is not None:
            self.given = compile_model(load_model(model, checkpoint, provide=provide, device=device), compile)
        if self.given is not None:
            self.given = deployed(self.given, backend, precision)
            self._announce(self.given, str(model if not isinstance(model, MedVAE) else ""), "given")

    def _announce(self, net: MedVAE, fallback: str, note: str) -> None:
        name = model_name(net, fallback)
        logger.info("model %s (%s)", name, note)
        self.on_load(name, note)

    def for_image(self, img: ImageData) -> MedVAE:
        """The model to encode ``img`` with (raises :class:`RunError` naming the file when there is none)."""
        if self.given is not None:
            return self.given
        dims = img.spatial_dims
        with self._lock:
            if dims not in self._defaults:
                self._defaults[dims] = self._load_default(dims)
            got = self._defaults[dims]
        if isinstance(got, RunError):
            raise RunError(f"{img.source}: {got}" if img.source else str(got))
        return got

    def _load_default(self, dims: int) -> MedVAE | RunError:
        name = default_model(dims)
        if name is None:
            return RunError(f"no bundled {dims}D default model: pass --model (e.g. {_example(dims)})")
        try:
            net = compile_model(load_model(name, provide=self.provide, device=self.device), self.compile)
            net = deployed(net, self.backend, self.precision)
        except RunError as e:
            return e
        self._announce(net, name, f"default for {dims}D inputs")
        return net

    @property
    def spatial_dims(self) -> int | None:
        """The dimensionality of the given model; ``None`` when each input gets its default."""
        return None if self.given is None else self.given.spatial_dims
