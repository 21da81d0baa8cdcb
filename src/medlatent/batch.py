"""Batch runs over many inputs: prefetching, failure collection, manifest, atomic outputs, resume.

A run never stops at a bad file: each failure is recorded with its reason, listed at the end and in the
manifest (``manifest.jsonl``, one JSON object per item, appended as items finish), and the run exits
non-zero. Outputs are written atomically, so an item whose output exists is complete; a re-run skips it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from medlatent.io.atomic import remove_stale_temporaries

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
MANIFEST = "manifest.jsonl"


@dataclass
class ItemResult:
    item: str
    status: str  # "ok" | "skipped" | "failed"
    outputs: list[str] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchReport:
    results: list[ItemResult] = field(default_factory=list)

    @property
    def failed(self) -> list[ItemResult]:
        return [r for r in self.results if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out


@dataclass
class Job(Generic[T, R]):
    """One unit of a batch: ``load`` runs in a worker thread (IO), ``run`` in the main thread (compute).

    ``outputs`` are the files the job will write; if all exist, the job is skipped on re-runs.
    """

    name: str
    outputs: list[Path]
    load: Callable[[], T]
    run: Callable[[T], dict[str, Any] | None]


def run_jobs(jobs: Iterable[Job], manifest_dir: Path, *, resume: bool = True, prefetch: int = 2,
             progress: Callable[[ItemResult], None] | None = None, manifest: str = MANIFEST) -> BatchReport:
    """Run jobs in order with ``prefetch`` loads in flight; record every outcome in the manifest."""
    jobs = list(jobs)
    manifest_dir.mkdir(parents=True, exist_ok=True)
    report = BatchReport()
    todo: list[Job] = []
    with open(manifest_dir / manifest, "a") as mf:
        for job in jobs:
            for p in job.outputs:
                remove_stale_temporaries(p)
            if resume and job.outputs and all(p.is_file() for p in job.outputs):
                res = ItemResult(job.name, "skipped", [str(p) for p in job.outputs], "outputs already complete")
                report.results.append(res)
                mf.write(json.dumps(res.__dict__, default=str) + "\n")
                if progress:
                    progress(res)
            else:
                todo.append(job)
    with ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool, open(manifest_dir / manifest, "a") as mf:
        pending: list[Future] = [pool.submit(j.load) for j in todo[:prefetch]]
        for i, job in enumerate(todo):
            if i + prefetch < len(todo):
                pending.append(pool.submit(todo[i + prefetch].load))
            t0 = time.perf_counter()
            try:
                data = pending[i].result()
                info = job.run(data) or {}
                res = ItemResult(job.name, "ok", [str(p) for p in job.outputs], seconds=time.perf_counter() - t0,
                                 info=info)
            except Exception as e:  # one bad item must not stop the archive; the reason is recorded
                logger.debug("item %s failed", job.name, exc_info=True)
                for p in job.outputs:  # no partial outputs of a failed item remain
                    p.unlink(missing_ok=True)
                res = ItemResult(job.name, "failed", [], reason=str(e) or type(e).__name__,
                                 seconds=time.perf_counter() - t0)
            pending[i] = None  # type: ignore[call-overload]  # free the loaded data
            report.results.append(res)
            mf.write(json.dumps(res.__dict__, default=str) + "\n")
            mf.flush()
            if progress:
                progress(res)
    return report

