"""Beat's clock: start the scheduled sends that are due, from the beat process itself.

Run as a task, starting a send would wait in the queue behind every batch being delivered (an
hour behind a rate-limited send). Here it never waits for a worker: every ``TICK_S`` the beat
process moves the due sends to ``sending`` and enqueues their batches. Two beats are safe: each
start is a compare-and-set, and the one that loses logs one INFO line. Each run is recorded in
Redis (``mailer.heartbeat``), for ``mailer doctor``.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import redis
from sqlalchemy import Engine

from mailer import db, heartbeat, sends
from mailer.config import load_settings
from worker.tasks import enqueue

log = logging.getLogger(__name__)

TICK_S = 5.0


def tick(engine: Engine, grace: dt.timedelta) -> int:
    """Start what is due now; how many sends started."""
    with db.session(engine) as session:
        started = sends.start_due(session, grace=grace)
    # Should this fail (the broker is away), the batches are orphans the reconciler enqueues.
    for send_id, batches in started.items():
        enqueue(engine, send_id, batches)
    return len(started)


def start() -> threading.Thread:
    """Tick in a thread of this (beat) process for as long as it runs."""
    settings = load_settings()
    engine = db.connect(settings.database_url)
    grace = dt.timedelta(seconds=settings.schedule_grace)

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=5)

    def run() -> None:
        while True:
            try:
                tick(engine, grace)
                heartbeat.record(client, time.time())
            except Exception as exc:  # the database or Redis is away: the next tick tries again
                log.warning("could not start due sends: %s", exc)
            time.sleep(TICK_S)

    thread = threading.Thread(target=run, name="mailer-clock", daemon=True)
    thread.start()
    return thread
