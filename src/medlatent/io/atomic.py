"""Atomic file writes: write to a temporary sibling, rename onto the target only when complete."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_path(path: Path) -> Path:
    """A hidden sibling of ``path`` for this process. The real name stays last, so libraries that pick the
    format by extension (nibabel, Pillow) still recognise it."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    A killed run therefore never leaves a partial file under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of ``path`` left by a killed run (any process id)."""
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".tmp-*-{path.name}"):
            tmp.unlink(missing_ok=True)
