"""Tasks: thin wrappers that take ids, re-read state and call the library.

Each worker process keeps one ``Runtime`` (database engine, event loop, SMTP pool, throttle)
across tasks, so SMTP connections are reused from batch to batch. When a batch runs again is
``runner.next_run``'s answer: an interrupted batch is retried (Celery counts the retries, which
the back-off grows with); a batch with readers due later, held by another run, or handed over by
a worker that is shutting down is enqueued again as new work.
"""

from __future__ import annotations

import datetime as dt
import logging
from multiprocessing.sharedctypes import RawValue
from typing import Any, ClassVar

import redis
from celery import Task, bootsteps
from celery.signals import worker_process_shutdown, worker_shutting_down

from mailer import db, sends
from mailer.config import load_settings
from mailer.delivery.runner import Runtime, next_run
from mailer.delivery.throttle import LocalThrottle, RedisThrottle, Throttle
from worker.app import app

log = logging.getLogger(__name__)

MISSED_AFTER = dt.timedelta(hours=1)
RECONCILE_EVERY_S = 30.0
# A key the reconciler keeps in the broker's Redis: gone means Redis lost its data (restarted
# without persistence, or flushed), and with it every queued batch task.
BROKER_MARKER = "mailer:broker-marker"

# Made at import, in the worker's main process, so the pool processes forked from it share it:
# the main process sets it when a warm shutdown begins, and running batches hand over.
_stopping = RawValue("b", 0)
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, made on first use (after the fork, never before it)."""
    global _runtime
    if _runtime is None:
        settings = load_settings()
        # Without a limit the throttle needs no shared state, so no Redis to fail.
        throttle: Throttle = (
            RedisThrottle.from_settings(settings)
            if settings.rate_limit or settings.domain_limits
            else LocalThrottle(rate_limit=0, domain_limits=())
        )
        _runtime = Runtime(
            settings, throttle=throttle, stop_requested=lambda: bool(_stopping.value)
        )
    return _runtime


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _hand_over(**_: Any) -> None:
    _stopping.value = 1


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
    """Deliver one batch; run it again when ``next_run`` says."""
    result = runtime().run_batch(send_id, batch_no)
    again = next_run(result, interruptions=self.request.retries)
    if result.outcome == "interrupted":
        raise self.retry(countdown=again, max_retries=None)
    if again is not None:
        # A new message, not self.retry(): this run succeeded; the next one is new work.
        self.apply_async((send_id, batch_no), countdown=again)
    return {
        "outcome": result.outcome,
        "sent": result.sent,
        "deferred": result.deferred,
        "failed": result.failed,
        "skipped": result.skipped,
        "unknown": result.unknown,
    }


@app.task(name="mailer.reconcile")  # type: ignore[untyped-decorator]
def reconcile() -> int:
    """Enqueue the batches that nothing would run otherwise.

    Those whose worker died holding them (their lease expired unreleased): their own task
    message may wait out the broker's visibility timeout (hours) before it comes back. And,
    after the broker lost its data, every batch with readers left that no run holds.
    Every worker asks for this a lease after it starts, then every half minute.
    """
    lost = _broker_lost_its_tasks()
    with db.session(runtime().engine) as session:
        stalled = sends.stalled_batches(session, unleased=lost)
    if lost and stalled:
        log.warning("the broker lost its queued tasks: enqueuing %d batches again", len(stalled))
    for send_id, batch_no in stalled:
        deliver_batch.delay(send_id, batch_no)
    return len(stalled)


def _broker_lost_its_tasks() -> bool:
    """True (once) when the marker key was missing from the broker's Redis."""
    url = str(app.conf.broker_url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return False
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return bool(client.set(BROKER_MARKER, "1", nx=True))
    finally:
        client.close()


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


class Reconciler(bootsteps.StartStopStep):  # type: ignore[misc]
    """Each worker asks for ``reconcile`` a lease after it starts (so that a killed worker's
    leases have expired), then every ``RECONCILE_EVERY_S``: no beat needed for recovery."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.timers: list[Any] = []

    def start(self, worker: Any) -> None:
        first = load_settings().batch_lease + 1
        self.timers = [
            worker.timer.call_after(first, self.tick),
            worker.timer.call_repeatedly(RECONCILE_EVERY_S, self.tick),
        ]

    def stop(self, worker: Any) -> None:
        for timer in self.timers:
            timer.cancel()

    def tick(self) -> None:
        try:
            reconcile.apply_async(retry=False)
        except Exception as exc:  # the broker is away: the next tick asks again
            log.warning("could not ask for a reconcile: %s", exc)


app.steps["worker"].add(Reconciler)
