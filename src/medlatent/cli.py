"""Command-line interface: ``medlatent --help``."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MedVAE medical-image autoencoders.")


@app.command()
def models() -> None:
    """List the MedVAE family."""
    from medlatent.registry import get_model_info, list_models

    for name in list_models():
        info = get_model_info(name)
        typer.echo(f"{name:16s} f={info.f:<4d} C={info.C}  {info.description}")
