"""The ``mailer`` command: one Typer app, one module per command group.

Adding a group is two lines: import its module and ``app.add_typer(module.app)``.
Command modules import the library inside each command, not at their top: ``mailer --help``
then loads no SQLAlchemy, premailer or uvicorn, and starts in a fraction of the time
(tests/test_layering.py pins it).
Commands stay thin (parse, call the library, print); ``main`` turns any ``MailerError``
into one ``error: ...`` line on stderr and exit status 1, and any other exception (a bug)
too: its traceback only with ``MAILER_DEBUG=1``.
"""

from __future__ import annotations

import gc
import traceback

import typer

from mailer.cli import (
    bounces,
    config,
    db,
    dkim,
    doctor,
    posts,
    preview,
    secret,
    segments,
    sends,
    stats,
    subscribers,
    tracker,
)
from mailer.cli.common import remember_invocation
from mailer.config import debug_requested, masked
from mailer.errors import MailerError

app = typer.Typer(
    name="mailer",
    help="Self-hosted newsletter delivery: render once, personalise cheaply, deliver exactly once.",
    no_args_is_help=True,
    add_completion=False,
    # Every failure is reported in one line by main(); MAILER_DEBUG=1 adds a bug's traceback,
    # and a plain one serves it better than a pretty one.
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.callback()(remember_invocation)
app.add_typer(db.app)
app.add_typer(posts.app)
app.add_typer(subscribers.app)
app.add_typer(segments.app)
app.command()(preview.preview)
app.command()(sends.send)
app.add_typer(sends.app)
app.command()(stats.stats)
app.add_typer(tracker.app)
app.command()(doctor.doctor)
app.add_typer(dkim.app)
app.add_typer(bounces.app)
app.command()(secret.secret)
app.command()(config.config)

UNEXPECTED_SHOWN = 200  # characters of an unexpected error's message: it may hold a whole query


def main() -> None:
    try:
        app()
    except MailerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    except Exception as exc:
        # A bug: the user gets one line, and the traceback when they ask for it.
        if debug_requested():
            typer.echo(masked(traceback.format_exc()).rstrip("\n"), err=True)
        text = masked(" ".join(str(exc).split()))
        shown = text[:UNEXPECTED_SHOWN] + ("..." if len(text) > UNEXPECTED_SHOWN else "")
        hint = "" if debug_requested() else "; MAILER_DEBUG=1 shows the traceback"
        typer.echo(f"error: unexpected {type(exc).__name__}: {shown}{hint}", err=True)
        raise SystemExit(1) from None
    finally:
        # The collector's last pass at exit walks every object of every module imported
        # (SQLAlchemy, Celery, ...): about 0.2 s per command. Freezing skips only that pass;
        # modules are still torn down and their objects released.
        gc.freeze()
