"""Hints for mistyped names (models, classifiers): the closest valid names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``" Did you mean 'a', 'b'?"`` for up to three close matches of ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.4)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
