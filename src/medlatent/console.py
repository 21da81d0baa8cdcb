"""What the command-line front ends (``medlatent``, its ``evaluate`` commands, the reader study) share."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(msg: str) -> NoReturn:
    """End the command on a mistake the user must fix: ``error: msg`` in red on stderr, exit status 1."""
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)
