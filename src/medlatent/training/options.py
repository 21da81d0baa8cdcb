"""One helper for the fields of the training configuration: every option carries its help text.

The help strings are the single source of the configuration reference (``medlatent train --reference``,
``docs/training-config.md``), so a new option cannot be added without saying what it does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

HELP = "help"


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a default (or ``factory`` for mutable defaults) and its help text."""
    if not help:
        raise ValueError("every training option needs a help text")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={HELP: help})
    return dataclasses.field(default=default, metadata={HELP: help})


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get(HELP, "")
