"""The lossless size of source files a latent has to beat: ``xz -9e`` of the bytes on disk.

Below the runs layer (``medlatent roundtrip`` reports it per input) and re-exported by
:mod:`medlatent.evaluation.codecs`, which adds JPEG 2000.
"""

from __future__ import annotations

import gzip
import lzma
from collections.abc import Sequence
from pathlib import Path

XZ_PRESET = 9 | lzma.PRESET_EXTREME


def xz_bytes(paths: Sequence[str | Path]) -> int:
    """Bytes of ``xz -9e`` (``lzma`` preset ``9 | PRESET_EXTREME``, .xz container) of each file, summed. A gzip
    file (``.nii.gz``) is unpacked first: xz of gzip output would only measure gzip."""
    total = 0
    for p in paths:
        data = Path(p).read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        total += len(lzma.compress(data, preset=XZ_PRESET))
    return total
