"""``mailer bounces``: read bounces, complaints and unsubscribes by mail back in."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from mailer.cli.common import JsonFlag, engine, print_json, settings
from mailer.errors import InputError
from mailer.logs import JsonFormatter

app = typer.Typer(
    name="bounces", help="Inbound mail: bounces, complaints (ARF) and unsubscribes by mail."
)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 2526,
) -> None:
    """An SMTP server for the VERP return path, the unsubscribe and the feedback address;
    every other recipient is refused with 550. Runs until SIGTERM or Ctrl-C."""
    import asyncio

    from mailer.inbound import Policy
    from mailer.inbound.server import serve as serve_smtp

    config = settings()
    policy = Policy.from_settings(config)
    database = engine()
    _log_to_stderr(config.log_format)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_smtp(database, policy, host, port, stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        raise InputError(f"--port {port}: cannot listen on {host}: {exc.strerror or exc}") from None


@app.command()
def process(
    paths: Annotated[
        list[Path],
        typer.Argument(metavar="PATH...", help=".eml files, Maildir folders or mbox files."),
    ],
    as_json: JsonFlag = False,
) -> None:
    """Read bounces, complaints and unsubscribes from files; each message counts once, however
    often it is read. Every path is checked before any message is handled."""
    from mailer.inbound import Policy, Tally, handle
    from mailer.inbound.sources import read

    with read(paths) as items:
        policy = Policy.from_settings(settings())
        database = engine()
        tally = Tally.of(handle(database, item.load(), policy) for item in items)
    if as_json:
        print_json(dataclasses.asdict(tally))
        return
    counts = dataclasses.asdict(tally)
    processed = counts.pop("processed")
    shown = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in counts.items() if n)
    typer.echo(f"{processed} messages read: {shown or 'nothing new'}")


def _log_to_stderr(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd: a line per command
