"""``mailer doctor``: check every part a send needs, and say how to fix what fails."""

from __future__ import annotations

from dataclasses import asdict

import typer

from mailer.cli.common import JsonFlag, print_json, settings


def doctor(as_json: JsonFlag = False) -> None:
    """Check the database, broker, SMTP server, workers, beat, tracker and signing key."""
    from mailer.doctor import examine

    checks = examine(settings())
    ok = all(check.ok for check in checks)
    if as_json:
        print_json({"ok": ok, "checks": [asdict(check) for check in checks]})
    else:
        for check in checks:
            typer.echo(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<10}  {check.detail}")
    if not ok:
        raise typer.Exit(1)
