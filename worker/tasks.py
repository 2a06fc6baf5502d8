"""Tasks: thin wrappers that take ids, re-read state and call the library.

This module is also what the library's dispatch knows of the workers (``enqueue`` and ``answering``:
``mailer.delivery.dispatch.Workers``), found through the ``mailer.workers`` entry point.

Each worker process keeps one ``Runtime`` (database engine, event loop, SMTP pool, throttle)
across tasks, so SMTP connections are reused from batch to batch. When a batch runs again is
``runner.next_run``'s answer: an interrupted batch is retried (Celery counts the retries, which
the back-off grows with); a batch with readers due later, held by another run, or handed over by
a worker that is shutting down is enqueued again as new work.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable
from multiprocessing.sharedctypes import RawValue
from typing import Any, ClassVar

import redis
from celery import Task, bootsteps
from celery.signals import worker_process_shutdown, worker_shutting_down
from kombu.exceptions import OperationalError
from sqlalchemy import Engine

from mailer import db, sends
from mailer.config import load_settings
from mailer.delivery.runner import Runtime, next_run
from mailer.delivery.throttle import LocalThrottle, RedisThrottle, Throttle
from mailer.errors import BrokerError
from worker.app import app

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 30.0

# Made at import, in the worker's main process, so the pool processes forked from it share it:
# the main process sets it when a warm shutdown begins, and running batches hand over.
_stopping = RawValue("b", 0)
_runtime: Runtime | None = None
_broker: redis.Redis | None = None
ANNOUNCED = "mailer:announced:"  # + send id: the send's start was logged


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


# Retried without limit: give_up_if_too_old ends the retries at MAILER_RETRY_MAX_AGE.
@app.task(name="mailer.deliver_batch", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def deliver_batch(self: Task, send_id: int, batch_no: int) -> dict[str, Any]:
    """Deliver one batch; run it again when ``next_run`` says."""
    result = runtime().run_batch(send_id, batch_no)
    if result.sent or result.deferred or result.failed:
        _announce(send_id)
    again = next_run(result, interruptions=self.request.retries)
    shown = self.request.argsrepr  # the label enqueue gave it, kept by every next run
    if again is not None:
        runtime().expect_next_run(send_id, batch_no, again)
    if result.outcome == "interrupted":
        raise self.retry(countdown=again, argsrepr=shown)
    if again is not None:
        # A new message, not self.retry(): this run succeeded; the next one is new work.
        self.apply_async((send_id, batch_no), countdown=again, argsrepr=shown)
    return {
        "outcome": result.outcome,
        "sent": result.sent,
        "deferred": result.deferred,
        "failed": result.failed,
        "skipped": result.skipped,
        "unknown": result.unknown,
    }


def _announce(send_id: int) -> None:
    """Log "send N (slug) started" once, from whichever worker first mails one of its readers.

    Whoever started it (the CLI, beat) may log elsewhere; the workers' logs say it too. Once per
    send across every worker: a key set only if absent in the broker's Redis, kept for a day.
    """
    global _broker
    try:
        if _broker is None:
            _broker = redis.Redis.from_url(str(app.conf.broker_url), socket_timeout=2)
        if not _broker.set(f"{ANNOUNCED}{send_id}", 1, nx=True, ex=86_400):
            return
    except redis.RedisError:
        return  # a log line is not worth failing a batch for
    with db.session(runtime().engine) as session:
        slug, batches = sends.slug_and_batch_count(session, send_id)
    where = {"send_id": send_id}
    log.info("send %s (%s) started; batches: %s", send_id, slug, batches, extra=where)


# Acknowledged on receipt, so that its own message is not among the broker's unacknowledged.
@app.task(name="mailer.reconcile", acks_late=False)  # type: ignore[untyped-decorator]
def reconcile() -> int:
    """Enqueue the batches that nothing would run otherwise; mark done the finished sends.

    Batches whose worker died holding them (their lease expired unreleased) or before noting
    their next run, and batches never run whose task was lost (Redis restarted without
    persistence), never published (the broker was away) or taken by a worker that died: the
    broker gives a dead worker's tasks back only after its visibility timeout (hours). A batch
    whose task waits in the queue is left to it. Sends whose last batch's worker died before
    marking them done are marked done. Every worker asks for this a lease after it starts,
    then every half minute.
    """
    # None where the broker cannot be looked into: then only what the ledger alone tells.
    tasks = _batches_with_a_task(runtime().policy.lease)
    with db.session(runtime().engine) as session:
        found = sends.stalled_batches(session, never_run=tasks is not None)
        sends.finish_all_done(session)
    # A send started since the broker was read may find its batches enqueued twice: harmless,
    # as the lease makes a second copy of a batch wait.
    stalled = [batch for batch in found if batch not in (tasks or ())]
    if stalled:
        log.warning("reconciler: enqueuing %d batches that nothing would run", len(stalled))
    by_send: dict[int, list[int]] = {}
    for send_id, batch_no in stalled:
        by_send.setdefault(send_id, []).append(batch_no)
    for send_id, batches in by_send.items():
        enqueue(runtime().engine, send_id, batches)
        for batch_no in batches:  # a lease of grace before it counts stalled again
            runtime().expect_next_run(send_id, batch_no, 0.0)
    return len(stalled)


def _batches_with_a_task(lease: float) -> set[tuple[int, int]] | None:
    """The batches the broker holds a task for that will run: one waiting in the queue, or
    one a worker took less than a lease ago. A task taken longer ago whose batch no run holds
    is presumed held by a worker that died: the broker gives it back only after its
    visibility timeout (hours). None where the broker is not Redis: it cannot be looked into.
    """
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        client = getattr(channel, "client", None)
        if client is None or not hasattr(channel, "unacked_key"):
            return None
        queued = client.lrange(app.conf.task_default_queue, 0, -1)
        taken = client.zrangebyscore(channel.unacked_index_key, time.time() - lease, "+inf")
        held = client.hmget(channel.unacked_key, taken) if taken else []
    found = [_batch_of(raw) for raw in queued]
    found += [_batch_of(raw, unacked=True) for raw in held if raw]
    return {batch for batch in found if batch is not None}


def _batch_of(raw: bytes, *, unacked: bool = False) -> tuple[int, int] | None:
    """(send, batch) of a ``deliver_batch`` task's message (Celery's protocol 2), else None.
    An unacknowledged entry is [message, exchange, routing key]."""
    try:
        message = json.loads(raw)[0] if unacked else json.loads(raw)
        if message["headers"].get("task") != deliver_batch.name:
            return None
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        send_id, batch_no = json.loads(body)[0]
        return int(send_id), int(batch_no)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):  # not one of ours
        return None


def enqueue(engine: Engine, send_id: int, batches: Iterable[int]) -> None:
    """One task per batch, each shown (in Flower, in logs) by its send's id and slug and by
    which batch of how many it is, e.g. ``send 9 (the-quiet-harbour), batch 3 of 40``."""
    with db.session(engine) as session:
        slug, total = sends.slug_and_batch_count(session, send_id)
    for batch_no in batches:
        label = f"send {send_id} ({slug}), batch {batch_no + 1} of {total}"
        deliver_batch.apply_async((send_id, batch_no), argsrepr=label)


def answering(timeout: float) -> list[str]:
    """The names of the workers that answered within ``timeout`` seconds."""
    try:
        answers = app.control.ping(timeout=timeout)
    except OperationalError as exc:  # no broker to ask through
        raise BrokerError(f"cannot ask the workers: {exc}") from None
    return sorted(name for answer in answers for name in answer)


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
