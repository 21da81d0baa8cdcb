"""The methods of a reconstruction evaluation: each model, the interpolation baselines at its reduction, the
equal-values rows and any extra method, each a :class:`MethodSpec` with what the report says about it
(:func:`build_methods`), and the options of a run (:class:`ReconOptions`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medlatent.evaluation.baselines import (
    SLICE_BICUBIC,
    Method,
    interpolation_at,
    interpolation_methods,
    model_method,
    per_axis_factor,
    slicewise_method,
)
from medlatent.evaluation.digests import weights_sha256
from medlatent.interpolation import stored_values

if TYPE_CHECKING:
    from medlatent.engine.tiled import TileSettings
    from medlatent.evaluation.baselines import NaturalImageAutoencoder
    from medlatent.model.autoencoder import MedVAE

#: Shape of a preprocessed input ``1×C×…`` → how many values a method stores for it.
StoredCount = Callable[[tuple[int, ...]], int]


@dataclass
class MethodSpec:
    """A reconstruction method with what the report says about it (the paper's ``f`` and ``C`` columns).

    Attributes:
        fn: the method (:data:`medlatent.evaluation.baselines.Method`).
        f, C: downsizing factor and latent channels for the table (``C`` is ``None`` for interpolation).
        note: one line on what the method does.
        multiple: its input is edge-padded to a multiple of this per axis (``None``: the first model's reduction).
        in_channels: channels the preprocessing keeps for it (``None``: the first model's).
        stored: values the method keeps for an input of a given shape (the "values stored" column).
        weights_sha256: SHA-256 of a model's weights (models only).
    """

    fn: Method
    f: float | None = None
    C: int | None = None
    note: str = ""
    multiple: int | None = None
    in_channels: int | None = None
    stored: StoredCount | None = None
    weights_sha256: str = ""


def _latent_count(C: int, s: int) -> StoredCount:  # noqa: N803 - the paper's name
    """Values of a latent of ``C`` channels at ÷``s`` per axis of a padded input."""
    return lambda shape: C * math.prod(n // s for n in shape[2:])


def _shrunk_count(s: int) -> StoredCount:
    """Values of an image shrunk ÷``s`` per axis (every channel of the input kept)."""
    return lambda shape: shape[1] * math.prod(n // s for n in shape[2:])


def natural_spec(ae: "NaturalImageAutoencoder") -> MethodSpec:
    """A natural-image autoencoder as a method (slice by slice on volumes; ``f`` is per 2D image/slice)."""
    s, c = ae.downsample_per_axis, ae.C

    def stored(shape: tuple[int, ...]) -> int:
        plane = c * math.ceil(shape[2] / s) * math.ceil(shape[3] / s)
        return plane * (shape[4] if len(shape) == 5 else 1)

    return MethodSpec(ae.method(), ae.downsample_per_axis**2, ae.C, f"{ae.family} from {ae.source} (RGB-replicated)",
                      stored=stored)


def slicewise_spec(model2d: "MedVAE", model3d: "MedVAE", latent_dtype: str | None = "float16") -> MethodSpec:
    """A 2D model on volumes at the 3D model's latent size (paper Table 7, without decoder fine-tuning)."""
    s3 = model3d.downsample_per_axis
    return MethodSpec(slicewise_method(model2d, s3, latent_dtype=latent_dtype), model3d.f, model2d.C,
                      "2D model slice by slice, latents resized to the 3D latent size", multiple=s3, in_channels=1,
                      stored=lambda shape: model2d.C * math.prod(max(1, n // s3) for n in shape[2:]),
                      weights_sha256=weights_sha256(model2d))



def model_name(model: "MedVAE") -> str:
    """The model's registry name, ``medlatent`` when it has none."""
    return str(model.weights_info.get("model") or "medlatent")



def model_labels(models: Sequence["MedVAE"]) -> list[str]:
    """One row name per model: its name, with the weights' SHA-256 (12 hex) appended where two share a name
    (a fine-tuned run's ``final/`` keeps its base model's name)."""
    names = [model_name(m) for m in models]
    base = [n if names.count(n) == 1 else f"{n}@{weights_sha256(m)[:12]}" for n, m in zip(names, models)]
    # the same weights twice (a registry name and a copy of it): number them in the order given
    return [b if base.count(b) == 1 else f"{b}#{base[:i + 1].count(b)}" for i, b in enumerate(base)]


def format_f(f: float | None) -> str:
    """``16`` for integer factors, ``5.33`` otherwise; ``–`` when unknown."""
    if f is None:
        return "–"
    return str(int(f)) if float(f).is_integer() else f"{f:.3g}"


@dataclass
class ReconOptions:
    """How to evaluate (the protocol: :mod:`medlatent.evaluation.recon`).

    Attributes:
        baselines: interpolation baselines by name (``None``: all of the model's dimensionality; ``()``: none).
        modality: ``auto`` or ct/mri/xray/other for every input (a CSV ``modality`` column wins).
        mri_percentiles: percentile clipping of MRI volumes, as ``medlatent encode --mri-percentiles``.
        latent_dtype: round ``z`` through this dtype before decoding (``float16`` as stored; ``None``: no rounding).
        precision: model compute precision (``fp32``, ``bf16``, ``fp16``).
        tiles: tiled-engine settings (``None``: automatic; images that fit one tile run whole).
        samples, seeds, replace: the sampling protocol.
        roi_csv: bounding boxes for ROI PSNR (:func:`read_rois`).
        figures: how many example figures (paper Figure 4) to draw.
        title: report title.
        uneven: DICOM series with uneven slices: ``refuse`` or ``resample``.
        equal_values: for every model with ``C > 1``, an interpolation row at ``f / C``: it stores as many
            values per image as the model's latent (e.g. bicubic ÷2 per axis for a 2D model with f=16, C=4).
        interp_f: further interpolation rows at these factors ``f`` (any number > 1).
        interp: the interpolation of those rows (``None``: bicubic in 2D, area in 3D).
    """

    baselines: tuple[str, ...] | None = None
    modality: str = "auto"
    mri_percentiles: tuple[float, float] | None = None
    latent_dtype: str | None = "float16"
    precision: str = "fp32"
    tiles: "TileSettings | None" = None
    samples: int = 0
    seeds: int = 3
    replace: bool | None = None
    roi_csv: Path | None = None
    figures: int = 2
    title: str | None = None
    uneven: str = "refuse"
    equal_values: bool = True
    interp_f: tuple[float, ...] = ()
    interp: str | None = None


def as_models(model: "MedVAE | Sequence[MedVAE]") -> list["MedVAE"]:
    """One model or several as a list; refused when empty or when 2D and 3D models are mixed."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("give at least one model")
    dims = {m.spatial_dims for m in models}
    if len(dims) > 1:
        raise ValueError("the models mix 2D and 3D; compare models of one dimensionality per run")
    return models


def default_interp(spatial_dims: int) -> str:
    """The interpolation of the equal-values rows: bicubic in 2D, area (antialiased) in 3D."""
    return "bicubic" if spatial_dims == 2 else "area"


def interpolation_spec(d: int, f: float, mode: str, in_channels: int, note: str) -> MethodSpec:
    """Interpolation ``mode`` at any downsizing factor ``f`` of ``d``-D inputs with ``in_channels``, as a method
    whose values stored are those of the shrunk image (sizes rounded per axis for non-integer factors)."""
    fn, multiple = interpolation_at(d, f, mode)
    return MethodSpec(fn, f, None, note, multiple=multiple, in_channels=in_channels,
                      stored=lambda shape: stored_values(shape, f, d))


def build_methods(model: "MedVAE | Sequence[MedVAE]", options: ReconOptions,
                  extra: Mapping[str, MethodSpec] | None = None) -> dict[str, MethodSpec]:
    """The models first, then the interpolation baselines at each model's ``s``, the equal-values rows (an
    interpolation at ``f / C`` for every model with ``C > 1``, then ``options.interp_f``), then ``extra``.

    Baselines are named by their interpolation (``bicubic``) when every model has the same ``f``, else with the
    factor (``bicubic (f=64)``); equal-values and ``interp_f`` rows always carry it (``bicubic (f=4)``).
    """
    models = as_models(model)
    d = models[0].spatial_dims
    methods: dict[str, MethodSpec] = {}
    labels = model_labels(models)
    for label, m in zip(labels, models):
        s = m.downsample_per_axis
        methods[label] = MethodSpec(
            model_method(m, latent_dtype=options.latent_dtype, tiles=options.tiles, precision=options.precision),
            m.f, m.C, f"posterior mean, z stored as {options.latent_dtype or 'float32'}", multiple=s,
            in_channels=m.config.in_channels, stored=_latent_count(m.C, s), weights_sha256=weights_sha256(m))
    done: set[tuple[str, float]] = set()
    several_f = len({m.f for m in models}) > 1
    for m in models:
        s = m.downsample_per_axis
        for name, fn in interpolation_methods(d, s, options.baselines).items():
            if (name, float(m.f)) in done:
                continue
            done.add((name, float(m.f)))
            how = (f"2D bicubic ÷{s} on every slice, block means of {s} slices along Z, and back"
                   if name == SLICE_BICUBIC else f"shrink ÷{s} per axis and enlarge back")
            methods[f"{name} (f={m.f})" if several_f else name] = MethodSpec(
                fn, m.f, None, how, multiple=s,
                in_channels=m.config.in_channels, stored=_shrunk_count(s))
    mode = options.interp or default_interp(d)
    if options.interp:  # refused when unknown even if no row uses it (a C=1 model has no equal-values row)
        interpolation_at(d, 2.0, mode)
    wanted: list[tuple[float, str]] = []
    if options.equal_values:
        # f / C ≤ 1: the latent keeps as many values as the image or more, and no interpolation matches it
        wanted += [(m.f / m.C, f"stores as many values as {label} (f={m.f}, C={m.C})")
                   for label, m in zip(labels, models) if m.C > 1 and m.f > m.C]
    wanted += [(float(f), "--interp-f") for f in options.interp_f]
    for f, why in wanted:
        f = float(f)
        if (mode, round(f, 6)) in {(n, round(g, 6)) for n, g in done}:
            continue
        done.add((mode, f))
        r = per_axis_factor(f, d)
        how = f"÷{format_f(r)}" if r.is_integer() else f"÷{r:.3f} (sizes rounded)"
        methods[f"{mode} (f={format_f(f)})"] = interpolation_spec(
            d, f, mode, models[0].config.in_channels, f"{mode}: shrink {how} per axis and enlarge back; {why}")
    for name, spec in (extra or {}).items():
        if name in methods:
            raise ValueError(f"method name {name!r} is used twice")
        methods[name] = spec
    return methods
