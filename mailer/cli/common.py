"""What every command needs: the settings and the database, each set up once per command."""

from __future__ import annotations

import json
from contextvars import ContextVar
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from mailer.config import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.")
]

_SETTINGS = "mailer.settings"
_ENGINE = "mailer.engine"
_invocation: ContextVar[typer.Context] = ContextVar("mailer_cli_invocation")


def remember_invocation(ctx: typer.Context) -> None:
    """Root callback: lets ``settings()`` and ``engine()`` find this invocation's context."""
    _invocation.set(ctx)


def settings() -> Settings:
    """The settings, read from the environment on first use in this command.

    Read lazily rather than in the root callback, so that ``--help`` works even when the
    configuration is broken.
    """
    meta = _invocation.get().meta  # one dict shared by the whole invocation
    if _SETTINGS not in meta:
        meta[_SETTINGS] = load_settings()
    return cast(Settings, meta[_SETTINGS])


def engine() -> Engine:
    """The configured database, checked to be reachable and migrated."""
    from mailer import db

    ctx = _invocation.get()
    if _ENGINE not in ctx.meta:
        new = db.connect(settings().database_url)
        ctx.call_on_close(new.dispose)
        db.check(new)
        ctx.meta[_ENGINE] = new
    return cast("Engine", ctx.meta[_ENGINE])


def warn(lines: list[str]) -> None:
    """Tell the user on stderr, leaving stdout to the command's result."""
    for line in lines:
        typer.echo(f"warning: {line}", err=True)


def print_json(document: Any) -> None:
    """Print one JSON document on stdout: with --json, nothing else may go there."""
    typer.echo(json.dumps(document, ensure_ascii=False))
