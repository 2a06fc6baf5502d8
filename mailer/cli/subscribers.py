"""``mailer subscribers``: import, export and manage readers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mailer.cli.common import engine, print_json, settings
from mailer.vocabulary import Tier

if TYPE_CHECKING:
    from mailer.subscribers import Subscriber, SubscriberEvent
    from mailer.subscribers.importer import Progress

app = typer.Typer(
    name="subscribers", help="Import, export and manage readers.", no_args_is_help=True
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
Email = Annotated[str, typer.Argument(help="The reader's address (any case).", show_default=False)]
CheckDns = Annotated[
    bool, typer.Option("--check-dns", help="Also check that each domain accepts mail (slow).")
]


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="CSV file with a header line; email is required.")],
    rejects: Annotated[
        Path | None,
        typer.Option(
            help="Where rejected rows go, with line and reason. [default: FILE.rejects.csv]"
        ),
    ] = None,
    check_dns: CheckDns = False,
    encoding: Annotated[
        str | None,
        typer.Option(help="The file's encoding if not UTF-8 (or UTF-16 with a BOM), e.g. cp1252."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Import readers from a CSV file: new ones are added, known ones brought up to date.

    Columns: email, name, tier, tags (separated by ; or |), trial_ends_at; status, created_at
    and attributes as written by `export`; any other column becomes an attribute. The last
    row for an address wins. Nobody unsubscribed, bounced, complained or erased is made
    active again. All or nothing: a failure leaves the database as it was.
    """
    from mailer import subscribers

    with _progress_bar() as progress:
        result = subscribers.import_csv(
            engine(),
            file,
            rejects=rejects,
            check_dns=check_dns,
            encoding=encoding,
            progress=progress,
        )
    if as_json:
        print_json({"file": str(file), **result.as_dict()})
        return
    r = result
    typer.echo(
        f"{file}: {r.rows:,} rows = {r.created:,} created + {r.updated:,} updated"
        f" + {r.rejected:,} rejected + {r.duplicates:,} duplicates"
    )
    if r.updated:
        typer.echo(f"  {r.unchanged:,} of the updated were already up to date")
    typer.echo(
        f"  {r.suppressed:,} kept suppressed (unsubscribed, bounced, complained or erased;"
        " among the updated or rejected)"
    )
    if r.rejects_file:
        typer.echo(f"  rejected rows, with line numbers and reasons: {r.rejects_file}")


@contextmanager
def _progress_bar() -> Iterator[Progress | None]:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    with Bar(
        TextColumn("{task.description:>8}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


@app.command()
def add(
    email: Email,
    name: Annotated[str | None, typer.Option(help="The reader's name.")] = None,
    tier: Annotated[Tier, typer.Option(help="The reader's tier.")] = "free",
    tag: Annotated[list[str] | None, typer.Option(help="A tag; repeat for more.")] = None,
    check_dns: CheckDns = False,
    as_json: JsonFlag = False,
) -> None:
    """Add a reader, active; an address already there or erased is refused."""
    from mailer import subscribers
    from mailer.db import session

    with session(engine()) as s:
        added = subscribers.add(s, email, name=name, tier=tier, tags=tag or (), check_dns=check_dns)
        events = subscribers.history(s, added.email_key)
    if as_json:
        print_json(_as_json(added, events))
    else:
        typer.echo(f"added {added.email} ({added.tier})")


@app.command()
def show(email: Email, as_json: JsonFlag = False) -> None:
    """A reader's details, tags, attributes and latest events."""
    from mailer import subscribers
    from mailer.db import session

    with session(engine()) as s:
        reader = subscribers.get(s, email)
        events = subscribers.history(s, email)
    if as_json:
        print_json(_as_json(reader, events))
        return
    document = _as_json(reader, events)
    for key in ("email", "name", "tier", "trial_ends_at", "status", "source"):
        typer.echo(f"{key + ':':15}{document[key] or '-'}")
    typer.echo(f"{'joined:':15}{document['created_at']}")
    typer.echo(f"{'tags:':15}{', '.join(reader.tags) or '-'}")
    for key, value in sorted(reader.attributes.items()):
        typer.echo(f"{key + ':':15}{value}")
    typer.echo("events:" if events else "events:        -")
    for e in events:
        typer.echo(f"  {e.at:%Y-%m-%d %H:%M:%S}  {e.kind:15} {e.old or '-'} → {e.new or '-'}")


@app.command()
def export(
    segment: Annotated[
        str | None, typer.Option(help="Only readers in this segment expression.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write here (whole or not at all) instead of stdout.")
    ] = None,
) -> None:
    """Export readers of any status as CSV, in the columns `import` reads back."""
    from mailer import subscribers
    from mailer.db import session
    from mailer.files import replacing

    with session(engine()) as s:
        if out is None:
            subscribers.export_csv(s, sys.stdout, segment=segment)
            return
        with replacing(out, "--out") as file:
            count = subscribers.export_csv(s, file, segment=segment)
    typer.echo(f"exported {count:,} readers to {out}", err=True)


@app.command("set-tier")
def set_tier(
    email: Email,
    tier: Annotated[Tier, typer.Argument(help="The new tier.", show_default=False)],
    trial_ends: Annotated[
        str | None,
        typer.Option(help="With tier trial: when it ends (ISO date or datetime, UTC)."),
    ] = None,
) -> None:
    """Move a reader to another tier (recorded as an event).

    Trial starts, conversions and cancellations count as billing milestones, as from Stripe.
    """
    from mailer.billing.attribution import change_tier
    from mailer.db import session
    from mailer.subscribers import parse_when

    ends = parse_when(trial_ends, "--trial-ends") if trial_ends is not None else None
    with session(engine()) as s:
        reader = change_tier(
            s,
            email,
            tier,
            trial_ends_at=ends,
            attribution_days=settings().attribution_days,
        )
    typer.echo(f"{reader.email} is now {reader.tier}")


@app.command()
def unsubscribe(email: Email) -> None:
    """Unsubscribe a reader: they are never mailed again, and no import re-activates them."""
    from mailer import subscribers
    from mailer.db import session

    with session(engine()) as s:
        reader = subscribers.unsubscribe(s, email)
    typer.echo(f"{reader.email} is unsubscribed")


@app.command()
def erase(email: Email) -> None:
    """Delete a reader and their personal data; only a hash stays, so they are never re-added."""
    from mailer import subscribers
    from mailer.db import session

    with session(engine()) as s:
        erased = subscribers.erase(s, email)
    typer.echo(f"erased {email.strip()}" if erased else f"{email.strip()} was erased already")


def _as_json(reader: Subscriber, events: tuple[SubscriberEvent, ...]) -> dict[str, Any]:
    def iso(value: Any) -> str | None:
        return value.isoformat() if value else None

    return {
        "email": reader.email,
        "name": reader.name,
        "tier": reader.tier,
        "trial_ends_at": iso(reader.trial_ends_at),
        "status": reader.status,
        "tags": list(reader.tags),
        "attributes": dict(reader.attributes),
        "source": reader.source,
        "created_at": iso(reader.created_at),
        "updated_at": iso(reader.updated_at),
        "events": [{"kind": e.kind, "old": e.old, "new": e.new, "at": iso(e.at)} for e in events],
    }
