"""``mailer stats``: what a send did, as a table, JSON or an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mailer.cli.common import JsonFlag, engine, print_json
from mailer.errors import InputError

if TYPE_CHECKING:
    from rich.table import Table

    from mailer.stats import Hour, SendStats


def stats(
    send: Annotated[
        str,
        typer.Argument(
            metavar="SEND_ID|SLUG", help="A send id, or a post's slug (its latest send)."
        ),
    ],
    as_json: JsonFlag = False,
    html: Annotated[
        Path | None,
        typer.Option(help="Also write a self-contained HTML report (charts, funnel) to this file."),
    ] = None,
) -> None:
    """Delivery, opens (human and machine), clicks, unsubscribes, trials and conversions."""
    from rich.console import Console

    from mailer import db
    from mailer import stats as stats_lib

    with db.session(engine()) as session:
        found = stats_lib.send_stats(session, stats_lib.resolve(session, send))
        hours = stats_lib.timeline(session, found.send_id) if html is not None else []
    if html is not None:
        _write_report(html, found, hours)
        typer.echo(f"report written to {html}", err=True)
    if as_json:
        print_json(found.as_json())
    else:
        Console().print(_table(found))


def _write_report(path: Path, found: SendStats, hours: list[Hour]) -> None:
    from mailer.db.models import utcnow
    from mailer.files import replacing
    from mailer.report import render_html

    if path.is_dir():
        raise InputError(f"--html {path}: is a folder; give a file name")
    page = render_html(found, hours, generated=utcnow())
    with replacing(path, "--html") as file:
        file.write(page)


def _table(found: SendStats) -> Table:
    from rich.table import Table

    table = Table(
        title=f"send {found.send_id} · {found.slug} · {found.status}",
        caption=found.subject,
        title_justify="left",
    )
    table.add_column("")
    for heading in (*found.by_variant, "total"):
        table.add_column(heading, justify="right")
    for row in found.rows():
        table.add_row(*row)
    sizes = (found.html_bytes.get(v) for v in found.by_variant)
    table.add_row("html size", *(f"{n / 1024:,.0f} KB" if n else "-" for n in sizes), "")
    return table
