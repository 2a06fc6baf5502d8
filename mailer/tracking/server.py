"""The tracker's processes: uvicorn serving ``app_from_settings``, and beside it the flusher.

With Redis, one process of its own (the flusher) writes the buffered events to the database;
SIGTERM stops the server, which drains its requests, and then the flusher writes what is left.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import time
from multiprocessing.synchronize import Event as EventType
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from mailer import db
from mailer.config import Settings, load_settings
from mailer.logs import uvicorn_config
from mailer.tokens import Signer
from mailer.tracking.ingest import Buffer, Flusher, in_memory, open_buffer

if TYPE_CHECKING:
    from starlette.types import ASGIApp


def serve(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Serve until stopped; SIGTERM writes buffered events before this returns."""
    import uvicorn  # here, not at the top: every other command starts faster without it

    from mailer.tracking.http import HeaderLimited

    # With Redis, one process of its own writes the events: in a serving process, the flusher
    # would hold the GIL for milliseconds at a time, and every pixel would wait that long.
    flusher = None
    if not in_memory(settings.broker_url):
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        flusher = context.Process(
            target=_flush_until_stopped, args=(settings, stop, os.getpid()), name="flusher"
        )
        flusher.start()
    # uvicorn re-raises the SIGTERM it handled once it has stopped; with the default handler
    # that would kill this process before it stops the flusher. This one lets it finish.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run(
            f"{__name__}:app_from_settings",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            http=HeaderLimited,  # httptools, with a cap on request headers
            # X-Forwarded-For: only with MAILER_TRACKER_TRUST_PROXY, read by the app, not uvicorn.
            proxy_headers=False,
            server_header=False,
            access_log=False,  # one line per pixel would cost more than serving it
            timeout_graceful_shutdown=20,  # then the flusher writes the buffer (compose: 30 s)
            log_config=uvicorn_config(settings.log_format) or uvicorn.config.LOGGING_CONFIG,
        )
    finally:
        if flusher is not None:
            stop.set()  # the server stored what its workers queued: write it all
            flusher.join(timeout=60)


def _flush_until_stopped(settings: Settings, stop: EventType, parent: int) -> None:
    """The flusher process: writes the buffer every interval until the server has stopped."""
    # SIGTERM reaches the whole process group; this one waits for the server to finish first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    flusher = Flusher(db.connect(settings.database_url), open_buffer(settings.broker_url))
    due = time.monotonic()
    # Checks every second that the server is still there: if it was killed outright, nobody
    # would ever set ``stop``.
    while not stop.wait(min(1.0, settings.tracker_flush_interval)) and os.getppid() == parent:
        if time.monotonic() >= due:
            flusher.flush_logged()
            due = time.monotonic() + settings.tracker_flush_interval
    flusher.flush_logged()
    flusher.buffer.retire(flusher.consumer)


def app_from_settings() -> ASGIApp:
    """The tracker configured from the environment: uvicorn calls this in each worker."""
    from mailer.tracking.app import create_app  # Starlette: only where the tracker serves

    settings = load_settings()
    database = db.connect(settings.database_url)
    signer = Signer(settings.secret_keys)
    buffer = open_buffer(settings.broker_url)
    return create_app(
        engine=database,
        signer=signer,
        site_url=settings.site_url,
        buffer=buffer,
        # A buffer in memory lives in this process, so its flusher must too; see serve().
        flush_interval=settings.tracker_flush_interval if in_memory(settings.broker_url) else None,
        stripe_webhook=functools.partial(_handle_stripe, settings, database, signer),
        trust_proxy=settings.tracker_trust_proxy,
        metrics=functools.partial(_metrics, settings, database, buffer),
        metrics_token=settings.metrics_token,
        max_body=settings.tracker_max_body,
        tracker_url=settings.tracker_url,
    )


def _metrics(settings: Settings, database: Engine, buffer: Buffer) -> bytes:
    # Imported at the first scrape: the tracker serves pixels without loading prometheus-client.
    import redis

    from mailer.metrics import render

    broker = None if in_memory(settings.broker_url) else redis.Redis.from_url(settings.broker_url)
    try:
        return render(database, broker, buffer)
    finally:
        if broker is not None:
            broker.close()


def _handle_stripe(
    settings: Settings, database: Engine, signer: Signer, payload: bytes, signature: str | None
) -> int:
    # Imported when a webhook first arrives: the tracker serves pixels without loading Stripe.
    from mailer.billing.webhook import handle_stripe

    return handle_stripe(
        database,
        payload,
        signature,
        secret=settings.stripe_webhook_secret,
        signer=signer,
        attribution_days=settings.attribution_days,
    )
