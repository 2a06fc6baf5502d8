"""The ledger of one batch in SQL: its lease, its rows, and every state change a run makes.

A reader's row moves through the state machine in ``MOVES``, each move a compare-and-set on
the row's state, so a move that finds the row elsewhere (another run got there first) does
nothing. ``batch.Ledger`` is the protocol the batch runner sees; ``SqlLedger`` is this module's
implementation of it, one short transaction per call.

Database faults (a dropped connection, a terminated backend, SQLite's lock held past the busy
timeout) become ``LedgerUnavailable``. ``flush`` and ``release``, which carry what already
happened at the SMTP server, reconnect and retry for up to ``patience`` seconds first: a message
handed to the server must be recorded if the database comes back at all.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Dialect,
    Engine,
    Update,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from mailer.db.models import (
    DeliveryRow,
    SendBatchRow,
    SendRow,
    SendVariantRow,
    SubscriberRow,
    utcnow,
)
from mailer.db.prepared import Prepared
from mailer.errors import LedgerUnavailable, translated
from mailer.subscribers.manage import change_status
from mailer.vocabulary import DeliveryState, SendStatus, Variant

log = logging.getLogger(__name__)

Move = Literal[
    "claim", "sent", "deferred", "failed", "requeued", "skipped", "lost", "cancelled", "retried"
]


@dataclass(frozen=True)
class Transition:
    sources: frozenset[DeliveryState]
    target: DeliveryState


def _move(sources: str, target: DeliveryState) -> Transition:
    return Transition(frozenset(sources.split()), target)  # type: ignore[arg-type]


# queued → sending → sent | deferred | failed; deferred → sending again when due;
# queued | deferred → skipped (the reader left, or the send was cancelled);
# sending → unknown (its run died mid-message) → queued only when the author says so.
MOVES: dict[Move, Transition] = {
    "claim": _move("queued deferred", "sending"),  # committed before the message goes out
    "sent": _move("sending", "sent"),  # the server said 250
    "deferred": _move("sending", "deferred"),  # 4xx or no answer: try again later
    "failed": _move("sending", "failed"),  # 5xx, or out of attempts
    "requeued": _move("sending", "queued"),  # claimed but never handed to the server
    "skipped": _move("queued deferred", "skipped"),
    "lost": _move("sending", "unknown"),  # the server may have it: never resent unasked
    "cancelled": _move("queued deferred", "skipped"),  # `mailer sends cancel`
    "retried": _move("unknown", "queued"),  # `mailer sends retry-unknown`
}


def moved(move: Move) -> ColumnElement[bool]:
    """The rows ``move`` may apply to (by their state)."""
    # Not IN (...): an expanding parameter cannot go into the writer's executemany.
    return or_(*(DeliveryRow.state == state for state in sorted(MOVES[move].sources)))


def due(now: dt.datetime) -> ColumnElement[bool]:
    """The rows to try at ``now``: queued ones, and deferred ones whose wait is over."""
    return (DeliveryRow.state == "queued") | (
        (DeliveryRow.state == "deferred") & (DeliveryRow.next_attempt_at <= now)
    )


def unheld(now: dt.datetime) -> ColumnElement[bool]:
    """The batches no live run holds at ``now``: never leased, released, or leased by a run
    whose lease ran out (its worker died)."""
    return SendBatchRow.lease_owner.is_(None) | (SendBatchRow.lease_until < now)


@dataclass(frozen=True)
class Candidate:
    """A row the batch may try now, with what sending to its reader needs."""

    id: int
    subscriber_id: int
    variant: Variant
    attempts: int
    email: str
    name: str | None
    status: str  # the reader's status now: only ``active`` readers are mailed


@dataclass(frozen=True)
class Record:
    """The result of one row, for ``flush`` to write."""

    move: Move
    row: Candidate
    reply: str
    message_id: str | None = None
    next_attempt_at: dt.datetime | None = None
    bounce: bool = False


@dataclass(frozen=True)
class StoredTemplate:
    nonce: str
    mime: bytes


@dataclass(frozen=True)
class Flushed:
    claimed: set[int]
    send_status: SendStatus
    lease_held: bool


Lease = Literal["taken", "held", "missing"]

# The statements, built once: constructing them per flush cost more CPU than the database work
# they do. ``b_send``, ``b_batch`` and ``b_owner`` name the batch and this run's lease.
_LEASE_HELD = (
    (SendBatchRow.send_id == bindparam("b_send"))
    & (SendBatchRow.batch_no == bindparam("b_batch"))
    & (SendBatchRow.lease_owner == bindparam("b_owner"))
)
_HOLDER = select(SendBatchRow.send_id).where(_LEASE_HELD)
_SENDING = (
    select(SendRow.id)
    .where(SendRow.id == bindparam("b_send"), SendRow.status == "sending")
    .exists()
)


def _claim(count: int) -> Update:
    """Claim ``count`` rows, ``id0`` to ``id{count-1}``: each id its own parameter, so that the
    statement can be prepared (``_claim_prepared``)."""
    ids = [bindparam(f"id{i}", type_=DeliveryRow.id.type) for i in range(count)]
    return (
        update(DeliveryRow)
        .where(
            DeliveryRow.id.in_(ids),
            moved("claim"),
            # Checked in the claim itself: a row claimed just after a pause would be skipped by
            # its lane and stranded in ``sending``; and a run that lost its lease claims nothing.
            _SENDING,
            _HOLDER.exists(),
        )
        .values(
            state=MOVES["claim"].target,
            attempts=DeliveryRow.attempts + 1,
            updated_at=bindparam("now"),
        )
        .returning(DeliveryRow.id)
    )


# After a flush whose commit may or may not have happened: rows of ours already ``sending`` are
# claims that did commit (rows a dead run left ``sending`` became ``unknown`` when we took the
# lease, so every ``sending`` row of this batch is ours).
_ALREADY_CLAIMED = select(DeliveryRow.id).where(
    DeliveryRow.id.in_(bindparam("ids", expanding=True)),
    DeliveryRow.state == MOVES["claim"].target,
    _HOLDER.exists(),
)
_RENEW = update(SendBatchRow).where(_LEASE_HELD).values(lease_until=bindparam("b_until"))
_RELEASE = (
    update(SendBatchRow)
    .where(_LEASE_HELD)
    .values(lease_owner=None, lease_until=bindparam("b_until"))
)
_STATUS = select(SendRow.status).where(SendRow.id == bindparam("b_send"))
_ROW = DeliveryRow.id == bindparam("rid")


def _record(move: Move, **values: object) -> Update:
    return (
        update(DeliveryRow)
        .where(_ROW, moved(move))
        .values(
            state=MOVES[move].target,
            last_reply=bindparam("reply"),
            updated_at=bindparam("now"),
            **values,
        )
    )


_RECORD: dict[Move, Update] = {
    "sent": _record("sent", message_id=bindparam("mid"), sent_at=bindparam("now")),
    "deferred": _record(
        "deferred", message_id=bindparam("mid"), next_attempt_at=bindparam("next_at")
    ),
    "failed": _record("failed", message_id=bindparam("mid"), bounced=bindparam("bounce")),
    "skipped": _record("skipped"),
    "requeued": _record("requeued", attempts=DeliveryRow.attempts - 1),
    "lost": _record("lost"),
}


# The group commit's statements, prepared once per dialect: through ``Connection.execute`` a
# flush cost 1.5 times the CPU (``mailer.db.prepared``). A claim's size is up to one row per
# lane: as many as ``MAILER_SMTP_CONCURRENCY`` allows.
@functools.lru_cache(maxsize=1024)
def _claim_prepared(dialect: Dialect, count: int) -> Prepared:
    return Prepared.of(_claim(count), dialect)


@functools.lru_cache(maxsize=64)
def _record_prepared(dialect: Dialect, move: Move) -> Prepared:
    return Prepared.of(_RECORD[move], dialect)


@functools.lru_cache(maxsize=16)
def _status_prepared(dialect: Dialect) -> Prepared:
    return Prepared.of(_STATUS, dialect)


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _Retryable(Protocol[T_co]):
    """One transaction's work, told whether an earlier try of it failed."""

    def __call__(self, conn: Connection, *, retrying: bool) -> T_co: ...


class SqlLedger:
    """One batch's rows and lease in the database; every method is one short transaction."""

    def __init__(
        self,
        engine: Engine,
        send_id: int,
        batch_no: int,
        *,
        lease: float,
        patience: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.engine = engine
        self.send_id = send_id
        self.batch_no = batch_no
        self.lease = dt.timedelta(seconds=lease)
        self.patience = patience
        self.owner = secrets.token_hex(8)
        self._sleep = sleep
        self._conn: Connection | None = None
        self._key = {"b_send": send_id, "b_batch": batch_no, "b_owner": self.owner}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.invalidated or self._conn.closed:
            self.close()
            self._conn = self.engine.connect()
        return self._conn

    def _once(self, work: Callable[[Connection], T]) -> T:
        """``work`` in one transaction; a database fault becomes ``LedgerUnavailable``."""
        try:
            conn = self._connection()
            with conn.begin():
                return work(conn)
        except DBAPIError as exc:
            if not _is_fault(exc):
                raise
            self.close()  # the connection may be dead: the next call opens another
            raise translated(exc, "ledger database", as_=LedgerUnavailable) from exc

    def _patiently(self, work: _Retryable[T]) -> T:
        """``_once``, retried with back-off for up to ``patience`` seconds; ``work`` is told
        whether an earlier try failed (its commit may or may not have happened)."""
        deadline = time.monotonic() + self.patience
        pause = 0.1
        retrying = False
        while True:
            try:
                return self._once(functools.partial(work, retrying=retrying))
            except LedgerUnavailable as exc:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("batch %s of send %s: %s; retrying", self.batch_no, self.send_id, exc)
                self._sleep(pause)
                pause = min(pause * 2, 2.0)
                retrying = True

    def _batch(self) -> ColumnElement[bool]:
        return (SendBatchRow.send_id == self.send_id) & (SendBatchRow.batch_no == self.batch_no)

    def _rows(self) -> ColumnElement[bool]:
        return (DeliveryRow.send_id == self.send_id) & (DeliveryRow.batch_no == self.batch_no)

    def acquire(self) -> tuple[Lease, float]:
        """Take the lease: ("taken", 0), ("held", seconds another run still holds it) or
        ("missing", 0) when there is no such batch."""

        def work(conn: Connection) -> tuple[Lease, float]:
            now = utcnow()
            taken = conn.execute(
                update(SendBatchRow)
                .where(self._batch())
                .where(
                    unheld(now)
                    | (SendBatchRow.lease_owner == self.owner)  # our own earlier try committed
                )
                .values(lease_owner=self.owner, lease_until=now + self.lease)
            ).rowcount
            if taken:
                return "taken", 0.0
            found = conn.execute(select(SendBatchRow.lease_until).where(self._batch())).first()
            if found is None or found.lease_until is None:
                return "missing", 0.0
            return "held", max((found.lease_until - now).total_seconds(), 0.0)

        return self._once(work)

    def release(self) -> None:
        """Let the batch go. It counts stalled once a lease has passed, unless its next run is
        noted first (``sends.expect_run``): a worker killed between the two would otherwise
        leave deferred readers that nothing runs until the broker's visibility timeout."""
        self._patiently(
            lambda conn, *, retrying: conn.execute(
                _RELEASE, {**self._key, "b_until": utcnow() + self.lease}
            )
        )

    def reconcile_in_flight(self) -> int:
        """Rows left ``sending`` by a dead run: the server may have them, so never resend."""
        lost = (
            update(DeliveryRow)
            .where(self._rows(), moved("lost"))
            .values(
                state=MOVES["lost"].target,
                last_reply="in flight when its worker stopped; not resent "
                "(`mailer sends retry-unknown` sends it again)",
            )
        )
        return self._once(lambda conn: conn.execute(lost).rowcount)

    def load(self) -> tuple[SendStatus, dt.datetime, dict[Variant, StoredTemplate]]:
        def work(conn: Connection) -> tuple[SendStatus, dt.datetime, dict[Variant, StoredTemplate]]:
            status, started = conn.execute(
                select(SendRow.status, SendRow.started_at).where(SendRow.id == self.send_id)
            ).one()
            templates = {
                variant: StoredTemplate(nonce, mime)
                for variant, nonce, mime in conn.execute(
                    select(
                        SendVariantRow.variant, SendVariantRow.nonce, SendVariantRow.template
                    ).where(SendVariantRow.send_id == self.send_id)
                )
            }
            return status, started or utcnow(), templates

        return self._once(work)

    def candidates(self) -> list[Candidate]:
        """Rows to try now: queued ones, and deferred ones whose wait is over."""
        query = (
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
            .order_by(DeliveryRow.id)
        )

        def work(conn: Connection) -> list[Candidate]:
            return [Candidate(*row) for row in conn.execute(query.where(due(utcnow())))]

        return self._once(work)

    def next_due(self) -> float | None:
        """Seconds until this batch's first deferred reader is due; None if none is."""
        due = self._once(
            lambda conn: conn.scalar(
                select(func.min(DeliveryRow.next_attempt_at)).where(
                    self._rows(), DeliveryRow.state == "deferred"
                )
            )
        )
        return None if due is None else max((due - utcnow()).total_seconds(), 0.0)

    def flush(self, claims: Sequence[int], records: Sequence[Record], *, renew: bool) -> Flushed:
        """Write ``records``, claim ``claims`` and (if ``renew``) renew the lease, in one
        transaction, retried through database faults for up to ``patience`` seconds."""

        def work(conn: Connection, *, retrying: bool) -> Flushed:
            now = utcnow()
            self._record(conn, records, now)
            claimed: set[int] = set()
            if claims:
                ids = {f"id{i}": row_id for i, row_id in enumerate(claims)}
                claim = _claim_prepared(conn.dialect, len(claims))
                claimed = set(claim.run(conn, {**self._key, **ids, "now": now}).scalars())
                if retrying:
                    params = {**self._key, "ids": list(claims)}
                    claimed |= set(conn.scalars(_ALREADY_CLAIMED, params))
            if renew:
                held = bool(
                    conn.execute(_RENEW, {**self._key, "b_until": now + self.lease}).rowcount
                )
            else:  # a refused claim may mean the lease is gone: check rather than wait to renew
                held = len(claimed) == len(claims) or conn.scalar(_HOLDER, self._key) is not None
            status = _status_prepared(conn.dialect).run(conn, self._key).scalar()
            assert status is not None
            return Flushed(claimed, status, held)

        return self._patiently(work)

    def _record(self, conn: Connection, records: Sequence[Record], now: dt.datetime) -> None:
        by_move: dict[Move, list[Record]] = {}
        for record in records:
            by_move.setdefault(record.move, []).append(record)
        for move, group in by_move.items():
            _record_prepared(conn.dialect, move).run_many(
                conn,
                [
                    {
                        "rid": r.row.id,
                        "reply": r.reply,
                        "mid": r.message_id,
                        "next_at": r.next_attempt_at,
                        "bounce": r.bounce,
                    }
                    for r in group
                ],
                shared={"now": now},
            )
        for record in by_move.get("failed", []):
            if record.bounce:
                change_status(
                    conn,
                    record.row.subscriber_id,
                    "bounced",
                    sources=("active",),
                    send_id=self.send_id,
                    at=now,
                )


def _is_fault(exc: DBAPIError) -> bool:
    """A fault of the database or the connection to it, rather than of our SQL."""
    return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
