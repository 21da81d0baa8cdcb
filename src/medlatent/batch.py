"""Batch runs over many inputs: prefetching, failure collection, manifest, atomic outputs, resume.

A run never stops at a bad file: each failure is recorded with its reason, listed at the end and in the
manifest (``manifest.jsonl``, one JSON object per item, appended as items finish), and the run exits
non-zero. Outputs are written atomically, so an item whose output exists is complete; a re-run skips it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from medlatent.io.atomic import (
    OutputError,
    check_output_dir,
    is_fatal_write_error,
    make_output_dir,
    remove_output,
    remove_stale_temporaries,
)

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


class Manifest:
    """The run's JSON-lines record, appended one whole line per write.

    The file is opened on the first record, so a run that records nothing leaves no empty manifest; a line that
    cannot be written completely (disk full) is cut off again, so the file never holds half a record.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._created = False

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, default=str) + "\n").encode()
        size = None
        try:
            if self._fd is None:
                self._created = not self.path.exists()
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            size = os.fstat(self._fd).st_size
            if os.write(self._fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            self._undo(size)
            raise OutputError(f"manifest {self.path}: cannot be written ({e.strerror or e})") from e

    def _undo(self, size: int | None) -> None:
        """Best effort after a failed write: no torn line, and no empty file this run created."""
        try:
            if self._fd is not None and size is not None:
                os.ftruncate(self._fd, size)
            if self._created and self.path.stat().st_size == 0:
                self.close()
                self.path.unlink()
        except OSError:
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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

    Raises:
        OutputError: the output folder cannot be created, or its file system takes no more writes (full, over
            quota, read-only). The run stops there, since every later item would fail the same way; the items
            finished before are complete and a re-run skips them.
    """
    jobs = list(jobs)
    make_output_dir(manifest_dir)
    report = BatchReport()
    with Manifest(manifest_dir / manifest) as mf:

        def record(res: ItemResult) -> None:
            report.results.append(res)
            mf.write(res.__dict__)
            if progress:
                progress(res)

        todo: list[Job] = []
        for job in jobs:
            for p in job.outputs:
                remove_stale_temporaries(p)
            if resume and job.outputs and all(p.is_file() or p.is_dir() for p in job.outputs):  # written whole
                record(ItemResult(job.name, "skipped", [str(p) for p in job.outputs], "outputs already complete"))
            else:
                todo.append(job)
        _run_todo(todo, record, manifest_dir, prefetch, batch if compute is not None else 1, compute)
    return report


def _run_todo(todo: list[Job], record: Callable[[ItemResult], None], out: Path, prefetch: int, batch: int,
              compute: Callable[[list[Any]], list[Any]] | None) -> None:
    batch = max(1, batch)
    ahead = max(1, prefetch) + batch - 1
    with ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool:
        pending: list[Future | None] = [pool.submit(j.load) for j in todo[:ahead]]
        try:
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
                    res, fatal = _run_one(todo[i], computed, errors, i, share)
                    if fatal is not None:
                        _stop(record, res, fatal, out)
                    record(res)
        finally:  # stopped early (output error): loads not yet started need not run
            for f in pending:
                if f is not None:
                    f.cancel()


def _run_one(job: Job, computed: dict[int, Any], errors: dict[int, Exception], i: int,
             share: float) -> tuple[ItemResult, OSError | None]:
    """One job's ``run`` on its computed input; the error too when the output disk stops taking writes."""
    t1 = time.perf_counter()
    try:
        if i in errors:
            raise errors[i]
        info = job.run(computed[i]) or {}
        return ItemResult(job.name, "ok", [str(p) for p in job.outputs], seconds=share + time.perf_counter() - t1,
                          info=info), None
    except Exception as e:  # one bad item must not stop the archive; the reason is recorded
        logger.debug("item %s failed", job.name, exc_info=True)
        for p in job.outputs:  # no partial outputs of a failed item remain
            remove_output(p)
        res = ItemResult(job.name, "failed", [], reason=str(e) or type(e).__name__,
                         seconds=share + time.perf_counter() - t1)
        return res, (e if i not in errors and is_fatal_write_error(e) else None)  # type: ignore[return-value]


def _stop(record: Callable[[ItemResult], None], res: ItemResult, e: OSError, out: Path) -> None:
    """End the run after a write that no later item could do either (disk full, read-only)."""
    try:
        record(res)
    except OutputError:
        pass  # the manifest is on the same full disk; the error below says what happened
    raise OutputError(f"output {out}: writing {res.item} failed: {e.strerror} (errno {e.errno}); stopped here — "
                      "free space (or make the folder writable) and run again: finished items are kept and "
                      "skipped") from e


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


def check_output(output: Path, inputs: Iterable[Path]) -> None:
    """Fail before any work if ``output`` cannot hold a run's results, or is one of its input folders.

    Raises:
        OutputError: naming the output and the problem.
    """
    for inp in inputs:
        if inp.is_dir() and os.path.realpath(inp) == os.path.realpath(output):
            raise OutputError(f"output {output} is the input folder {inp}; give the results a folder of their own "
                              "(outputs mixed with inputs would be read as inputs on the next run)")
    check_output_dir(output)
