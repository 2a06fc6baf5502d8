"""Deliver one batch of a send: claim, personalise, send, record: each reader exactly once.

How exactly-once holds:

- A batch is leased to one run at a time, renewed while it works. A second copy of the task
  (redelivered, or enqueued again by resume or the reconciler) finds the lease held and is told
  when to come back.
- A reader's row goes ``queued → sending`` by compare-and-set, committed *before* the message
  is handed to SMTP, and ``sending → sent | deferred | failed`` after the server answered (the
  state machine is ``ledger.MOVES``).
- A run that takes a lease and finds rows still ``sending`` knows their run died with the
  message in flight: the server may or may not have it, so they become ``unknown`` and are not
  resent unless the author says so (``mailer sends retry-unknown``).

How a batch ends, whatever fails: the lanes (one per SMTP connection) and the ledger writer run
in one task group. A lane that meets an error sets the run's fault and returns; every lane checks
it before claiming, so the others stop claiming, finish the message they hold and record it; then
the writer commits what is left and the group ends. No task outlives ``deliver_batch``. A row
claimed but never handed to the server goes back to ``queued``. The run reports how it ended
(``BatchResult.outcome``) and never raises for a fault: the caller decides when it runs again.

Claims and results go through one writer that commits them in groups (group commit), in a
thread, while the connections keep sending: the ledger costs a few commits per batch rather
than two per reader, and a lane never waits for more than its own claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from mailer.config import Settings
from mailer.db.models import utcnow
from mailer.delivery.dkim import DkimSigner
from mailer.delivery.ledger import (
    Candidate,
    Flushed,
    Lease,
    Move,
    Record,
    StoredTemplate,
)
from mailer.delivery.personalise import Personaliser, Recipient
from mailer.delivery.smtp import Outcome
from mailer.delivery.throttle import Throttle
from mailer.errors import MailerError, PermanentDeliveryError
from mailer.tokens import Signer
from mailer.vocabulary import SendStatus, Variant

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 3600.0
LEDGER_PATIENCE_S = 60.0  # how long a run waits for the database to record what it sent


class Sender(Protocol):
    async def send(self, envelope_from: str, recipient: str, message: bytes) -> Outcome:
        """Raise only before anything was handed to the server (``PermanentDeliveryError`` for a
        configuration problem); everything that happens at the server is an ``Outcome``."""


class Ledger(Protocol):
    """One batch's rows and lease (``ledger.SqlLedger``); each call blocks, so it runs in a
    thread, and raises ``errors.LedgerUnavailable`` when the database does not answer."""

    def acquire(self) -> tuple[Lease, float]: ...
    def release(self) -> None: ...
    def reconcile_in_flight(self) -> int: ...
    def load(self) -> tuple[SendStatus, dt.datetime, dict[Variant, StoredTemplate]]: ...
    def candidates(self) -> list[Candidate]: ...
    def next_due(self) -> float | None: ...
    def flush(
        self, claims: Sequence[int], records: Sequence[Record], *, renew: bool
    ) -> Flushed: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Policy:
    tracker_url: str
    secret_keys: tuple[str, ...]
    concurrency: int
    retry_attempts: int
    retry_max_age: float
    retry_backoff: float
    lease: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            tracker_url=settings.tracker_url,
            secret_keys=settings.secret_keys,
            concurrency=settings.smtp_concurrency,
            retry_attempts=settings.retry_attempts,
            retry_max_age=settings.retry_max_age,
            retry_backoff=settings.retry_backoff,
            lease=settings.batch_lease,
        )

    def backoff(self, attempts: int) -> float:
        return float(min(self.retry_backoff * 2 ** (attempts - 1), MAX_BACKOFF_S))


BatchOutcome = Literal[
    "ran",  # everything due now was tried; ``due_in`` says when deferred readers are due
    "held",  # another run holds the lease; it expires in ``due_in`` seconds
    "missing",  # no such batch: nothing to do, ever
    "stopped",  # the send is not sending (``send_status`` says what it is)
    "taken_over",  # the lease was lost mid-run: the run that took it carries on
    "interrupted",  # a fault (database, SMTP server, throttle...) stopped the run: ``error``
    "handed_over",  # this process is shutting down: readers not yet claimed wait for another run
    "misconfigured",  # a configuration problem (AUTH, TLS) that would fail every reader: ``error``
]


@dataclass(frozen=True)
class BatchResult:
    outcome: BatchOutcome
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    skipped: int = 0
    unknown: int = 0  # rows a dead run left in flight, found when this run took the lease
    due_in: float | None = None  # ran: first deferred reader due; held: the lease expires
    send_status: SendStatus | None = None  # stopped: the send's status
    error: str | None = None  # interrupted, misconfigured: what went wrong


class _Writer:
    """Group commit: lanes queue claims and records; one flush commits them all.

    It never raises: a flush that fails even after the ledger's retries sets ``fault``, answers
    every claim "not claimed", and stops (records still queued stay unwritten, so their rows
    stay ``sending`` and a later run finds them ``unknown``: the truth as far as it is known).
    """

    def __init__(self, ledger: Ledger, lease: float) -> None:
        self.ledger = ledger
        self.heartbeat = lease / 3
        self.claims: list[tuple[int, asyncio.Future[bool]]] = []
        self.records: list[Record] = []
        self.wakeup = asyncio.Event()
        self.closed = False
        self.status: SendStatus = "sending"
        self.lease_held = True
        self.fault: Exception | None = None

    @property
    def open(self) -> bool:
        return self.fault is None and self.lease_held and self.status == "sending"

    async def claim(self, row_id: int) -> bool:
        if self.fault is not None or not self.lease_held:
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.claims.append((row_id, future))
        self.wakeup.set()
        return await future

    def record(self, record: Record) -> None:
        self.records.append(record)
        self.wakeup.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        renew_at = loop.time()
        while not (self.closed and not self.claims and not self.records):
            # With nothing to write, wake up all the same to renew the lease.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=self.heartbeat)
            self.wakeup.clear()
            claims, self.claims = self.claims, []
            records, self.records = self.records, []
            # The lease is renewed on a timer, not with every flush: a claim already checks
            # that the lease is still ours.
            renew = loop.time() >= renew_at
            if renew:
                renew_at = loop.time() + self.heartbeat
            try:
                flushed = await asyncio.to_thread(
                    self.ledger.flush, [row for row, _ in claims], records, renew=renew
                )
            except Exception as exc:
                self.fault = exc
                for _, future in claims + self.claims:
                    if not future.done():
                        future.set_result(False)
                self.claims = []
                return
            self.status = flushed.send_status
            self.lease_held = self.lease_held and flushed.lease_held  # lost for good
            # The claim itself checked that the send was sending: a row it claimed is sent
            # even if a pause landed a moment later (a row claimed but dropped here would be
            # stranded in ``sending``). After a pause, the lanes claim nothing more.
            for row_id, future in claims:
                if not future.done():
                    future.set_result(row_id in flushed.claimed)

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


async def deliver_batch(
    ledger: Ledger,
    *,
    send_id: int,
    policy: Policy,
    sender: Sender,
    throttle: Throttle,
    dkim: DkimSigner | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> BatchResult:
    """Send what the batch behind ``ledger`` still owes its readers; see the module doc.

    ``dkim`` signs each message once it is personalised. ``stop_requested`` is asked before
    every claim: once it answers True the run hands over.
    """
    try:
        lease, held_for = await asyncio.to_thread(ledger.acquire)
        if lease == "missing":
            return BatchResult("missing")
        if lease == "held":
            return BatchResult("held", due_in=held_for)
        try:
            run = _Run(ledger, send_id, policy, sender, throttle, dkim, stop_requested)
            return await run.run()
        finally:
            with contextlib.suppress(MailerError):  # it expires on its own; the result stands
                await asyncio.to_thread(ledger.release)
    except Exception as exc:  # before any lane started: nothing was claimed
        if not isinstance(exc, MailerError):
            log.error("batch of send %s failed to start", send_id, exc_info=exc)
        return BatchResult("interrupted", error=str(exc) or repr(exc))
    finally:
        ledger.close()


class _Run:
    """One run of a batch that holds its lease: the lanes, the writer, and how it ended."""

    def __init__(
        self,
        ledger: Ledger,
        send_id: int,
        policy: Policy,
        sender: Sender,
        throttle: Throttle,
        dkim: DkimSigner | None,
        stop_requested: Callable[[], bool],
    ) -> None:
        self.ledger = ledger
        self.dkim = dkim
        self.send_id = send_id
        self.policy = policy
        self.sender = sender
        self.throttle = throttle
        self.stop_requested = stop_requested
        self.writer = _Writer(ledger, policy.lease)
        self.tally: dict[Move, int] = {}
        self.rows: list[Candidate] = []
        self.fault: Exception | None = None  # stops every lane
        self.unreachable: str | None = None  # why lanes gave up on the SMTP server
        self.personalisers: dict[Variant, Personaliser] = {}
        self.started = utcnow()

    def going(self) -> bool:
        return self.fault is None and self.writer.open and not self.stop_requested()

    def record(self, record: Record) -> None:
        self.tally[record.move] = self.tally.get(record.move, 0) + 1
        self.writer.record(record)

    async def run(self) -> BatchResult:
        unknown = await asyncio.to_thread(self.ledger.reconcile_in_flight)
        status, self.started, templates = await asyncio.to_thread(self.ledger.load)
        if status != "sending":
            return BatchResult("stopped", unknown=unknown, send_status=status)
        signer = Signer(self.policy.secret_keys)
        self.personalisers = {
            variant: Personaliser(
                template,
                send_id=self.send_id,
                signer=signer,
                tracker_url=self.policy.tracker_url,
                dkim=self.dkim,
            )
            for variant, template in templates.items()
        }
        self.rows = await asyncio.to_thread(self.ledger.candidates)
        self.rows.reverse()  # lanes pop from the end: oldest rows first
        async with asyncio.TaskGroup() as group:
            group.create_task(self.writer.run())
            lanes = [group.create_task(self.lane()) for _ in range(self.policy.concurrency)]
            await asyncio.wait(lanes)
            self.writer.close()
        return await self.result(unknown)

    async def lane(self) -> None:
        """Send rows until none is left or the run stops; never raises (sets ``fault``)."""
        try:
            while self.rows and self.going():
                row = self.rows.pop()
                if row.status != "active":  # unsubscribed, bounced or complained since planning
                    self.record(Record("skipped", row, f"subscriber {row.status}"))
                    continue
                domain = row.email.rpartition("@")[2].lower()
                await self.throttle.acquire(domain)
                if not self.going():
                    self.rows.append(row)  # not claimed: it stays queued for the next run
                    return
                if await self.writer.claim(row.id) and not await self.send(row, domain):
                    return
        except Exception as exc:
            self.fail(exc)

    async def send(self, row: Candidate, domain: str) -> bool:
        """Send one claimed row and record what happened; False: this lane should stop."""
        try:
            personaliser = self.personalisers[row.variant]
            recipient = Recipient(row.subscriber_id, row.email, row.name)
            message_id = personaliser.message_id(recipient)
            message = personaliser.personalise(recipient)
            envelope = personaliser.envelope_sender(recipient)
        except Exception as exc:
            self.record(Record("requeued", row, f"not sent: {exc}"))
            self.fail(exc)
            return False
        try:
            outcome = await self.sender.send(envelope, row.email, message)
        except PermanentDeliveryError as exc:  # raised before anything was sent
            self.record(Record("requeued", row, str(exc)))
            self.fail(exc)
            return False
        except Exception as exc:
            # Whether the server has it is unknown: never resent unasked.
            self.record(Record("lost", row, f"the SMTP client failed mid-message: {exc!r}"))
            self.fail(exc)
            return False
        if outcome.unreachable:
            # Nothing was handed over: the reader keeps their attempt, the row its place.
            self.record(Record("requeued", row, outcome.reply))
            self.unreachable = outcome.reply
        else:
            self.record(_record(row, outcome, message_id, self.policy, self.started))
        if outcome.domain_backoff:
            await self.throttle.backoff(domain)
        return not outcome.unreachable

    def fail(self, exc: Exception) -> None:
        if self.fault is None:
            self.fault = exc
            if not isinstance(exc, MailerError):
                log.error(
                    "batch of send %s stopped by an unexpected error",
                    self.send_id,
                    exc_info=exc,
                )

    async def result(self, unknown: int) -> BatchResult:
        tally = self.tally
        ended = functools.partial(
            BatchResult,
            sent=tally.get("sent", 0),
            deferred=tally.get("deferred", 0),
            failed=tally.get("failed", 0),
            skipped=tally.get("skipped", 0),
            unknown=unknown + tally.get("lost", 0),
        )
        fault = self.fault or self.writer.fault
        if isinstance(fault, PermanentDeliveryError):
            return ended("misconfigured", error=str(fault))
        if fault is not None:
            return ended("interrupted", error=str(fault) or repr(fault))
        if not self.writer.lease_held:
            return ended("taken_over", error="another run took the batch over")
        if self.writer.status != "sending":
            return ended("stopped", send_status=self.writer.status)
        if self.rows and self.stop_requested():
            return ended("handed_over")
        if self.rows:  # every lane gave up on the SMTP server
            return ended("interrupted", error=self.unreachable)
        try:
            due_in = await asyncio.to_thread(self.ledger.next_due)
        except MailerError as exc:
            return ended("interrupted", error=str(exc))
        return ended("ran", due_in=due_in)


def _record(
    row: Candidate, outcome: Outcome, message_id: str, policy: Policy, started: dt.datetime
) -> Record:
    reply = f"{outcome.code} {outcome.reply}" if outcome.code else outcome.reply
    if outcome.state == "sent":
        return Record("sent", row, reply, message_id)
    if outcome.state == "failed":
        # A 5xx to RCPT or DATA is a hard bounce; a refused sender is our problem, not theirs.
        return Record("failed", row, reply, message_id, bounce=outcome.bounce)
    attempts = row.attempts + 1
    now = utcnow()
    if attempts >= policy.retry_attempts or (now - started).total_seconds() >= policy.retry_max_age:
        return Record("failed", row, f"gave up after {attempts} attempts: {reply}", message_id)
    next_at = now + dt.timedelta(seconds=policy.backoff(attempts))
    return Record("deferred", row, reply, message_id, next_attempt_at=next_at)
