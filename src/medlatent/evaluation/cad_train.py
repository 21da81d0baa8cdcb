"""Training and testing one CAD classifier (App. B.1): AdamW for a fixed number of epochs, BCE on one logit for
binary tasks (softmax and cross-entropy for multi-class), class-weighted sampling where asked, the final epoch or
the best validation epoch kept, test AUROC from torchmetrics."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, WeightedRandomSampler

from medlatent.evaluation.cad_config import CADConfig
from medlatent.evaluation.cad_results import SeedRun
from medlatent.evaluation.classifiers import EVAL_EXTRA, build_classifier

logger = logging.getLogger("medlatent.evaluation.cad")  # the public module's name: log lines read as before


class _Labelled(Dataset):
    def __init__(self, inputs: Dataset, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.labels[i]


# ------------------------------------------------------------------------------------------ metric
def auroc(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """AUROC (binary) or macro one-vs-rest AUROC (multi-class), computed with torchmetrics.

    Args:
        scores: ``N`` probabilities of class 1 (binary; ``N×2`` also accepted) or ``N×K`` class probabilities.
        labels: ``N`` class ids.
        num_classes: ``K``.
    """
    try:
        from torchmetrics.functional.classification import binary_auroc, multiclass_auroc
    except ImportError as e:
        raise ImportError(f"AUROC needs torchmetrics: {EVAL_EXTRA}") from e
    labels = labels.long()
    if num_classes == 2:
        if scores.ndim == 2:
            scores = scores[:, 1]
        return float(binary_auroc(scores.float(), labels))
    return float(multiclass_auroc(scores.float(), labels, num_classes=num_classes, average="macro"))



@torch.inference_mode()
def _scores(net: torch.nn.Module, data: Dataset, num_classes: int, batch_size: int, device: str) -> torch.Tensor:
    net.eval()
    out = []
    for x, _ in DataLoader(data, batch_size=batch_size, shuffle=False):
        logits = net(x.to(device)).float()
        out.append(torch.sigmoid(logits[:, 0]) if num_classes == 2 else torch.softmax(logits, dim=1))
    return torch.cat(out).cpu()


def train_classifier(inputs: Dataset, labels: torch.Tensor, splits: Mapping[str, Sequence[int]], *,
                     num_classes: int, spatial_dims: int, config: CADConfig, seed: int, kind: str = "latent"
                     ) -> SeedRun:
    """Train one classifier on ``splits["train"]`` and report its test AUROC (App. B.1).

    Args:
        inputs: item ``i`` is a ``C×…`` tensor.
        labels: ``N`` class ids.
        splits: row indices of ``train``, ``test`` and optionally ``val``.
        num_classes: ``K``; binary tasks use one logit + BCE, multi-class ``K`` logits + cross-entropy.
        spatial_dims: 2 or 3.
        config: training settings.
        seed: seeds the weights and the sampling.
        kind: the method's kind (``image``, ``latent``, …): the paper's 3D batch size depends on it.
    """
    torch.manual_seed(seed)
    in_channels = int(inputs[0].shape[0])
    out = 1 if num_classes == 2 else num_classes
    net = build_classifier(config.classifier_for(spatial_dims), spatial_dims, in_channels, out,
                           pretrained=config.pretrained, weights=config.pretrained_weights).to(config.device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    data = _Labelled(inputs, labels)
    train_idx = list(splits["train"])
    train = Subset(data, train_idx)
    g = torch.Generator().manual_seed(seed)
    batch_size = config.batch_size_for(spatial_dims, kind)
    if config.balanced_for(spatial_dims):  # each class drawn equally often (weights 1/count), as many draws as rows
        counts = torch.bincount(labels[train_idx], minlength=num_classes).float()
        weights = (1.0 / counts.clamp(min=1))[labels[train_idx]]
        sampler = WeightedRandomSampler(weights.double(), num_samples=len(train_idx), replacement=True, generator=g)
    else:
        sampler = RandomSampler(train, generator=g)
    # drop a ragged last batch of one: BatchNorm cannot train on a single sample with pooled features
    loader = DataLoader(train, batch_size=batch_size, sampler=sampler, num_workers=config.num_workers,
                        drop_last=len(train_idx) % batch_size == 1 and len(train_idx) > batch_size)
    val_idx = list(splits.get("val", []))
    val_classes = set(labels[val_idx].tolist()) if val_idx else set()
    use_val = config.select == "best" and len(val_classes) == num_classes
    if config.select == "best" and val_idx and not use_val:
        logger.warning("the val split lacks some classes; keeping the last epoch instead of the best val AUROC")
    val = Subset(data, val_idx) if use_val else None

    best: tuple[float, dict[str, torch.Tensor] | None, int] = (-math.inf, None, config.epochs - 1)
    for epoch in range(config.epochs):
        net.train()
        for x, y in loader:
            logits = net(x.to(config.device))
            y = y.to(config.device)
            loss = (F.binary_cross_entropy_with_logits(logits[:, 0].float(), y.float()) if num_classes == 2
                    else F.cross_entropy(logits.float(), y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val is not None:
            v = auroc(_scores(net, val, num_classes, batch_size, config.device), labels[val_idx], num_classes)
            if v > best[0]:  # strictly better: ties keep the earlier epoch
                best = (v, copy.deepcopy(net.state_dict()), epoch)
    if best[1] is not None:
        net.load_state_dict(best[1])
    test_idx = list(splits["test"])
    test_scores = _scores(net, Subset(data, test_idx), num_classes, batch_size, config.device)
    return SeedRun(seed, auroc(test_scores, labels[test_idx], num_classes), best[2],
                   best[0] if best[1] is not None else None)
