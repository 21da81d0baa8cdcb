"""What every folder run shares: finding the inputs, the progress listener, the result, the manifest of skips."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlatent.batch import MANIFEST, BatchReport, ItemResult, Job, Manifest, check_output, run_jobs
from medlatent.io.atomic import OutputError
from medlatent.io.discover import Discovery, discover_inputs, find_latents
from medlatent.runs.models import RunError


class NothingToDo(RunError):
    """The inputs hold nothing to work on; ``failed`` and ``ignored`` say what they held instead."""

    def __init__(self, message: str, failed: list[tuple[Path, str]], ignored: list[tuple[Path, str]]) -> None:
        super().__init__(message)
        self.failed, self.ignored = failed, ignored


class RunListener:
    """What a run reports while it works. This base ignores everything; a front end overrides what it shows."""

    def model_loaded(self, name: str, note: str) -> None:
        """A model was loaded: its name and why it was chosen (``"given"`` or the default it is)."""

    def started(self, label: str, total: int) -> None:
        """``total`` items are about to run (``label``: e.g. ``"encoding"``)."""

    def item_done(self, result: ItemResult) -> None:
        """One item finished: written, skipped as complete, or failed with its reason."""

    def stopped(self) -> None:
        """No more items will be reported (also after an error)."""


@dataclass
class RunResult:
    """The outcome of a folder run.

    Attributes:
        output: the output folder.
        report: one result per item that ran (written, already complete, or failed).
        skipped_inputs: inputs that never became items, with the reason (missing, unreadable, unsupported, empty).
        ignored: known non-image files among the inputs, with what they are.
        failed_all: failures over every shard of a distributed run (this process's own otherwise).
        rows: per written item, what the run measured (``roundtrip``: the metrics; empty otherwise).
    """

    output: Path
    report: BatchReport
    skipped_inputs: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    failed_all: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failures(self) -> list[tuple[str, str]]:
        """Every failed item and input with its reason."""
        return [(r.item, r.reason) for r in self.report.failed] + [(str(p), why) for p, why in self.skipped_inputs]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.failed_all


def find_inputs(inputs: list[Path], output: Path, verb: str = "encode") -> Discovery:
    """Check the output folder, then find the inputs (images, or latent files for ``verb="decode"``).

    Raises:
        RunError: the output folder is unusable (before anything else is looked at).
        NothingToDo: the inputs hold nothing to ``verb``.
    """
    try:
        check_output(output, inputs)
    except OutputError as e:
        raise RunError(str(e)) from e
    found = find_latents(inputs, exclude=output) if verb == "decode" else discover_inputs(inputs, exclude=output)
    if not found.items:
        raise NothingToDo(f"nothing to {verb}: " + "; ".join(f"{p}: {why}" for p, why in found.empty or found.failed),
                          found.failed, found.ignored)
    return found


def record_skipped(out: Path, skipped_inputs: list[tuple[Path, str]], manifest: str = MANIFEST,
                   ignored: list[tuple[Path, str]] = ()) -> None:  # type: ignore[assignment]
    """Inputs that never became items go into the manifest too: failed ones (missing, unsupported, unreadable
    headers, broken links, inputs without images) and known non-image files, as skipped with what they are."""
    try:
        with Manifest(out / manifest) as mf:
            for p, why in skipped_inputs:
                mf.write({"item": str(p), "status": "failed", "reason": why})
            for p, why in ignored:
                mf.write({"item": str(p), "status": "skipped", "reason": f"not an image: {why}"})
    except OutputError as e:
        raise RunError(str(e)) from e


def run_batch(listener: RunListener, label: str, jobs: list[Job], output: Path, **kw: Any) -> BatchReport:
    """``run_jobs`` reporting to ``listener``; an output that stops taking writes (disk full) ends the run."""
    listener.started(label, len(jobs))
    try:
        return run_jobs(jobs, output, progress=listener.item_done, **kw)
    except OutputError as e:
        raise RunError(str(e)) from e
    finally:
        listener.stopped()
