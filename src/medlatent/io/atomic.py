"""Atomic file writes: write to a temporary sibling, rename onto the target only when complete."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the system allows.

    ``os.umask`` can only be read by setting it, which races with threads creating files; Linux reports the
    umask in ``/proc/self/status``, so the swap is only a fallback for other systems.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def temporary_path(path: Path) -> Path:
    """A hidden sibling of ``path`` for this process. The real name stays last, so libraries that pick the
    format by extension (nibabel, Pillow) still recognise it."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    A killed run therefore never leaves a partial file under the real name. The file gets the mode a plain
    ``open(path, "w")`` would give (``0o666 & ~umask``), whatever mode the writing library chose for the
    temporary (safetensors creates it ``0o600``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files (or folders, for outputs that are folders) of ``path`` left by a killed run (any process
    id)."""
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".tmp-*-{path.name}"):
            remove_output(tmp)


def remove_output(path: Path) -> None:
    """Remove an output file, or an output folder with everything in it (a DICOM series); absent is fine."""
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ output folders
class OutputError(RuntimeError):
    """The output location cannot take the results (not a folder, not writable, disk full); says which path."""


# errors after which no later item of a run can be written either: stop instead of failing every item
_FATAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def is_fatal_write_error(e: BaseException) -> bool:
    """Whether ``e`` means the output file system takes no more writes (full, over quota, read-only)."""
    return isinstance(e, OSError) and e.errno in _FATAL_WRITE_ERRNOS


def _nearest_existing(path: Path) -> Path:
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: str | Path) -> None:
    """Fail early, creating nothing, if ``path`` cannot become a writable folder with free space.

    Raises:
        OutputError: naming ``path`` and the problem (a file in the way, no permission, read-only or full disk).
    """
    path = Path(path)
    probe = _nearest_existing(Path(os.path.abspath(path)))
    if probe.is_symlink() and not probe.exists():
        raise OutputError(f"output {path}: {probe} is a broken or looping symbolic link")
    if not probe.is_dir():
        target = Path(os.path.abspath(path))
        where = "exists and is a file" if probe == target else f"cannot be created: {probe} is a file"
        raise OutputError(f"output {path}: {where}, not a folder; choose a folder for -o")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"output {path}: {probe} is not writable (permission denied or read-only file system)")
    st = os.statvfs(probe)
    if st.f_bavail * st.f_frsize == 0:
        raise OutputError(f"output {path}: no space left on the device that holds {probe}")


def make_output_dir(path: str | Path) -> Path:
    """Create the output folder (and parents). Raises :class:`OutputError` naming it if that fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"output {path}: cannot create the folder ({e.strerror or e})") from e
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write a small text file atomically. Raises :class:`OutputError` naming it if the write fails."""
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise OutputError(f"{path}: cannot be written ({e.strerror or e})") from e
    return path
