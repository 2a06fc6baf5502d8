"""Run batches: one ``Runtime`` per process, kept across batches, and when a batch runs next.

The runtime owns what is worth keeping between batches: the database engine, an event loop,
the SMTP connection pool and the throttle. Celery tasks (``worker/tasks.py``) call
``Runtime.run_batch``; without a broker, ``run_inline`` drives the same batches in-process.
Both ask ``next_run`` when a batch should run again: the one place that rule lives.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Callable

import uvloop
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from mailer import db, sends
from mailer.config import Settings
from mailer.delivery.batch import (
    LEDGER_PATIENCE_S,
    BatchResult,
    Policy,
    Sender,
    deliver_batch,
)
from mailer.delivery.dkim import DkimSigner, signer_from_settings
from mailer.delivery.ledger import SqlLedger
from mailer.delivery.smtp import SmtpPool
from mailer.delivery.throttle import LocalThrottle, Throttle
from mailer.errors import ConfigError, MailerError

log = logging.getLogger(__name__)

# An interrupted batch runs again after 1, 2, 4... seconds (up to two minutes), each wait
# jittered by ±50% so that batches stopped by one outage do not all come back at once.
INTERRUPTED_FIRST_S = 1.0
INTERRUPTED_MAX_S = 120.0
HELD_MARGIN_S = 0.1  # come back just after the other run's lease expires
STOP_POLL_S = 0.2  # how soon a wait for deferred readers notices a stop request


def next_run(result: BatchResult, *, interruptions: int = 0) -> float | None:
    """Seconds until this batch should run again; None when no run of ours is needed.

    ``interruptions``: how many runs in a row before this one were interrupted.
    """
    match result.outcome:
        case "ran":
            return result.due_in  # None: nothing deferred, the batch is finished
        case "held":
            return (result.due_in or 0.0) + HELD_MARGIN_S
        case "handed_over":
            return 0.0
        case "interrupted":
            wait = min(INTERRUPTED_FIRST_S * 2.0**interruptions, INTERRUPTED_MAX_S)
            return wait * random.uniform(0.5, 1.5)
        case "missing" | "stopped" | "taken_over" | "misconfigured":
            return None


class Runtime:
    """Everything a process needs to deliver batches, made once and reused.

    ``stop_requested`` is asked before each reader is claimed: the worker answers True once it
    is shutting down, so running batches hand their remaining readers over.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        sender: Sender | None = None,
        throttle: Throttle | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        self.engine = engine or db.connect(settings.database_url)
        self.policy = Policy.from_settings(settings)
        self.loop = uvloop.new_event_loop()  # less CPU per SMTP round trip than asyncio's
        self._pool = None if sender is not None else SmtpPool.from_settings(settings)
        self.sender: Sender = sender or self._pool  # type: ignore[assignment]
        self.throttle: Throttle = throttle or LocalThrottle(
            rate_limit=settings.rate_limit, domain_limits=settings.domain_limits
        )
        self.stop_requested = stop_requested
        # A bad key fails the send with its reason, never a batch (`mailer send` checks first).
        self.dkim: DkimSigner | None = None
        self.dkim_error: str | None = None
        try:
            self.dkim = signer_from_settings(settings)
        except ConfigError as exc:
            self.dkim_error = str(exc)

    def run_batch(self, send_id: int, batch_no: int) -> BatchResult:
        """Deliver one batch, then settle the send. Never raises for a fault: an
        ``interrupted`` result says what went wrong, and ``next_run`` when to try again."""
        if self.dkim_error is not None:
            result = BatchResult("misconfigured", error=self.dkim_error)
            return self._settle(send_id, batch_no, result)
        ledger = SqlLedger(
            self.engine,
            send_id,
            batch_no,
            lease=self.policy.lease,
            patience=max(self.policy.lease, LEDGER_PATIENCE_S),
        )
        result = self.loop.run_until_complete(
            deliver_batch(
                ledger,
                send_id=send_id,
                policy=self.policy,
                sender=self.sender,
                throttle=self.throttle,
                dkim=self.dkim,
                stop_requested=self.stop_requested,
            )
        )
        try:
            return self._settle(send_id, batch_no, result)
        except (MailerError, DBAPIError) as exc:
            log.warning(
                "send %s: could not settle batch %s: %s",
                send_id,
                batch_no,
                exc,
                extra={"send_id": send_id, "batch_no": batch_no},
            )
            return BatchResult("interrupted", error=str(exc))

    def expect_next_run(self, send_id: int, batch_no: int, after: float) -> None:
        """Note that the batch runs again within ``after`` seconds, and a lease of grace: if
        that run's task is lost, the reconciler enqueues the batch once the time has passed."""
        within = dt.timedelta(seconds=after + self.policy.lease)
        try:
            with db.session(self.engine) as session:
                sends.expect_run(session, send_id, batch_no, within=within)
        except (MailerError, DBAPIError) as exc:  # the run is still scheduled: only the net is not
            log.warning(
                "batch %s of send %s: could not note its next run: %s",
                batch_no,
                send_id,
                exc,
                extra={"send_id": send_id, "batch_no": batch_no},
            )

    def _settle(self, send_id: int, batch_no: int, result: BatchResult) -> BatchResult:
        """Record what the batch's outcome means for its send."""
        where = {"send_id": send_id, "batch_no": batch_no}
        if result.outcome == "taken_over":
            log.warning(
                "batch %s of send %s was taken over by another run", batch_no, send_id, extra=where
            )
        if result.outcome == "misconfigured":
            with db.session(self.engine) as session:
                sends.fail(session, send_id, result.error or "configuration error")
        elif result.outcome == "interrupted":
            log.warning(
                "batch %s of send %s interrupted: %s", batch_no, send_id, result.error, extra=where
            )
            with db.session(self.engine) as session:
                if sends.give_up_if_too_old(
                    session, send_id, self.policy.retry_max_age, result.error or "interrupted"
                ):
                    return BatchResult("stopped", send_status="failed", error=result.error)
        elif result.outcome in ("ran", "stopped"):
            with db.session(self.engine) as session:
                sends.finish_if_done(session, send_id)
        return result

    def close(self) -> None:
        if self._pool is not None:
            self.loop.run_until_complete(self._pool.close())
        self.loop.close()
        self.engine.dispose()


def run_inline(
    runtime: Runtime, send_id: int, *, progress: Callable[[], None] = lambda: None
) -> None:
    """Deliver a send in this process, running each batch again when ``next_run`` says.

    Returns early once ``runtime.stop_requested()``: the running batch hands its readers over
    (what is in flight finishes), and no wait for deferred readers outlasts the request.
    """
    due: dict[int, float] = {}  # batch → when to run it next (monotonic)
    interruptions: dict[int, int] = {}
    with db.session(runtime.engine) as session:
        for batch_no in sends.unfinished_batches(session, send_id):
            due[batch_no] = 0.0
    while due:
        batch_no, when = min(due.items(), key=lambda item: item[1])
        while (wait := when - time.monotonic()) > 0 and not runtime.stop_requested():
            time.sleep(min(wait, STOP_POLL_S))
        if runtime.stop_requested():
            return
        del due[batch_no]
        result = runtime.run_batch(send_id, batch_no)
        progress()
        if result.outcome in ("stopped", "misconfigured", "handed_over"):
            return
        again = next_run(result, interruptions=interruptions.get(batch_no, 0))
        interruptions[batch_no] = (
            interruptions.get(batch_no, 0) + 1 if result.outcome == "interrupted" else 0
        )
        if again is not None:
            due[batch_no] = time.monotonic() + again
