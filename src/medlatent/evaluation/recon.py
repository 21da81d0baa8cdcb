"""Reconstruction quality on your own images, the way the paper reports it (§4.3; Appendix Tables 5–7, Figure 4).

For every input image (files and folders, or a CSV of ``path[,modality]``):

1. it is read and preprocessed exactly as ``medlatent encode`` does (:func:`medlatent.preprocessing.preprocess`:
   intensity map to [-1, 1], RAS for volumes, edge padding to the model's per-axis reduction ``s``);
2. every method reconstructs the preprocessed tensor (padded to its own multiple): each model (posterior mean
   ``z``, rounded through float16 as latent files store it unless told otherwise, decoded; the tiled engine
   takes images too large for one tile), the interpolation baselines at each model's ``s``
   (:mod:`medlatent.evaluation.baselines`), the equal-values rows (an interpolation at ``f / C`` for every
   model with ``C > 1``: as many values stored as its latent; ``interp_f`` for any other factor) and any extra
   method (a natural-image KL-VAE/VQ-GAN, a 2D model slice by slice on volumes);
3. each reconstruction is put back on the original grid (padding removed, orientation undone) and compared with
   the original image.

**Metric convention.** PSNR and MS-SSIM are computed on arrays mapped to [0, 1] by the image's own intensity
map (:func:`medlatent.report.to_unit`: 2D and MRI min–max, CT the HU window [-1000, 1000], values outside
clipped), with data range 1 — the same convention as ``medlatent roundtrip``. MS-SSIM uses as many of its five
scales as the image size allows (:func:`medlatent.metrics.ms_ssim`); volumes use 3D windows. ROI PSNR (the
paper's fine-grained wrist-fracture evaluation) is the PSNR of the two [0, 1] arrays cropped to a box.

**Statistics protocol (paper Tables 5–6).** The paper reports "mean and standard deviation across four runs with
different random seeds" of a random sample of 1000 images (2D), and a single random sample of 100 volumes (3D).
Here, with ``samples=N`` and ``seeds=K``: for each seed ``k = 0 … K-1`` a generator ``numpy.random.default_rng(k)``
draws ``N`` images from the pool of inputs — *without replacement* when ``N`` is smaller than the pool (a random
subset, as in the paper), otherwise a *bootstrap* sample of the pool's size (with replacement), so that the
seeds still differ; ``replace`` forces either. Each seed's value is the mean of the per-image metric over its
sample (failed images and NaN MS-SSIM of too-small images left out); the summary is the mean ± sample standard
deviation (``ddof=1``) of the ``K`` seed means (``sd`` is ``None`` for one seed). Each image is evaluated once
(its metrics are deterministic), only the images some seed drew. The mean ± sd over all evaluated images is
reported as well (``over_images``). Paper-like settings: ``samples=1000, seeds=4`` (2D), ``samples=100, seeds=1``
(3D).

**Values stored** are the numbers a method keeps per image (a latent ``C × ∏ n/s``, an interpolation its shrunk
image), reported as a fraction of the image's pixels. **Warnings** (``summary["warnings"]``, the report's
"Warnings" section) flag summaries over fewer than :data:`MIN_IMAGES` images, a single seed (its sd reads
"n/a (1 seed)") and failed inputs.

Outputs in ``out_dir``: ``results.csv`` (one row per image × method), ``roi_results.csv`` (per box, when ROIs
are given), ``samples.json`` (the images each seed drew), ``summary.json``, ``figures/*.png`` (examples and bar
charts) and ``report.md``; ``manifest.jsonl`` records every image's outcome. A file that cannot be read or
evaluated is a failure with its reason (naming the file), never skipped silently.

The pieces, one job each: :mod:`~medlatent.evaluation.recon_inputs` (the images) and
:mod:`~medlatent.evaluation.recon_rois` (their boxes), :mod:`~medlatent.evaluation.recon_methods` (the methods and
options), :mod:`~medlatent.evaluation.recon_image` (one image), :mod:`~medlatent.evaluation.recon_stats` (the
statistics protocol) and :mod:`~medlatent.evaluation.recon_report` (summary and files). This module runs an
evaluation through them (:func:`evaluate_reconstruction`); every public name stays importable from here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# re-exported: medlatent.evaluation.recon is the public entry of the reconstruction evaluation
from medlatent.evaluation.digests import safe_name, weights_sha256  # noqa: F401
from medlatent.evaluation.recon_image import CONVENTION, METRICS, ImageEvaluation, evaluate_image  # noqa: F401
from medlatent.evaluation.recon_inputs import EvalInput, EvaluationInputError, gather_inputs, load_input  # noqa: F401
from medlatent.evaluation.recon_methods import (  # noqa: F401
    MethodSpec,
    ReconOptions,
    StoredCount,
    as_models,
    build_methods,
    default_interp,
    format_f,
    interpolation_spec,
    model_labels,
    natural_spec,
    slicewise_spec,
)
from medlatent.evaluation.recon_report import (  # noqa: F401
    MIN_IMAGES,
    build_summary,
    format_seed_stat,
    format_values_stored,
    recon_warnings,
    write_outputs,
)
from medlatent.evaluation.recon_rois import Box, read_rois, roi_psnr  # noqa: F401
from medlatent.evaluation.recon_stats import Sampling, draw_samples, summarise  # noqa: F401
from medlatent.report import _view

if TYPE_CHECKING:
    from medlatent.batch import ItemResult
    from medlatent.model.autoencoder import MedVAE

logger = logging.getLogger(__name__)


@dataclass
class ReconResult:
    """What :func:`evaluate_reconstruction` produced."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    failures: list[tuple[str, str]]
    files: dict[str, Path] = field(default_factory=dict)


def evaluate_reconstruction(inputs: Sequence[str | Path], model: "MedVAE | Sequence[MedVAE]", out_dir: str | Path,
                            options: ReconOptions | None = None, *,
                            extra_methods: Mapping[str, MethodSpec] | None = None,
                            progress: Callable[["ItemResult"], None] | None = None) -> ReconResult:
    """Evaluate reconstructions of ``inputs`` by one or more models and the baselines; write results and a report.

    Args:
        inputs: files, folders and CSVs (see :func:`gather_inputs`).
        model: the autoencoder (2D or 3D), or several of one dimensionality, in eval mode, on their devices.
        out_dir: output folder (created).
        options: see :class:`ReconOptions`.
        extra_methods: more methods (:func:`natural_spec`, :func:`slicewise_spec`, or your own :class:`MethodSpec`).
        progress: called with each image's :class:`medlatent.batch.ItemResult`.

    Returns:
        :class:`ReconResult`; ``failures`` lists ``(item, reason)`` for inputs that could not be evaluated;
        ``summary["warnings"]`` says which numbers cannot mean much (see :func:`recon_warnings`).
    """
    from medlatent.batch import Job, run_jobs

    opts = options or ReconOptions()
    models = as_models(model)
    first, d = models[0], models[0].spatial_dims
    items, skipped = gather_inputs(inputs)
    rois = read_rois(opts.roi_csv) if opts.roi_csv else {}
    methods = build_methods(models, opts, extra_methods)
    sampling = draw_samples(len(items), opts.samples, opts.seeds, opts.replace)
    out = Path(out_dir)  # created once the arguments are known to be usable: a refused run leaves nothing
    out.mkdir(parents=True, exist_ok=True)
    chosen = range(len(items)) if sampling.samples >= len(items) else sampling.union()
    fig_dir = out / "figures"
    figures: list[tuple[str, Path]] = []
    values: dict[str, dict[str, dict[int, float]]] = {m: {k: {} for k in METRICS} for m in methods}
    stored: dict[str, list[tuple[int, int]]] = {m: [] for m in methods}  # (values stored, image pixels)
    rows: list[dict[str, Any]] = []
    roi_rows: list[dict[str, Any]] = []
    matched: set[Path] = set()

    def make_job(index: int):
        item = items[index]

        def run(img) -> dict[str, Any]:
            key = item.source.resolve()
            boxes = rois.get(key, [])
            if boxes:
                matched.add(key)
            try:
                ev = evaluate_image(img, first, methods, modality=item.modality or opts.modality,
                                    mri_percentiles=opts.mri_percentiles, boxes=boxes)
            except Exception as e:  # the manifest and the summary must say which file failed
                if str(item.source) in str(e):
                    raise
                raise RuntimeError(f"{item.source}: {e}") from e
            mine, my_rois = [], []
            for name, m in ev.metrics.items():
                mine.append({"image": item.name, "source": str(item.source), "method": name,
                             "psnr": m["psnr"], "ms_ssim": m["ms_ssim"], "roi_psnr": m["roi_psnr"],
                             "values_stored": m["stored"] if m["stored"] is not None else "", "pixels": ev.pixels,
                             "spatial_dims": d, "shape": list(np.shape(img.array)),
                             "modality": ev.preprocessing.modality})
                for b, v in zip(boxes, m["roi_psnrs"]):
                    my_rois.append({"image": item.name, "method": name, "box": b.where,
                                    "x0": b.x0, "y0": b.y0, "x1": b.x1, "y1": b.y1, "z0": b.z0, "z1": b.z1,
                                    "psnr": v})
            if len(figures) < opts.figures:
                from medlatent.evaluation.report import residual_figure

                path = fig_dir / f"example_{len(figures) + 1}_{safe_name(item.name, 'image')}.png"
                residual_figure(_view(ev.original, d), {k: _view(v, d) for k, v in ev.recons.items()}, path,
                                title=item.name + ("" if d == 2 else " (middle slice)"))
                figures.append((f"{item.name}: original | reconstruction | residual", path))
            # recorded only once everything for this image succeeded
            rows.extend(mine)
            roi_rows.extend(my_rois)
            for name, m in ev.metrics.items():
                for k in METRICS:
                    values[name][k][index] = m[k]
                if m["stored"] is not None:
                    stored[name].append((m["stored"], ev.pixels))
            return {k: {"psnr": v["psnr"], "ms_ssim": v["ms_ssim"]} for k, v in ev.metrics.items()}

        return Job(item.name, [], lambda: load_input(item, opts.uneven), run)

    report = run_jobs([make_job(i) for i in chosen], out, resume=False, progress=progress)
    failures = [(r.item, r.reason) for r in report.failed] + [(str(p), why) for p, why in skipped]
    if skipped:
        from medlatent.batch import MANIFEST

        with open(out / MANIFEST, "a") as mf:
            for p, why in skipped:
                mf.write(json.dumps({"item": str(p), "status": "failed", "reason": why}) + "\n")
    unmatched = sorted(set(rois) - matched)
    for path in unmatched:
        logger.warning("ROI file names %s, which was not evaluated (not among the inputs, or not sampled)", path)

    summary = build_summary(models, methods, values, stored, sampling, items, opts, failures, unmatched)
    files = write_outputs(out, rows, roi_rows, summary, sampling, items, figures, opts)
    return ReconResult(rows, summary, failures, files)
