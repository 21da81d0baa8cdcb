"""The CAD harness on latents that exist already: a latent store or folders of latent files (``medlatent encode``,
``encode --store``, ``pack``) read through :class:`~medlatent.data.LatentDataset`, instead of images the harness
encodes itself. This is the paper's use: classifiers trained on an archive kept as latents.

Labels, splits and (optionally) patients come from a CSV with a ``name`` (item name: the latent's path relative
to its folder, without ``.latent.safetensors``) or ``path`` column and columns ``label``, ``split`` and optionally
``patient``; or, without a CSV, from the labels packed into the store with those column names. The classifier,
seeds and splits are those of :func:`~medlatent.evaluation.cad.run_cad`, so a store and the folder it was packed
from give the same AUROC for the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from medlatent.evaluation.cad_config import LATENT_CHANNELS, CADConfig, resolved_settings
from medlatent.evaluation.cad_manifest import SPLITS, CADDataError, label_order
from medlatent.evaluation.cad_results import CADResult, MethodResult
from medlatent.evaluation.cad_train import train_classifier
from medlatent.evaluation.classifiers import check_classifier


def _value(ds, column: str, v: float) -> str:
    """A label value as written: the class name of a categorical column, the number otherwise."""
    if column in ds.classes:
        return ds.classes[column][int(v)]
    return str(int(v)) if float(v).is_integer() else str(v)


def latent_task(source: str | Path | Sequence[str | Path], labels: str | Path | None = None, *,
                tensor: str = "z", latent_channels: str = "mean", batch_size: int = 256,
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[int]], list[str], dict]:
    """Read the latents and their labels for a CAD run.

    Returns:
        ``(inputs N×C'×…, class ids N, split → row indices, class names, meta of the first item)``; ``C'`` is 1
        (the mean over the latent's channels, App. B.1) or ``C`` (``latent_channels="all"``).

    Raises:
        CADDataError: no labels, a missing ``label``/``split`` column, an unknown split, a patient in two splits,
            a class absent from train or test, or latents of different shapes (naming the item).
    """
    from medlatent.data import LatentDataError, LatentDataset
    from medlatent.latentfile import LatentFileError

    if latent_channels not in LATENT_CHANNELS:
        raise ValueError(f"latent channels must be one of {', '.join(LATENT_CHANNELS)}, got {latent_channels!r}")
    where = str(labels or source)
    try:
        probe = LatentDataset(source, labels, tensor=tensor, unlabelled="skip")
        columns = [c for c in ("label", "split", "patient") if c in probe.label_columns]
        if probe._labels is None or "label" not in columns or "split" not in columns:
            raise CADDataError(f"{where}: needs label and split columns (found: "
                               f"{', '.join(probe.label_columns) or 'no labels'}); a CAD task labels every latent "
                               "with its class and split (train, val, test), optionally its patient")
        ds = LatentDataset(source, labels, tensor=tensor, label_columns=columns, unlabelled="skip", meta=False)
        meta = LatentDataset(source, labels, tensor=tensor, label_columns=columns, unlabelled="skip")[0]["meta"]
        xs, ys = [], []
        for b in DataLoader(ds, batch_size=batch_size, shuffle=False):
            x = b[tensor]
            xs.append(x.mean(dim=1, keepdim=True) if latent_channels == "mean" else x)
            ys.append(b["label"].reshape(len(x), -1))
    except (LatentDataError, LatentFileError) as e:
        raise CADDataError(str(e)) from e
    except RuntimeError as e:  # default_collate: tensors of different shapes
        raise CADDataError(f"{source}: the latents differ in shape ({e}); a CAD run needs one latent size") from e
    rows = torch.cat(ys).tolist()
    values = [{c: _value(ds, c, v) for c, v in zip(columns, r)} for r in rows]
    names = label_order([v["label"] for v in values])
    bad = next((i for i, v in enumerate(values) if v["split"].lower() not in SPLITS), None)
    if bad is not None:
        raise CADDataError(f"{where}: {ds.paths[bad]}: split must be one of {', '.join(SPLITS)}, got "
                           f"{values[bad]['split']!r}")
    if len(names) < 2:
        raise CADDataError(f"{where}: only one class ({names[0]!r}); a CAD task needs at least two")
    seen: dict[str, str] = {}
    for i, v in enumerate(values):
        p, s = v.get("patient"), v["split"].lower()
        if p and seen.setdefault(p, s) != s:
            raise CADDataError(f"{where}: patient {p!r} is in split {seen[p]!r} and {s!r} ({ds.paths[i]}); all "
                               "latents of a patient must be in one split")
    ids = torch.tensor([names.index(v["label"]) for v in values], dtype=torch.long)
    splits = {s: [i for i, v in enumerate(values) if v["split"].lower() == s] for s in SPLITS}
    splits = {s: idx for s, idx in splits.items() if idx}
    for s in ("train", "test"):
        absent = [n for k, n in enumerate(names) if not any(ids[i] == k for i in splits.get(s, []))]
        if absent:
            raise CADDataError(f"{where}: split {s!r} has no latents of class(es) {', '.join(map(repr, absent))}; "
                               "every class must appear in train and test (AUROC is undefined otherwise)")
    return torch.cat(xs), ids, splits, names, meta


def run_cad_latents(source: str | Path | Sequence[str | Path], labels: str | Path | None = None, *,
                    config: CADConfig | None = None, task: str | None = None, tensor: str = "z",
                    latent_channels: str = "mean", label: str | None = None) -> CADResult:
    """Train and test the classifier on existing latents, once per seed (one ``latent`` row).

    Args:
        source: a latent store, folders of latent files, or both.
        labels: CSV (``name`` or ``path``; ``label``, ``split``, optional ``patient``); default: the store's labels.
        tensor: ``z`` or ``stage2`` (2D files encoded with stage-2 features, the paper's 2D latents).
        latent_channels: ``mean`` (the paper's App. B.1) or ``all``.
        label: the row's name (default: the model named in the latents).
    """
    config = config or CADConfig()
    inputs, ids, splits, names, meta = latent_task(source, labels, tensor=tensor, latent_channels=latent_channels)
    dims = int(meta["spatial_dims"])
    classifier = config.classifier_for(dims)
    weights = check_classifier(classifier, dims, config.pretrained, config.pretrained_weights)
    if weights is not None:
        import dataclasses

        config = dataclasses.replace(config, pretrained_weights=str(weights))
    row = MethodResult(label or f"{meta['model']} ({tensor}, stored)", "latent", int(round(meta["f"])),
                       int(meta["C"]), list(inputs.shape[1:]), latent_channels=latent_channels,
                       batch_size=config.batch_size_for(dims, "latent"))
    for seed in config.seeds:
        row.runs.append(train_classifier(inputs, ids, splits, num_classes=len(names), spatial_dims=dims,
                                         config=config, seed=seed, kind="latent"))
    counts = {s: {n: int((ids[idx] == k).sum()) for k, n in enumerate(names)} for s, idx in splits.items()}
    name = task or (Path(labels).stem if labels else Path(source if isinstance(source, (str, Path))
                                                          else source[0]).name)
    metric = "AUROC" if len(names) == 2 else "macro AUROC (one-vs-rest)"
    # the size of the latents as read
    resolved = {**resolved_settings(config, dims), "size": list(inputs.shape[2:]), "source": str(source)}
    return CADResult(name, metric, names, counts, classifier, resolved, [row])
