"""Which images a model was trained on: the ``training_data.json`` shipped in its folder, matched by SHA-256.

A model folder (bundled under ``medlatent/weights/<name>`` or any local folder with ``model.safetensors``) may
hold ``training_data.json``: a JSON list of ``{"package": …, "origin": …, "sha256": …}`` objects, one per source
file the model was trained on (``origin`` is the file's path inside site-packages, ``sha256`` that of the file).
An input is matched through the source a ``medlatent samples`` manifest records for it
(:func:`medlatent.samples.recorded_source`: a sample is a resized copy, so only its source's hash can match), else
through the input file's own hash.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TRAINING_DATA = "training_data.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class TrainingDataError(ValueError):
    """A ``training_data.json`` cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class TrainingData:
    """The source files a model was trained on: ``path`` of the list, and ``sha256`` → ``package:origin``."""

    path: Path
    files: dict[str, str]

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self.files


def read_training_data(model_dir: str | Path) -> TrainingData | None:
    """The ``training_data.json`` of a model folder; ``None`` when the folder has none.

    Raises:
        TrainingDataError: the file is not a JSON list of objects with string ``package`` and ``origin`` and a
            64-hex-digit ``sha256``.
    """
    path = Path(model_dir) / TRAINING_DATA
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainingDataError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(entries, list):
        raise TrainingDataError(f"{path}: expected a JSON list of training files, got {type(entries).__name__}")
    files: dict[str, str] = {}
    for i, entry in enumerate(entries):
        ok = (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("package", "origin", "sha256"))
              and _SHA256.fullmatch(entry["sha256"].lower()))
        if not ok:
            raise TrainingDataError(f"{path}: entry {i} is not {{\"package\": str, \"origin\": str, "
                                    f"\"sha256\": 64 hex digits}}: {json.dumps(entry)[:120]}")
        files[entry["sha256"].lower()] = f"{entry['package']}:{entry['origin']}"
    return TrainingData(path, files)


def model_folder(weights_info: dict[str, str]) -> Path | None:
    """The folder a model's weights were read from (``weights_info["file"]``); ``None`` for weights from memory."""
    file = weights_info.get("file")
    return Path(file).parent if file else None


def in_training_set(paths: Sequence[Path], training: TrainingData | None) -> bool | None:
    """Whether the input read from ``paths`` (one file, or a DICOM series) was in ``training``.

    ``None`` when the model has no training list; for a ``medlatent samples`` file, whether its recorded source
    is in the list; for any other input True when one of its files is, else ``None``: a resized or re-encoded copy
    of a training image has another hash, so no match does not prove it unseen.
    """
    from medlatent.checkpoints import sha256_file
    from medlatent.samples import recorded_source

    if training is None:
        return None
    source = recorded_source(paths[0]) if len(paths) == 1 else None
    if source is not None:
        return source.sha256.lower() in training
    return True if any(sha256_file(p) in training for p in paths) else None
