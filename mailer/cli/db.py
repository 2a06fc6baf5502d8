"""``mailer db``: the database schema."""

from __future__ import annotations

from typing import Annotated

import typer

from mailer.cli.common import settings

app = typer.Typer(name="db", help="Create and migrate the database schema.", no_args_is_help=True)


@app.command()
def upgrade() -> None:
    """Create the database or migrate it to the newest schema; safe to run again."""
    from mailer import db

    url = settings().database_url
    db.upgrade(url)
    typer.echo(f"database at {db.shown(url)} is up to date")


@app.command()
def revision(
    message: Annotated[str, typer.Argument(help="What the migration changes, in a few words.")],
) -> None:
    """For developers: write a migration for the model changes since the newest one."""
    from mailer import db

    path = db.revision(settings().database_url, message)
    typer.echo(f"wrote {path}; review it before committing")
