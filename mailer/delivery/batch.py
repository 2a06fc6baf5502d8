"""Deliver one batch of a send: claim, personalise, send, record: each reader exactly once.

How exactly-once holds:

- A batch is leased to one run at a time (``send_batches``), renewed while it works. A second
  copy of the task (redelivered, or enqueued again by resume or the reconciler) finds the lease
  held and is told to come back when it expires.
- A reader's row goes ``queued → sending`` by compare-and-set, committed *before* the message
  is handed to SMTP, and ``sending → sent | deferred | failed`` after the server answered.
- A run that takes a lease and finds rows still ``sending`` knows their worker died with the
  message in flight: the server may or may not have it, so they become ``unknown`` and are not
  resent unless the author says so (``mailer sends retry-unknown``).

Claims and results go through one writer that commits them in groups (group commit), in a
thread, while the connections keep sending: the ledger costs a few commits per batch rather
than two per reader, and a lane never waits for more than its own claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Update,
    bindparam,
    func,
    insert,
    select,
    update,
)

from mailer.config import Settings
from mailer.db.models import (
    DeliveryRow,
    SendBatchRow,
    SendRow,
    SendStatus,
    SendVariantRow,
    SubscriberEventRow,
    SubscriberRow,
    Variant,
    utcnow,
)
from mailer.delivery.personalise import Personaliser, Recipient
from mailer.delivery.smtp import Outcome
from mailer.delivery.throttle import Throttle
from mailer.errors import PermanentDeliveryError
from mailer.tracking.tokens import Signer

MAX_BACKOFF_S = 3600.0


class Sender(Protocol):
    async def send(self, envelope_from: str, recipient: str, message: bytes) -> Outcome: ...


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


@dataclass(frozen=True)
class BatchResult:
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    skipped: int = 0
    unknown: int = 0  # rows a dead worker left in flight, found when this run took the lease
    retry_in: float | None = None  # seconds until deferred readers of this batch are due
    held_for: float | None = None  # another run holds the batch this long: come back then
    stopped: SendStatus | None = None  # the send was not sending (paused, cancelled, failed...)


@dataclass(frozen=True)
class StoredTemplate:
    nonce: str
    mime: bytes


@dataclass(frozen=True)
class _Candidate:
    id: int
    subscriber_id: int
    variant: Variant
    attempts: int
    email: str
    name: str | None
    status: str


ResultKind = Literal["sent", "deferred", "failed", "skipped", "requeued"]


@dataclass(frozen=True)
class _Result:
    kind: ResultKind
    row: _Candidate
    reply: str
    message_id: str | None = None
    next_attempt_at: dt.datetime | None = None
    bounce: bool = False


class LeaseLost(Exception):
    """Another run took this batch over: stop sending at once."""


# The writer's statements, built once: constructing them per flush cost more CPU than the
# database work they do. ``b_send``, ``b_batch`` and ``b_owner`` name the batch and its lease.
_LEASE_HELD = (
    (SendBatchRow.send_id == bindparam("b_send"))
    & (SendBatchRow.batch_no == bindparam("b_batch"))
    & (SendBatchRow.lease_owner == bindparam("b_owner"))
)
_CLAIM = (
    update(DeliveryRow)
    .where(
        DeliveryRow.id.in_(bindparam("ids", expanding=True)),
        DeliveryRow.state.in_(("queued", "deferred")),
        # Checked in the claim itself: a row claimed just after a pause would be skipped by its
        # lane and stranded in ``sending``; and a run that lost its lease claims nothing.
        select(SendRow.id)
        .where(SendRow.id == bindparam("b_send"), SendRow.status == "sending")
        .exists(),
        select(SendBatchRow.send_id).where(_LEASE_HELD).exists(),
    )
    .values(state="sending", attempts=DeliveryRow.attempts + 1)
    .returning(DeliveryRow.id)
)
_RENEW = update(SendBatchRow).where(_LEASE_HELD).values(lease_until=bindparam("b_until"))
_RELEASE = update(SendBatchRow).where(_LEASE_HELD).values(lease_owner=None, lease_until=None)
_STATUS = select(SendRow.status).where(SendRow.id == bindparam("b_send"))
_CLAIMED_ROW = (DeliveryRow.id == bindparam("rid")) & (DeliveryRow.state == "sending")
_UNCLAIMED_ROW = (DeliveryRow.id == bindparam("rid")) & DeliveryRow.state.in_(
    ("queued", "deferred")
)
_RECORD: dict[ResultKind, Update] = {
    "sent": update(DeliveryRow)
    .where(_CLAIMED_ROW)
    .values(
        state="sent",
        last_reply=bindparam("reply"),
        message_id=bindparam("mid"),
        sent_at=bindparam("now"),
    ),
    "deferred": update(DeliveryRow)
    .where(_CLAIMED_ROW)
    .values(
        state="deferred",
        last_reply=bindparam("reply"),
        message_id=bindparam("mid"),
        next_attempt_at=bindparam("next_at"),
    ),
    "failed": update(DeliveryRow)
    .where(_CLAIMED_ROW)
    .values(
        state="failed",
        last_reply=bindparam("reply"),
        message_id=bindparam("mid"),
        bounced=bindparam("bounce"),
    ),
    "skipped": update(DeliveryRow)
    .where(_UNCLAIMED_ROW)
    .values(state="skipped", last_reply=bindparam("reply")),
    # Never handed to the server (the SMTP configuration failed): as if never claimed.
    "requeued": update(DeliveryRow)
    .where(_CLAIMED_ROW)
    .values(state="queued", attempts=DeliveryRow.attempts - 1),
}


class _Ledger:
    """The batch's rows in the database; every method is one short transaction."""

    def __init__(self, engine: Engine, send_id: int, batch_no: int, lease: float) -> None:
        self.engine = engine
        self.send_id = send_id
        self.batch_no = batch_no
        self.lease = dt.timedelta(seconds=lease)
        self.owner = secrets.token_hex(8)
        self.conn: Connection = engine.connect()

    def close(self) -> None:
        self.conn.close()

    def _batch(self) -> ColumnElement[bool]:
        return (SendBatchRow.send_id == self.send_id) & (SendBatchRow.batch_no == self.batch_no)

    def _lease(self) -> dict[str, object]:
        """The parameters of the statements about this run's lease (``_LEASE_HELD``)."""
        return {"b_send": self.send_id, "b_batch": self.batch_no, "b_owner": self.owner}

    def _rows(self) -> ColumnElement[bool]:
        return (DeliveryRow.send_id == self.send_id) & (DeliveryRow.batch_no == self.batch_no)

    def acquire(self) -> float | None:
        """Take the lease; None if taken, else how long another live run still holds it."""
        now = utcnow()
        with self.conn.begin():
            taken = self.conn.execute(
                update(SendBatchRow)
                .where(self._batch())
                .where(SendBatchRow.lease_owner.is_(None) | (SendBatchRow.lease_until < now))
                .values(lease_owner=self.owner, lease_until=now + self.lease)
            ).rowcount
            if taken:
                return None
            until = self.conn.scalar(select(SendBatchRow.lease_until).where(self._batch()))
        if until is None:  # no such batch: nothing to do, ever
            return 0.0
        return max((until - now).total_seconds(), 0.0)

    def release(self) -> None:
        with self.conn.begin():
            self.conn.execute(_RELEASE, self._lease())

    def reconcile_in_flight(self) -> int:
        """Rows left ``sending`` by a dead run: the server may have them, so never resend."""
        with self.conn.begin():
            return self.conn.execute(
                update(DeliveryRow)
                .where(self._rows(), DeliveryRow.state == "sending")
                .values(
                    state="unknown",
                    last_reply="in flight when its worker stopped; not resent "
                    "(`mailer sends retry-unknown` sends it again)",
                )
            ).rowcount

    def load(self) -> tuple[SendStatus, dt.datetime, dict[Variant, StoredTemplate]]:
        with self.conn.begin():
            status, started = self.conn.execute(
                select(SendRow.status, SendRow.started_at).where(SendRow.id == self.send_id)
            ).one()
            templates = {
                variant: StoredTemplate(nonce, mime)
                for variant, nonce, mime in self.conn.execute(
                    select(
                        SendVariantRow.variant, SendVariantRow.nonce, SendVariantRow.template
                    ).where(SendVariantRow.send_id == self.send_id)
                )
            }
        return status, started or utcnow(), templates

    def candidates(self) -> list[_Candidate]:
        """Rows to try now: queued ones, and deferred ones whose wait is over."""
        now = utcnow()
        with self.conn.begin():
            rows = self.conn.execute(
                select(
                    DeliveryRow.id,
                    DeliveryRow.subscriber_id,
                    DeliveryRow.variant,
                    DeliveryRow.attempts,
                    SubscriberRow.email,
                    SubscriberRow.name,
                    SubscriberRow.status,
                )
                .join(SubscriberRow, SubscriberRow.id == DeliveryRow.subscriber_id)
                .where(self._rows())
                .where(
                    (DeliveryRow.state == "queued")
                    | ((DeliveryRow.state == "deferred") & (DeliveryRow.next_attempt_at <= now))
                )
                .order_by(DeliveryRow.id)
            ).all()
        return [_Candidate(*row) for row in rows]

    def next_due(self) -> float | None:
        with self.conn.begin():
            due = self.conn.scalar(
                select(func.min(DeliveryRow.next_attempt_at)).where(
                    self._rows(),
                    DeliveryRow.state == "deferred",
                )
            )
        if due is None:
            return None
        return max((due - utcnow()).total_seconds(), 0.0)

    def flush(
        self, claims: Sequence[int], results: Sequence[_Result], *, heartbeat: bool
    ) -> tuple[set[int], SendStatus]:
        """Record results, claim rows and (on heartbeats) renew the lease, in one transaction."""
        now = utcnow()
        key = self._lease()
        with self.conn.begin():
            self._record(results, now)
            claimed: set[int] = set()
            if claims:
                claimed = set(self.conn.scalars(_CLAIM, {**key, "ids": list(claims)}))
            if (
                heartbeat
                and not self.conn.execute(_RENEW, {**key, "b_until": now + self.lease}).rowcount
            ):
                raise LeaseLost(f"batch {self.batch_no} of send {self.send_id}")
            status = self.conn.scalar(_STATUS, key)
        assert status is not None
        return claimed, status

    def _record(self, results: Sequence[_Result], now: dt.datetime) -> None:
        by_kind: dict[ResultKind, list[_Result]] = {}
        for result in results:
            by_kind.setdefault(result.kind, []).append(result)
        for kind, group in by_kind.items():
            self.conn.execute(
                _RECORD[kind],
                [
                    {
                        "rid": r.row.id,
                        "reply": r.reply,
                        "mid": r.message_id,
                        "next_at": r.next_attempt_at,
                        "bounce": r.bounce,
                        "now": now,
                    }
                    for r in group
                ],
            )
        for result in by_kind.get("failed", []):
            if result.bounce:
                self._bounce(result.row.subscriber_id, now)

    def _bounce(self, subscriber_id: int, now: dt.datetime) -> None:
        changed = self.conn.execute(
            update(SubscriberRow)
            .where(SubscriberRow.id == subscriber_id, SubscriberRow.status == "active")
            .values(status="bounced", updated_at=now)
        ).rowcount
        if changed:
            self.conn.execute(
                insert(SubscriberEventRow).values(
                    subscriber_id=subscriber_id,
                    kind="status_changed",
                    old="active",
                    new="bounced",
                    at=now,
                    send_id=self.send_id,
                )
            )


class _Writer:
    """Group commit: lanes queue claims and results; one flush commits them all."""

    def __init__(self, ledger: _Ledger, lease: float) -> None:
        self.ledger = ledger
        self.heartbeat = lease / 3
        self.claims: list[tuple[int, asyncio.Future[bool]]] = []
        self.results: list[_Result] = []
        self.wakeup = asyncio.Event()
        self.closed = False
        self.status: SendStatus = "sending"

    async def claim(self, row_id: int) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.claims.append((row_id, future))
        self.wakeup.set()
        return await future

    def record(self, result: _Result) -> None:
        self.results.append(result)
        self.wakeup.set()

    async def run(self) -> None:
        flushing: list[tuple[int, asyncio.Future[bool]]] = []
        loop = asyncio.get_running_loop()
        renew_at = loop.time()
        try:
            while not (self.closed and not self.claims and not self.results):
                # With nothing to write, wake up all the same to renew the lease.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), timeout=self.heartbeat)
                self.wakeup.clear()
                flushing, self.claims = self.claims, []
                results, self.results = self.results, []
                # The lease is renewed on a timer, not with every flush: a claim already checks
                # that the lease is still ours.
                heartbeat = loop.time() >= renew_at
                if heartbeat:
                    renew_at = loop.time() + self.heartbeat
                claimed, self.status = await asyncio.to_thread(
                    self.ledger.flush, [c for c, _ in flushing], results, heartbeat=heartbeat
                )
                # The claim itself checked that the send was sending: a row it claimed is sent
                # even if a pause landed a moment later (a row claimed but dropped here would be
                # stranded in ``sending``). After a pause, the lanes claim nothing more.
                for row_id, future in flushing:
                    future.set_result(row_id in claimed)
        except BaseException as exc:
            for _, future in flushing + self.claims:
                if not future.done():
                    future.set_exception(exc)
            raise

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


async def deliver_batch(
    engine: Engine,
    send_id: int,
    batch_no: int,
    *,
    policy: Policy,
    sender: Sender,
    throttle: Throttle,
) -> BatchResult:
    """Send what batch ``batch_no`` of send ``send_id`` still owes its readers."""
    ledger = _Ledger(engine, send_id, batch_no, policy.lease)
    try:
        held = await asyncio.to_thread(ledger.acquire)
        if held is not None:
            return BatchResult(held_for=held)
        try:
            return await _run(ledger, policy, sender, throttle)
        finally:
            await asyncio.to_thread(ledger.release)
    finally:
        ledger.close()


async def _run(ledger: _Ledger, policy: Policy, sender: Sender, throttle: Throttle) -> BatchResult:
    unknown = await asyncio.to_thread(ledger.reconcile_in_flight)
    status, started, templates = await asyncio.to_thread(ledger.load)
    if status != "sending":
        return BatchResult(unknown=unknown, stopped=status)
    signer = Signer(policy.secret_keys)
    personalisers = {
        variant: Personaliser(
            template, send_id=ledger.send_id, signer=signer, tracker_url=policy.tracker_url
        )
        for variant, template in templates.items()
    }
    rows = await asyncio.to_thread(ledger.candidates)
    rows.reverse()  # lanes pop from the end: oldest rows first
    writer = _Writer(ledger, policy.lease)
    tally: dict[ResultKind, int] = {}
    config_error: list[PermanentDeliveryError] = []

    def record(result: _Result) -> None:
        tally[result.kind] = tally.get(result.kind, 0) + 1
        writer.record(result)

    async def lane() -> None:
        while rows and writer.status == "sending" and not config_error:
            row = rows.pop()
            if row.status != "active":  # unsubscribed, bounced or complained since planning
                record(_Result("skipped", row, f"subscriber {row.status}"))
                continue
            domain = row.email.rpartition("@")[2].lower()
            await throttle.acquire(domain)
            if not await writer.claim(row.id):
                continue
            personaliser = personalisers[row.variant]
            recipient = Recipient(row.subscriber_id, row.email, row.name)
            message_id = personaliser.message_id(recipient)
            try:
                outcome = await sender.send(
                    personaliser.envelope_sender(recipient),
                    row.email,
                    personaliser.personalise(recipient),
                )
            except PermanentDeliveryError as exc:
                config_error.append(exc)
                record(_Result("requeued", row, str(exc)))
                return
            if outcome.domain_backoff:
                await throttle.backoff(domain)
            record(_result(row, outcome, message_id, policy, started))

    writing = asyncio.create_task(writer.run())
    try:
        lanes = [asyncio.create_task(lane()) for _ in range(policy.concurrency)]
        await asyncio.gather(*lanes)
    finally:
        writer.close()
        await writing
    if config_error:
        raise config_error[0]
    retry_in = await asyncio.to_thread(ledger.next_due)
    return BatchResult(
        sent=tally.get("sent", 0),
        deferred=tally.get("deferred", 0),
        failed=tally.get("failed", 0),
        skipped=tally.get("skipped", 0),
        unknown=unknown,
        retry_in=retry_in,
        stopped=None if writer.status == "sending" else writer.status,
    )


def _result(
    row: _Candidate, outcome: Outcome, message_id: str, policy: Policy, started: dt.datetime
) -> _Result:
    reply = f"{outcome.code} {outcome.reply}" if outcome.code else outcome.reply
    if outcome.state == "sent":
        return _Result("sent", row, reply, message_id)
    if outcome.state == "failed":
        # A 5xx to RCPT or DATA is a hard bounce; a refused sender is our problem, not theirs.
        return _Result("failed", row, reply, message_id, bounce=outcome.bounce)
    attempts = row.attempts + 1
    now = utcnow()
    if attempts >= policy.retry_attempts or (now - started).total_seconds() >= policy.retry_max_age:
        return _Result("failed", row, f"gave up after {attempts} attempts: {reply}", message_id)
    next_at = now + dt.timedelta(seconds=policy.backoff(attempts))
    return _Result("deferred", row, reply, message_id, next_attempt_at=next_at)
