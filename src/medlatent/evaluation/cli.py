"""``medlatent evaluate …``: one command per claim of the paper (reconstruction, storage, CAD, fine features,
efficiency). The commands live next to their modules; this file only gathers them."""

from __future__ import annotations

import typer

from medlatent.evaluation import cli_cad, cli_recon

app = typer.Typer(no_args_is_help=True, help="Paper-style evaluations on your own data, with Markdown reports.")
cli_recon.register(app)
cli_cad.register(app)
