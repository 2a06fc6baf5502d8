"""Tasks: thin wrappers that take ids, re-read state and call the library.

Each worker process keeps one ``Runtime`` (database engine, event loop, SMTP pool, throttle)
across tasks, so SMTP connections are reused from batch to batch.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from celery import Task
from celery.signals import worker_process_shutdown, worker_ready

from mailer import db, sends
from mailer.config import load_settings
from mailer.delivery.runner import Runtime
from mailer.delivery.throttle import RedisThrottle
from worker.app import app

MISSED_AFTER = dt.timedelta(hours=1)
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, made on first use (after the fork, never before it)."""
    global _runtime
    if _runtime is None:
        settings = load_settings()
        _runtime = Runtime(settings, throttle=RedisThrottle.from_settings(settings))
    return _runtime


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _close_runtime(**_: Any) -> None:
    global _runtime
    if _runtime is not None:
        _runtime.close()
        _runtime = None


@app.task(name="mailer.ping")  # type: ignore[untyped-decorator]
def ping() -> str:
    """Answer "pong": checks that a worker consumes from the broker."""
    return "pong"


@app.task(name="mailer.deliver_batch", bind=True)  # type: ignore[untyped-decorator]
def deliver_batch(self: Task, send_id: int, batch_no: int) -> dict[str, Any]:
    """Deliver one batch; come back later for deferred readers or a batch held elsewhere."""
    result = runtime().run_batch(send_id, batch_no)
    again = result.held_for if result.held_for is not None else result.retry_in
    if again is not None and result.stopped is None:
        # A new message, not self.retry(): this run succeeded; the next one is new work.
        self.apply_async((send_id, batch_no), countdown=again + 0.1)
    return {
        "sent": result.sent,
        "deferred": result.deferred,
        "failed": result.failed,
        "skipped": result.skipped,
        "unknown": result.unknown,
    }


@app.task(name="mailer.reconcile")  # type: ignore[untyped-decorator]
def reconcile() -> int:
    """Enqueue the batches whose worker died holding them (their lease expired unreleased).

    Their own task message may wait out the broker's visibility timeout (hours) before it
    comes back; this gets them going within a lease. Beat runs it every half minute, and
    every worker once at start, a lease after starting (so a killed worker's leases expired).
    """
    with db.session(runtime().engine) as session:
        stalled = sends.stalled_batches(session)
    for send_id, batch_no in stalled:
        deliver_batch.delay(send_id, batch_no)
    return len(stalled)


@app.task(name="mailer.start_scheduled")  # type: ignore[untyped-decorator]
def start_scheduled() -> int:
    """Beat's clock: start the scheduled sends that are due."""
    with db.session(runtime().engine) as session:
        started = sends.start_due(session, missed_after=MISSED_AFTER)
    for send_id, batches in started.items():
        enqueue(send_id, batches)
    return len(started)


def enqueue(send_id: int, batches: list[int]) -> None:
    for batch_no in batches:
        deliver_batch.delay(send_id, batch_no)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _reconcile_on_start(**_: Any) -> None:
    reconcile.apply_async(countdown=load_settings().batch_lease + 1)
