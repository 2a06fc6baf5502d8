"""``mailer segments``: count, save, list and show segments."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from mailer.cli.common import JsonFlag, engine, print_json
from mailer.errors import SegmentError

app = typer.Typer(
    name="segments",
    help="Select readers with expressions like 'tier:free AND tag:politics'; save them by name.",
    no_args_is_help=True,
)

Expression = Annotated[
    str,
    typer.Argument(
        help="e.g. 'tier:paid,comped AND NOT tag:politics', 'joined:>=2026-01-01', '@name', 'all'.",
        show_default=False,
    ),
]
Name = Annotated[str, typer.Argument(help="Segment name: a-z, 0-9, _ and -.", show_default=False)]
SAMPLE = 10


def active_readers(n: int) -> str:
    return f"{n:,} active reader{'' if n == 1 else 's'}"


@contextmanager
def pointing_at(expr: str) -> Iterator[None]:
    """Report a bad expression in one line, then the expression with a caret under the column."""
    try:
        yield
    except SegmentError as exc:
        typer.echo(f"error: {exc}", err=True)
        if exc.column is not None:
            # One character per column, so the caret stays under it.
            shown = "".join(" " if ch.isspace() else ch for ch in expr)
            typer.echo(f"  {shown}\n  {' ' * (exc.column - 1)}^", err=True)
        raise typer.Exit(1) from None


@app.command()
def count(expr: Expression, as_json: JsonFlag = False) -> None:
    """Count the active readers an expression selects."""
    from mailer import segments
    from mailer.db import session

    with pointing_at(expr), session(engine()) as s:
        n = segments.count(s, expr)
    if as_json:
        print_json({"count": n})
    else:
        typer.echo(active_readers(n))


@app.command()
def save(name: Name, expr: Expression) -> None:
    """Save an expression under a name, or replace the one saved under it; use it as @NAME."""
    from mailer import segments
    from mailer.db import session

    with pointing_at(expr), session(engine()) as s:
        saved = segments.save(s, name, expr)
        n = segments.count(s, expr)
    typer.echo(f"saved @{saved.name}: {active_readers(n)}")


@app.command("list")
def list_(as_json: JsonFlag = False) -> None:
    """List saved segments by name."""
    from mailer import segments
    from mailer.db import session

    with session(engine()) as s:
        saved = segments.list_saved(s)
    if as_json:
        print_json(
            [
                {"name": g.name, "expression": g.expression, "updated_at": g.updated_at.isoformat()}
                for g in saved
            ]
        )
        return
    if not saved:
        typer.echo(
            "no saved segments yet; save one with `mailer segments save NAME EXPR`", err=True
        )
        return
    width = max(len(g.name) for g in saved) + 1
    for g in saved:
        typer.echo(f"@{g.name.ljust(width)} {g.expression}")


@app.command()
def show(name: Name, as_json: JsonFlag = False) -> None:
    """Show a saved segment: its expression, how many active readers it selects, a sample."""
    from mailer import segments
    from mailer.db import session

    with session(engine()) as s:
        saved = segments.get_saved(s, name)
        with pointing_at(saved.expression):
            n = segments.count(s, saved.expression)
            sample = segments.sample(s, saved.expression, SAMPLE)
    if as_json:
        print_json(
            {"name": saved.name, "expression": saved.expression, "count": n, "sample": sample}
        )
        return
    typer.echo(f"@{saved.name}: {saved.expression}\n{active_readers(n)}")
    if sample:
        typer.echo(f"first {len(sample)}:")
        for address in sample:
            typer.echo(f"  {address}")
