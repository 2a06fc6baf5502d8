"""Run batches: one ``Runtime`` per process, kept across batches.

The runtime owns what is worth keeping between batches: the database engine, an event loop,
the SMTP connection pool and the throttle. Celery tasks (``worker/tasks.py``) call
``Runtime.run_batch``; without a broker, ``run_inline`` drives the same batches in-process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import uvloop
from sqlalchemy import Engine

from mailer import db, sends
from mailer.config import Settings
from mailer.delivery.batch import BatchResult, LeaseLost, Policy, Sender, deliver_batch
from mailer.delivery.smtp import SmtpPool
from mailer.delivery.throttle import LocalThrottle, Throttle
from mailer.errors import PermanentDeliveryError

log = logging.getLogger(__name__)


class Runtime:
    """Everything a process needs to deliver batches, made once and reused."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        sender: Sender | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        self.engine = engine or db.connect(settings.database_url)
        self.policy = Policy.from_settings(settings)
        self.loop = uvloop.new_event_loop()  # less CPU per SMTP round trip than asyncio's
        self._pool = (
            None
            if sender is not None
            else SmtpPool(
                settings.smtp,
                size=settings.smtp_concurrency,
                connect_timeout=settings.smtp_connect_timeout,
                command_timeout=settings.smtp_command_timeout,
                data_timeout=settings.smtp_data_timeout,
            )
        )
        self.sender: Sender = sender or self._pool  # type: ignore[assignment]
        self.throttle: Throttle = throttle or LocalThrottle(
            rate_limit=settings.rate_limit, domain_limits=settings.domain_limits
        )

    def run_batch(self, send_id: int, batch_no: int) -> BatchResult:
        """Deliver one batch, then settle the send: done when nothing is left to try."""
        try:
            result = self.loop.run_until_complete(
                deliver_batch(
                    self.engine,
                    send_id,
                    batch_no,
                    policy=self.policy,
                    sender=self.sender,
                    throttle=self.throttle,
                )
            )
        except LeaseLost:
            log.warning("batch %s of send %s was taken over by another run", batch_no, send_id)
            return BatchResult(held_for=self.policy.lease)
        except PermanentDeliveryError as exc:
            with db.session(self.engine) as session:
                sends.fail(session, send_id, str(exc))
            raise
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
    """Deliver a send in this process, retrying deferred readers when they are due."""
    due: dict[int, float] = {}  # batch → when to run it next (monotonic)
    with db.session(runtime.engine) as session:
        for batch_no in sends.unfinished_batches(session, send_id):
            due[batch_no] = 0.0
    while due:
        batch_no, when = min(due.items(), key=lambda item: item[1])
        wait = when - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        del due[batch_no]
        result = runtime.run_batch(send_id, batch_no)
        progress()
        if result.stopped is not None:
            return
        again = result.held_for if result.held_for is not None else result.retry_in
        if again is not None:
            due[batch_no] = time.monotonic() + again
