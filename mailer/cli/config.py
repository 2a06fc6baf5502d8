"""``mailer config``: the settings in effect, where each came from, and what it does."""

from __future__ import annotations

from dataclasses import asdict

import typer

from mailer.cli.common import JsonFlag, print_json
from mailer.config import describe


def config(as_json: JsonFlag = False) -> None:
    """Print every MAILER_* setting in effect (secrets masked), its source and its meaning."""
    shown = describe()
    if as_json:
        print_json({s.env: {k: v for k, v in asdict(s).items() if k != "env"} for s in shown})
        return
    for s in shown:
        typer.echo(f"{s.env}={s.value}  ({s.source})")
        typer.echo(f"    {s.help}")
