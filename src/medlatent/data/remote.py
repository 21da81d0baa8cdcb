"""A latent store's folder on an fsspec filesystem (``s3://``, ``gs://``, ``az://``, ``hf://``, ``memory://`` …),
for reading a store where it lies instead of copying it to local disk first.

Needs ``fsspec`` (``pip install 'medlatent[store]'``; it also comes with PyTorch) and the filesystem's own package
(``s3fs``, ``gcsfs``, ``adlfs`` …). Files are read whole (manifest, indexes) or by byte range (shards: one ranged
read per streamed window or per item), never listed, so object storage sees one GET per read.
"""

from __future__ import annotations

import os
from typing import Any


def is_url(path: Any) -> bool:
    """Whether ``path`` names a folder by URL (``PROTOCOL://…``) rather than as a local path."""
    return isinstance(path, str) and "://" in path


class RemoteFolder:
    """A folder given by URL: whole files and byte ranges of files in it.

    Pickles without its filesystem object, and each process makes its own on first use (a DataLoader worker or
    a forked process must not share the parent's connections or event loop).

    Raises:
        ImportError: fsspec is not installed (with how to install it).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        try:
            import fsspec  # noqa: F401
        except ImportError as e:  # pragma: no cover - fsspec comes with torch
            raise ImportError(f"{url}: reading a store by URL needs fsspec: pip install 'medlatent[store]' (and the "
                              "filesystem's package, e.g. s3fs)") from e
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None
        self._path = ""
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_pid": -1}

    def _filesystem(self) -> tuple[Any, str]:
        if self._fs is None or self._pid != os.getpid():
            from fsspec.core import url_to_fs

            self._fs, self._path = url_to_fs(self.url, **self.storage_options)
            self._pid = os.getpid()
        return self._fs, self._path.rstrip("/")

    def name(self, file: str) -> str:
        """How messages name ``file`` in this folder."""
        return f"{self.url}/{file}"

    def exists(self, file: str) -> bool:
        fs, path = self._filesystem()
        return bool(fs.isfile(f"{path}/{file}"))

    def read(self, file: str) -> bytes:
        """The whole of ``file`` (OSError, e.g. FileNotFoundError, when it cannot be read)."""
        fs, path = self._filesystem()
        return bytes(fs.cat_file(f"{path}/{file}"))

    def read_range(self, file: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``file`` from ``offset`` (fewer at its end)."""
        fs, path = self._filesystem()
        return bytes(fs.cat_file(f"{path}/{file}", start=offset, end=offset + size))
