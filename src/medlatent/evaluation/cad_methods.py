"""The rows of a CAD table (paper Table 1): which input each classifier gets (:class:`Method`) and the paper's
set of rows for some models (:func:`default_methods`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medlatent.evaluation.cad_config import KINDS, LATENT_CHANNELS, LATENT_KINDS, RESIZE_MODES


@dataclass(frozen=True, eq=False)
class Method:
    """One kind of classifier input (a row of Table 1).

    Attributes:
        label: the row name (e.g. ``"High-Resolution"``, ``"MedVAE (f=16, C=1)"``, ``"Bicubic"``).
        kind: ``"image"``, ``"latent"``, ``"interp"``, ``"stitched"`` or ``"natural"``.
        model: the MedVAE (``latent``), a 2D MedVAE (``stitched``) or a
            :class:`~medlatent.evaluation.baselines.NaturalImageAutoencoder` (``natural``).
        downsample: per-axis reduction (``interp``; ``latent`` takes the model's).
        interp: interpolation of ``interp``: nearest, bilinear, bicubic or area.
        latent_channels: ``latent`` with ``C > 1``: ``"mean"`` (one input channel, the paper's App. B.1) or
            ``"all"`` (``C`` input channels).
    """

    label: str
    kind: str
    model: Any = None
    downsample: int = 1
    interp: str = "bicubic"
    latent_channels: str = "mean"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind in LATENT_KINDS and self.model is None:
            raise ValueError(f"method {self.label!r}: a {self.kind} method needs a model")
        if self.kind == "stitched" and self.model.spatial_dims != 2:
            raise ValueError(f"method {self.label!r}: stitched latents come from a 2D model, got a "
                             f"{self.model.spatial_dims}D one")
        if self.kind == "interp" and (self.downsample < 1 or self.interp not in RESIZE_MODES):
            raise ValueError(f"method {self.label!r}: downsample must be ≥ 1 and interp one of "
                             f"{', '.join(RESIZE_MODES)}")
        if self.latent_channels not in LATENT_CHANNELS:
            raise ValueError(f"latent channels must be one of {', '.join(LATENT_CHANNELS)}, "
                             f"got {self.latent_channels!r}")

    @property
    def per_axis(self) -> int:
        return self.model.downsample_per_axis if self.kind in LATENT_KINDS else self.downsample

    def f(self, spatial_dims: int) -> int:
        """The paper's downsizing factor (area or volume reduction)."""
        return self.per_axis**spatial_dims if self.kind != "image" else 1

    @property
    def C(self) -> int:  # noqa: N802 - the paper's name
        return self.model.C if self.kind in LATENT_KINDS else 1

    @property
    def input_channels(self) -> int:
        """Channels the classifier sees: ``C`` only for a latent given with ``latent_channels="all"``."""
        return self.C if self.kind in LATENT_KINDS and self.latent_channels == "all" else 1


def default_methods(models: "Mapping[str, Any] | Sequence[Any] | Any | None" = None,
                    kinds: Sequence[str] = ("image", "latent", "interp"), interp: str = "bicubic",
                    interp_f: Sequence[int] = (), spatial_dims: int = 2, latent_channels: str = "mean",
                    stitched: "Mapping[str, Any] | None" = None, natural: "Mapping[str, Any] | None" = None
                    ) -> list[Method]:
    """Table 1's rows for the given models: High-Resolution, then per model its latent and an interpolation
    baseline at the same per-axis reduction (one per distinct reduction).

    Args:
        models: a MedVAE, a list of them, or ``{name: model}`` (names label the rows).
        kinds: which of ``image``, ``latent``, ``interp`` to include.
        interp: interpolation of the baseline.
        interp_f: further interpolation rows at these downsizing factors ``f`` (the paper's: area or volume
            reduction, e.g. 64 = ÷8 per axis in 2D), with or without a model of that factor.
        spatial_dims: of the task, to turn ``interp_f`` into a per-axis reduction.
        latent_channels: ``"mean"`` (the paper's) or ``"all"``: how latents with ``C > 1`` reach the classifier.
        stitched: ``{name: 2D model}``: stitched-2D rows for a 3D task (with an interpolation row at each
            reduction, as for ``models``).
        natural: ``{name: NaturalImageAutoencoder}``: KL-VAE / VQ-GAN rows (stitched across slices in 3D).
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown method kinds {bad}; choose from {', '.join(KINDS)}")
    if models is None:
        named: list[tuple[str, Any]] = []
    elif isinstance(models, Mapping):
        named = list(models.items())
    elif isinstance(models, (list, tuple)):
        named = [(m.weights_info.get("model", f"model{i}"), m) for i, m in enumerate(models)]
    else:
        named = [(models.weights_info.get("model", "MedVAE"), models)]
    if not (named or stitched or natural) and any(k != "image" for k in kinds) and not interp_f:
        raise ValueError("latent and interp methods need at least one model (give --model, or only --method image)")
    out: list[Method] = []
    if "image" in kinds:
        out.append(Method("High-Resolution", "image"))
    seen: set[int] = set()  # per-axis reductions that have their interpolation row

    def add_interp(s: int, dims: int) -> None:
        if s not in seen:
            seen.add(s)
            out.append(Method(f"{interp.capitalize()} (f={s**dims})", "interp", downsample=s, interp=interp))

    for name, m in named:
        if "latent" in kinds:
            out.append(Method(f"MedVAE {name} (f={m.f}, C={m.C})" if len(named) > 1 else f"MedVAE (f={m.f}, C={m.C})",
                              "latent", model=m, latent_channels=latent_channels))
        if "interp" in kinds:
            add_interp(m.downsample_per_axis, m.spatial_dims)
    for name, m in (stitched or {}).items():
        out.append(Method(f"2D {name} stitched (C={m.C})", "stitched", model=m, latent_channels=latent_channels))
        if "interp" in kinds:
            add_interp(m.downsample_per_axis, 3)
    for name, ae in (natural or {}).items():
        out.append(Method(f"{ae.family} {name} (C={ae.C})", "natural", model=ae, latent_channels=latent_channels))
    for f in interp_f:
        s = round(f ** (1 / spatial_dims))
        if s < 2 or s**spatial_dims != f:
            raise ValueError(f"interpolation factor f={f} is not a {spatial_dims}D power of a per-axis reduction "
                             f"(2D: 16, 64; 3D: 64, 512)")
        add_interp(s, spatial_dims)
    return out
