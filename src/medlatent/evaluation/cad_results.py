"""CAD results: per seed (:class:`SeedRun`), per method (:class:`MethodResult`, a table row) and per task
(:class:`CADResult`), with the AUROC's 95% interval and the warnings on numbers that cannot mean much."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medlatent.evaluation.cad_config import LATENT_KINDS

# results that cannot mean much are flagged in the report (README: "Show that latents keep the signal")
MIN_TEST_IMAGES = 20
MIN_TEST_PER_CLASS = 5


@dataclass
class SeedRun:
    """One trained classifier: its test AUROC, the kept epoch and its validation AUROC (if any)."""

    seed: int
    test_auroc: float
    epoch: int
    val_auroc: float | None


@dataclass
class MethodResult:
    """One row of the table: a method's AUROC over seeds."""

    label: str
    kind: str
    f: int
    C: int  # noqa: N815 - the paper's name
    input_shape: list[int]
    runs: list[SeedRun] = field(default_factory=list)
    latent_channels: str = ""
    batch_size: int | None = None

    @property
    def input_channels(self) -> int:
        """Channels the classifier saw (1 for images and channel-averaged latents)."""
        return int(self.input_shape[0])

    @property
    def input_description(self) -> str:
        """``1 (mean of C=4)``, ``4 (all C)`` or ``1``: what the classifier's input channels were."""
        if self.kind in LATENT_KINDS and self.C > 1:
            return (f"{self.input_channels} (mean of C={self.C})" if self.latent_channels == "mean"
                    else f"{self.input_channels} (all C)")
        return str(self.input_channels)

    @property
    def aurocs(self) -> list[float]:
        return [r.test_auroc for r in self.runs]

    @property
    def mean(self) -> float:
        return float(np.mean(self.aurocs))

    @property
    def sd(self) -> float | None:
        """Sample standard deviation over seeds; ``None`` for one seed (there is no spread to report)."""
        return float(np.std(self.aurocs, ddof=1)) if len(self.runs) > 1 else None

    def cell(self) -> str:
        """``85.3±2.1`` (AUROC ×100), or ``85.3±n/a (1 seed)``."""
        sd = "n/a (1 seed)" if self.sd is None else f"{100 * self.sd:.1f}"
        return f"{100 * self.mean:.1f}±{sd}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.label, "kind": self.kind, "f": self.f, "C": self.C, "input_shape": self.input_shape,
                "input_channels": self.input_channels, "latent_channels": self.latent_channels or None,
                "batch_size": self.batch_size, "auroc_mean": self.mean, "auroc_sd": self.sd,
                "runs": [dataclasses.asdict(r) for r in self.runs]}


@dataclass
class CADResult:
    """A task's results: one :class:`MethodResult` per method."""

    task: str
    metric: str
    class_names: list[str]
    counts: dict[str, dict[str, int]]
    classifier: str
    config: dict[str, Any]
    rows: list[MethodResult]

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            lo, hi = auroc_ci(r.mean, self.counts.get("test", {}))
            rows.append({**r.to_dict(), "auroc_ci95": [lo, hi]})
        return {"task": self.task, "metric": self.metric, "class_names": self.class_names, "counts": self.counts,
                "classifier": self.classifier, "classifier_init": self.config.get("classifier_init"),
                "epoch_selection": self.config.get("select"), "config": self.config, "rows": rows,
                "warnings": cad_warnings(self)}


def auroc_ci(auc: float, test_counts: Mapping[str, int], z: float = 1.96) -> tuple[float, float]:
    """A 95% interval of an AUROC from the test split's class counts (Hanley & McNeil, Radiology 1982).

    Binary: positives and negatives; multi-class (macro one-vs-rest): the smallest class against the rest,
    the widest of its one-vs-rest intervals. It covers the test split's sampling only, not the spread over seeds.
    """
    counts = sorted(int(n) for n in test_counts.values())
    if len(counts) < 2 or counts[0] < 1 or not math.isfinite(auc):
        return 0.0, 1.0
    n1, n0 = counts[0], sum(counts) - counts[0]
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def cad_warnings(result: CADResult) -> list[str]:
    """Why a CAD result may not mean anything: a test split under :data:`MIN_TEST_IMAGES` images or
    :data:`MIN_TEST_PER_CLASS` per class, a single seed, rows whose AUROC 95% interval (:func:`auroc_ci`)
    covers chance (0.5) — above all the high-resolution reference, without which the other rows compare with
    nothing."""
    out = []
    test = result.counts.get("test", {})
    n, smallest = sum(test.values()), min(test.values(), default=0)
    if n < MIN_TEST_IMAGES or smallest < MIN_TEST_PER_CLASS:
        split = ", ".join(f"{c}={k}" for c, k in test.items())
        out.append(f"{result.task}: the test split has {n} image(s) ({split}); an AUROC from fewer than "
                   f"{MIN_TEST_IMAGES} test images or {MIN_TEST_PER_CLASS} per class moves a lot with one image "
                   "and says little; use more")
    if len(result.config.get("seeds", ())) == 1:
        out.append(f"{result.task}: one seed, so the sd over seeds is n/a (1 seed); use --seeds 0,1,2")
    for row in result.rows:
        lo, hi = auroc_ci(row.mean, test)
        if not lo <= 0.5 <= hi:
            continue
        where = f"AUROC {row.mean:.2f}, 95% CI {lo:.2f}–{hi:.2f} covers 0.5"
        if row.kind == "image":
            out.append(f"{result.task}: the high-resolution reference is at chance ({where}): the classifier did "
                       "not learn the task from full-resolution images, so the latent and interpolation rows have "
                       "nothing to be compared with (more images or epochs; for finefeature, a larger --contrast)")
        else:
            out.append(f"{result.task}: {row.label} is indistinguishable from chance ({where})")
    return out
