"""``mailer tracker``: serve opens, clicks, unsubscribes and webhooks; flush buffered events."""

from __future__ import annotations

from typing import Annotated

import typer

from mailer.cli.common import JsonFlag, engine, print_json, settings

app = typer.Typer(name="tracker", help="The tracker: opens, clicks, unsubscribes, webhooks.")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Serve the tracker until stopped; SIGTERM writes buffered events before exiting."""
    from mailer.tracking import server

    config = settings()  # a bad setting stops here with one line, not in every worker
    server.serve(config, host=host, port=port, workers=workers)


@app.command()
def flush(as_json: JsonFlag = False) -> None:
    """Write the buffered events to the database now; prints how many were written."""
    from mailer.tracking.ingest import flush_once, in_memory, open_buffer

    config = settings()
    if in_memory(config.broker_url):
        typer.echo("memory:// keeps events inside each tracker process: nothing here", err=True)
    written = flush_once(engine(), open_buffer(config.broker_url))
    if as_json:
        print_json({"written": written})
    else:
        typer.echo(f"{written} events written")
