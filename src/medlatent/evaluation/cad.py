"""CAD harness: do latents keep what a classifier needs? (paper §4.1, Table 1, App. B.1).

For one labelled CSV task the same classifier is trained on three kinds of input and its test AUROC compared:

* ``image`` — the high-resolution image, preprocessed as for encoding (:func:`medlatent.preprocessing.preprocess`:
  intensities to [-1, 1], volumes to RAS, RGB to gray) and resized to a fixed input size
  (:attr:`CADConfig.size`, bicubic with antialiasing; the paper resized FFDMs to 1024×512 the same way);
* ``latent`` — MedVAE's ``z`` of that image (posterior mean); for 2D models the stage-2 features
  ``stage2_features(z)`` when the model has the stage-2 head. With ``C > 1`` latent channels the classifier
  gets their mean as one input channel by default (App. B.1: "we preprocess latent representations by
  applying the mean operation across the channel dimension"), or all ``C`` as ``C`` input channels
  (``latent_channels="all"``); reports say which;
* ``interp`` — the image shrunk to the latent's size by interpolation (bicubic by default; the paper's
  baseline). 3D uses the separable tricubic equivalent (2D bicubic per slice, then 1D along the slice axis).
* ``stitched`` — 3D tasks only: a 2D model's latents of every slice along the last axis, stacked and resized
  (block means along the slice axis) to the size a 3D model of the same per-axis reduction gives: the paper's
  2D rows of the 3D tasks (§4.1, Table 1 bottom, Table 4);
* ``natural`` — a natural-image autoencoder's latent (diffusers KL-VAE / VQ-GAN, the image replicated to RGB):
  Table 1's KL-VAE and VQ-GAN rows; on 3D tasks stitched across slices as ``stitched``.

Training follows App. B.1: AdamW, a fixed number of epochs, binary tasks with one logit and BCE (multi-class:
softmax + cross-entropy), several seeds, AUROC / macro one-vs-rest AUROC from torchmetrics, reported as mean ± sd,
the final epoch's classifier tested (``CADConfig.select="best"`` keeps the epoch of the best validation AUROC
instead), batch 256 in 2D and 20 (latents) / 10 (images) in 3D, inputs of 1024×512 in 2D. Class-weighted
sampling (``WeightedRandomSampler``) is on for 3D tasks and off for 2D ones by default: the paper used it on two
of its three (imbalanced) 3D tasks and on no 2D task. Every report says which epoch was kept and how the
classifier started (ImageNet weights or from scratch). docs/paper-protocol.md lists each default beside the paper.

The sd over seeds is the sample standard deviation. The pieces, one job each:

* :mod:`~medlatent.evaluation.cad_manifest` — the CSV manifest (``path,label,split[,patient]``) and its checks;
* :mod:`~medlatent.evaluation.cad_config` — the settings (:class:`CADConfig`) and their paper defaults;
* :mod:`~medlatent.evaluation.cad_methods` — the rows (:class:`Method`, :func:`default_methods`);
* :mod:`~medlatent.evaluation.cad_inputs` — prepared inputs and their cache, with
  :mod:`~medlatent.evaluation.cad_encode` for the latent kinds;
* :mod:`~medlatent.evaluation.cad_train` — one classifier per seed and its AUROC;
* :mod:`~medlatent.evaluation.cad_results`, :mod:`~medlatent.evaluation.cad_report` — results, tables and files.

This module runs a task through them (:func:`run_cad`); every public name stays importable from here.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

# re-exported: medlatent.evaluation.cad is the public entry of the CAD harness
from medlatent.evaluation.cad_config import (  # noqa: F401
    KINDS,
    LATENT_CHANNELS,
    LATENT_KINDS,
    PAPER_SIZE,
    RESIZE_MODES,
    SELECT_RULES,
    CADConfig,
    paper_batch_size,
    resolved_settings,
)
from medlatent.evaluation.cad_encode import encode_2d, latent_input, stitched_latent_input  # noqa: F401
from medlatent.evaluation.cad_inputs import CACHE_VERSION, CachedInputs, InputBuilder, resize  # noqa: F401
from medlatent.evaluation.cad_manifest import SPLITS, CADDataError, CADEntry, CADTask, read_cad_csv  # noqa: F401
from medlatent.evaluation.cad_methods import Method, default_methods  # noqa: F401
from medlatent.evaluation.cad_report import cad_markdown, cad_table_rows, write_cad_table  # noqa: F401
from medlatent.evaluation.cad_results import (  # noqa: F401
    MIN_TEST_IMAGES,
    MIN_TEST_PER_CLASS,
    CADResult,
    MethodResult,
    SeedRun,
    auroc_ci,
    cad_warnings,
)
from medlatent.evaluation.cad_train import auroc, train_classifier  # noqa: F401
from medlatent.evaluation.classifiers import check_classifier
from medlatent.evaluation.digests import file_digest, model_fingerprint  # noqa: F401

logger = logging.getLogger(__name__)


def run_cad(csv_path: str | Path, methods: Sequence[Method], *, config: CADConfig | None = None,
            cache_dir: str | Path | None = None, task: str | None = None,
            spatial_dims: int | None = None) -> CADResult:
    """Train and test the classifier on each method's inputs, once per seed (paper §4.1, Table 1).

    Args:
        csv_path: CAD manifest (``path,label,split[,patient]``).
        methods: rows to compare, e.g. :func:`default_methods` of one or more MedVAE models.
        config: training and input settings.
        cache_dir: where prepared inputs are kept between runs (default: a temporary folder for this run).
        task: the task name (column of the table; default: the CSV's file stem).
        spatial_dims: 2 or 3; default: the models' (or 2 when only ``image`` is run and the first file is 2D).

    Returns:
        The results; write them with :func:`write_cad_table`.
    """
    config = config or CADConfig()
    if not methods:
        raise ValueError("give at least one method")
    data = read_cad_csv(csv_path)
    dims = _task_dims(data, methods, spatial_dims)
    if dims != 3 and any(m.kind == "stitched" for m in methods):
        raise ValueError(f"{csv_path}: stitched 2D latents (--stitched-2d) are rows of 3D tasks; this task is "
                         f"{dims}D, where the 2D model is a plain --model")
    labels = torch.tensor([e.label for e in data.entries], dtype=torch.long)
    splits = {s: data.indices(s) for s in SPLITS if data.indices(s)}
    classifier = config.classifier_for(dims)
    # before any input is prepared: a missing timm or offline weights fail now, in one line
    weights = check_classifier(classifier, dims, config.pretrained, config.pretrained_weights)
    if weights is not None:
        config = dataclasses.replace(config, pretrained_weights=str(weights))
    with tempfile.TemporaryDirectory(prefix="medlatent-cad-") as tmp:
        builder = InputBuilder(data, dims, config, Path(cache_dir) if cache_dir is not None else Path(tmp))
        rows = []
        for method in methods:
            inputs = builder.build(method)
            row = MethodResult(method.label, method.kind, method.f(dims), method.C, list(inputs.shape),
                               latent_channels=method.latent_channels if method.kind in LATENT_KINDS else "",
                               batch_size=config.batch_size_for(dims, method.kind))
            for seed in config.seeds:
                run = train_classifier(inputs, labels, splits, num_classes=data.num_classes, spatial_dims=dims,
                                       config=config, seed=seed, kind=method.kind)
                logger.info("%s seed %d: test AUROC %.4f (epoch %d)", method.label, seed, run.test_auroc, run.epoch)
                row.runs.append(run)
            rows.append(row)
    metric = "AUROC" if data.num_classes == 2 else "macro AUROC (one-vs-rest)"
    return CADResult(task or Path(csv_path).stem, metric, data.class_names, data.counts(), classifier,
                     resolved_settings(config, dims), rows)


def _task_dims(data: CADTask, methods: Sequence[Method], spatial_dims: int | None) -> int:
    dims = {m.model.spatial_dims for m in methods if m.kind == "latent"}
    if len(dims) > 1:
        raise ValueError("the latent methods mix 2D and 3D models; run one dimensionality per task")
    if spatial_dims is not None:
        if dims and dims != {spatial_dims}:
            raise ValueError(f"spatial_dims={spatial_dims} but the models are {dims.pop()}D")
        return spatial_dims
    if dims:
        return dims.pop()
    from medlatent.io.image import ImageReadError
    from medlatent.io.readers import read_image

    first = data.entries[0]
    try:
        return read_image(first.path).spatial_dims
    except ImageReadError as e:
        raise CADDataError(f"{data.csv_path}, line {first.line}: {e}") from e
