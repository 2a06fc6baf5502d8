"""``mailer tracker``: serve opens, clicks, unsubscribes and webhooks; flush buffered events."""

from __future__ import annotations

import functools
from typing import Annotated

import typer
import uvicorn
from sqlalchemy import Engine
from starlette.applications import Starlette

from mailer import db
from mailer.cli.common import JsonFlag, engine, print_json, settings
from mailer.config import Settings, load_settings
from mailer.tracking.app import create_app
from mailer.tracking.ingest import MemoryBuffer, flush_once, open_buffer
from mailer.tracking.tokens import Signer

app = typer.Typer(name="tracker", help="The tracker: opens, clicks, unsubscribes, webhooks.")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Serve the tracker until stopped; SIGTERM writes buffered events before exiting."""
    settings()  # a bad setting stops here with one line, not in every worker
    uvicorn.run(
        f"{__name__}:app_from_settings",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        # X-Forwarded-For is honoured only by create_app(trust_proxy=True), never by uvicorn.
        proxy_headers=False,
        server_header=False,
        access_log=False,  # one line per pixel would cost more than serving it
        timeout_graceful_shutdown=20,  # then the flusher writes the buffer (compose allows 30 s)
    )


@app.command()
def flush(as_json: JsonFlag = False) -> None:
    """Write the buffered events to the database now; prints how many were written."""
    config = settings()
    buffer = open_buffer(config.broker_url)
    if isinstance(buffer, MemoryBuffer):
        typer.echo("memory:// keeps events inside each tracker process: nothing here", err=True)
    written = flush_once(engine(), buffer)
    if as_json:
        print_json({"written": written})
    else:
        typer.echo(f"{written} events written")


def app_from_settings() -> Starlette:
    """The tracker configured from the environment: uvicorn calls this in each worker."""
    config = load_settings()
    database = db.connect(config.database_url)
    signer = Signer(config.secret_keys)
    return create_app(
        engine=database,
        signer=signer,
        site_url=config.site_url,
        buffer=open_buffer(config.broker_url),
        flush_interval=config.tracker_flush_interval,
        stripe_webhook=functools.partial(_handle_stripe, config, database, signer),
    )


def _handle_stripe(
    config: Settings, database: Engine, signer: Signer, payload: bytes, signature: str | None
) -> int:
    # Imported when a webhook first arrives: the tracker serves pixels without loading Stripe.
    from mailer.tracking.billing import handle_stripe

    return handle_stripe(
        database,
        payload,
        signature,
        secret=config.stripe_webhook_secret,
        signer=signer,
        attribution_days=config.attribution_days,
    )
