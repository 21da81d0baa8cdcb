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
             progress: Callable[[ItemResult], None] | None = None, manifest: str = MANIFEST,
             batch: int = 1, compute: Callable[[list[Any]], list[Any]] | None = None) -> BatchReport:
    """Run jobs in order with ``prefetch`` loads in flight; record every outcome in the manifest.

    With ``compute``, up to ``batch`` consecutive loaded items go through ``compute`` together (one model pass
    for several files) and each job's ``run`` gets its own element of the result. If a group's ``compute``
    fails, its items are computed one by one, so only the item at fault is recorded as failed.
    """
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
    batch = max(1, batch) if compute is not None else 1
    ahead = max(1, prefetch) + batch - 1
    with ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool, open(manifest_dir / manifest, "a") as mf:

        def record(res: ItemResult) -> None:
            report.results.append(res)
            mf.write(json.dumps(res.__dict__, default=str) + "\n")
            mf.flush()
            if progress:
                progress(res)

        pending: list[Future | None] = [pool.submit(j.load) for j in todo[:ahead]]
        for first in range(0, len(todo), batch):
            group = list(range(first, min(first + batch, len(todo))))
            t0 = time.perf_counter()
            loaded: dict[int, Any] = {}
            errors: dict[int, Exception] = {}
            for i in group:
                try:
                    loaded[i] = pending[i].result()  # type: ignore[union-attr]
                except Exception as e:
                    errors[i] = e
                pending[i] = None  # free the loaded data once used
            pending += [pool.submit(j.load) for j in todo[len(pending) : group[-1] + 1 + ahead]]
            computed = _compute(compute, loaded, errors)
            share = (time.perf_counter() - t0) / len(group)
            for i in group:
                job, t1 = todo[i], time.perf_counter()
                try:
                    if i in errors:
                        raise errors[i]
                    info = job.run(computed[i]) or {}
                    res = ItemResult(job.name, "ok", [str(p) for p in job.outputs],
                                     seconds=share + time.perf_counter() - t1, info=info)
                except Exception as e:  # one bad item must not stop the archive; the reason is recorded
                    logger.debug("item %s failed", job.name, exc_info=True)
                    for p in job.outputs:  # no partial outputs of a failed item remain
                        p.unlink(missing_ok=True)
                    res = ItemResult(job.name, "failed", [], reason=str(e) or type(e).__name__,
                                     seconds=share + time.perf_counter() - t1)
                record(res)
    return report


def _compute(compute: Callable[[list[Any]], list[Any]] | None, loaded: dict[int, Any],
             errors: dict[int, Exception]) -> dict[int, Any]:
    """``compute`` over the loaded items of a group (all at once, else one by one); failures go to ``errors``."""
    if compute is None or not loaded:
        return loaded
    keys = list(loaded)
    if len(keys) > 1:
        try:
            return dict(zip(keys, compute([loaded[k] for k in keys]), strict=True))
        except Exception:  # e.g. out of memory for the group: fall back to single items
            logger.debug("group of %d failed; computing its items one by one", len(keys), exc_info=True)
    out = {}
    for k in keys:
        try:
            out[k] = compute([loaded[k]])[0]
        except Exception as e:
            errors[k] = e
    return out
