"""``medlatent reader-study create | serve | analyze``: a blinded reader study of reconstructions."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

from medlatent.console import fail

app = typer.Typer(no_args_is_help=True, help="Blinded reader study: radiologists score original/reconstruction pairs.")


def _slices(spec: str) -> list[int] | str:
    if spec == "middle":
        return spec
    try:
        return [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        fail(f"--slices must be 'middle' or comma-separated slice indices, got {spec!r}")
    return spec


@app.command()
def create(
    study: Path = typer.Argument(..., help="Folder to create for the study (must not exist)."),
    originals: Optional[Path] = typer.Option(
        None, "--originals", help="Folder of original images (any format medlatent reads)."),
    method: list[str] = typer.Option(
        [], "--method", "-m", help="NAME[:FACTOR]=DIR of reconstructions named like the originals; repeat per method."),
    pairs: Optional[Path] = typer.Option(
        None, "--pairs", help="CSV instead of folders: original, reconstruction, method[, factor][, slice]."),
    readers: str = typer.Option(..., "--readers", "-r", help="Comma-separated reader names, e.g. r1,r2,r3."),
    seed: int = typer.Option(0, "--seed", help="Seed of each reader's random order (recorded in the study)."),
    slices: str = typer.Option("middle", "--slices", help="3D files: 'middle' or axial slice indices, e.g. 40,80."),
    title: str = typer.Option("Reader study", "--title"),
    no_revision: bool = typer.Option(False, "--no-revision", help="Readers cannot revise a saved answer."),
    match_range: bool = typer.Option(
        False, "--match-range", help="Map each reconstruction's min..max onto its original's "
                                     "(rescaled PNG exports such as `roundtrip`'s NAME.recon.png)."),
    base_url: str = typer.Option(
        "http://127.0.0.1:8000", "--base-url", help="Server address printed in the reader links."),
) -> None:
    """Pair originals with reconstructions, convert them for display, blind them and create reader links."""
    from medlatent.readerstudy.db import StudyError
    from medlatent.readerstudy.study import MethodSource, create_study, pairs_from_csv, pairs_from_folders

    try:
        if pairs is not None:
            if originals is not None or method:
                fail("give either --pairs CSV or --originals with --method, not both")
            specs = pairs_from_csv(pairs)
        elif originals is not None:
            specs = pairs_from_folders(originals, [MethodSource.parse(m) for m in method])
        else:
            fail("give --originals DIR with one --method NAME[:FACTOR]=DIR per method, or --pairs CSV")
        tokens = create_study(study, specs, readers.split(","), seed=seed, slices=_slices(slices), title=title,
                              allow_revision=not no_revision, match_range=match_range)
    except StudyError as e:
        fail(str(e))
    typer.echo(f"created {study}: {len(specs)} pair file(s), {len(tokens)} reader(s); "
               f"links (also in {study / 'readers.csv'}):")
    for name, token in tokens:
        typer.echo(f"  {name}: {base_url.rstrip('/')}/r/{token}")


@app.command()
def serve(
    study: Path = typer.Argument(..., help="Study folder made by `reader-study create`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
) -> None:
    """Serve the reader app (answers are saved to the study's SQLite database as they are given)."""
    import uvicorn

    from medlatent.readerstudy.app import create_app
    from medlatent.readerstudy.db import StudyError

    try:
        web = create_app(study)
    except StudyError as e:
        fail(str(e))
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        typer.secho(f"warning: listening on {host}: anyone who can reach it and holds a link can answer; "
                    "put it behind HTTPS", err=True, fg=typer.colors.YELLOW)
    typer.echo(f"reader study {study} at http://{host}:{port}/r/<token> (Ctrl-C to stop)")
    uvicorn.run(web, host=host, port=port, log_level="warning")


@app.command()
def analyze(
    study: Path = typer.Argument(..., help="Study folder."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report folder (default: STUDY/analysis)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Paired difference A,B between two methods."),
    ci: str = typer.Option("bootstrap", "--ci", help="bootstrap (over cases and readers) or t (over cases)."),
    n_boot: int = typer.Option(2000, "--n-boot", min=100),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Means and 95% CIs per method, factor and question; paired difference; agreement; chart; raw CSV."""
    from medlatent.readerstudy.analysis import AnalysisError
    from medlatent.readerstudy.analysis import analyze as run_analysis
    from medlatent.readerstudy.db import StudyError, answer_records, open_study

    pair = None
    if compare:
        pair = tuple(v.strip() for v in compare.split(","))
        if len(pair) != 2 or not all(pair):
            fail(f"--compare takes two method names A,B, got {compare!r}")
    if ci not in ("bootstrap", "t"):
        fail(f"--ci must be bootstrap or t, got {ci!r}")
    try:
        conn = open_study(study)
        records = answer_records(conn)
        total = conn.execute("SELECT COUNT(*) FROM assignments").fetchone()[0]
        open_readers = [r[0] for r in conn.execute("SELECT name FROM readers WHERE locked_at IS NULL ORDER BY name")]
        conn.close()
    except StudyError as e:
        fail(str(e))
    if not records:
        fail(f"{study}: no answers yet")
    out = output or Path(study) / "analysis"
    try:
        result = run_analysis(records, out, compare=pair, n_boot=n_boot, seed=seed, ci=ci)
    except AnalysisError as e:
        fail(str(e))
    typer.echo(f"{len(records)} of {total} assigned pairs answered"
               + (f"; not finished: {', '.join(open_readers)}" if open_readers else "; every reader finished"))
    for row in result["summary"]:
        f = f" f={row['factor']}" if row["factor"] else ""
        ci = f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
        typer.echo(f"  {row['method']}{f} {row['question']}: {row['mean']:+.2f} {ci}")
    typer.echo(f"report: {out / 'report.md'}")
