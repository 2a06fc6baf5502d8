"""Tracking events: buffered by the tracker's handlers, written to the database in batches.

A handler only ``put``s an ``Event`` into a ``Buffer`` and never waits on the database. A
``Flusher`` reads batches, classifies them (``classify``: it needs ``deliveries.sent_at``,
looked up once per batch), inserts them into ``tracking_events`` and commits, and only then
acknowledges them.

``RedisBuffer`` keeps events in a Redis stream read through a consumer group. Events that
arrive together (from concurrent requests) go into one stream entry: one command and one round
trip for many requests. An entry stays pending until its events are committed, so a database
outage loses nothing (the batch is retried) and a flusher that died leaves its entries to be
claimed by another (``XAUTOCLAIM``). An event's ``ingest_key`` is its entry id and position,
so writing a batch again after a crash between the commit and the acknowledgement inserts
nothing twice. ``MemoryBuffer`` does the same within one process, for running without Redis;
it loses what it holds if the process is killed outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast, get_args

import redis
import redis.asyncio
from sqlalchemy import Engine, Table, select
from sqlalchemy.orm import Session

from mailer import db
from mailer.db import dialect
from mailer.db.models import DeliveryRow, TrackingEventRow
from mailer.errors import MailerError, translated, translating
from mailer.subscribers import unsubscribe_by_id
from mailer.tracking.classify import classify

log = logging.getLogger(__name__)

STREAM = "mailer:tracking"
GROUP = "flushers"
TALLY_SUFFIX = ":written"  # a hash beside the stream: events written, by kind
ENTRY_EVENTS = 500  # at most this many events per stream entry
BATCH_ENTRIES = 20  # stream entries per database transaction
CLAIM_IDLE = 60.0  # seconds an entry may stay pending with one flusher before another takes it
SENT_AT_SLICE = 5000  # readers per delivery-time query on SQLite
MAX_USER_AGENT = 512  # longer ones are cut: the stream is memory
EventKind = Literal["open", "click", "unsubscribe"]


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    send_id: int
    subscriber_id: int
    at: float  # Unix time
    user_agent: str = ""
    ip: str | None = None
    link_no: int | None = None
    # An unsubscribe the tracker could not write when it came (the database was down):
    # the flusher makes the status change when it writes the event.
    pending_unsubscribe: bool = False

    def packed(self) -> list[Any]:
        """The event as a short JSON array (``unpacked`` reads it back)."""
        return [
            self.kind,
            self.send_id,
            self.subscriber_id,
            self.at,
            self.user_agent[:MAX_USER_AGENT],
            self.ip,
            self.link_no,
            self.pending_unsubscribe,
        ]

    @classmethod
    def unpacked(cls, fields: Sequence[Any]) -> Event:
        kind, send_id, subscriber_id, at, agent, ip, link_no, pending = fields
        if kind not in get_args(EventKind):
            raise ValueError(f"unknown event kind {kind!r}")
        return cls(
            kind=kind,
            send_id=int(send_id),
            subscriber_id=int(subscriber_id),
            at=float(at),
            user_agent=str(agent),
            ip=str(ip) if ip else None,
            link_no=int(link_no) if link_no is not None else None,
            pending_unsubscribe=bool(pending),
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """Events the buffer keeps and acknowledges together, under one key."""

    key: str
    events: tuple[Event, ...]

    def keyed(self) -> list[tuple[str, Event]]:
        """Each event with its ``ingest_key``."""
        return [(f"{self.key}/{i}", event) for i, event in enumerate(self.events)]


class Buffer(Protocol):
    """Where handlers put events and flushers take them from.

    ``put``, ``append`` and ``aclose`` run on the event loop; the rest in a flusher's thread.
    """

    def put(self, event: Event) -> None:
        """Keep ``event``, without waiting for it to be stored (it may be lost in a crash)."""

    async def append(self, event: Event) -> None:
        """Keep ``event``; once this returns it is stored. Raises ``BrokerError``."""

    async def aclose(self) -> None:
        """Store what ``put`` left queued, and release what ``put`` and ``append`` use."""

    def read(self, consumer: str, count: int, claim_idle: float) -> list[Entry]:
        """Up to ``count`` entries for ``consumer`` to write: first those it read before and
        has not acknowledged, then those another consumer left pending ``claim_idle`` seconds
        or more, then new ones. They stay in the buffer until ``ack``."""

    def ack(self, keys: Sequence[str]) -> None:
        """Forget entries that are in the database."""

    def retire(self, consumer: str) -> None:
        """Forget ``consumer`` if it holds no pending entries."""

    def backlog(self) -> int:
        """Entries waiting to be written (each holds up to ``ENTRY_EVENTS`` events). Raises
        ``BrokerError``."""

    def tally(self, by_kind: Mapping[str, int]) -> None:
        """Add written events, by kind, to the counts every tracker process shares."""

    def tallies(self) -> dict[str, int]:
        """Events written so far, by kind. Raises ``BrokerError``."""


class RedisBuffer:
    """A Redis stream and its consumer group; one per process (it holds two clients)."""

    def __init__(self, url: str, *, stream: str = STREAM, group: str = GROUP) -> None:
        self.stream = stream
        self.group = group
        self._appender = redis.asyncio.Redis.from_url(url)
        self._client = redis.Redis.from_url(url)
        self._has_group = False
        self._queue: list[tuple[Event, asyncio.Future[None] | None]] = []
        self._writer: asyncio.Task[None] | None = None

    def put(self, event: Event) -> None:
        self._queue.append((event, None))
        self._wake_writer()

    async def append(self, event: Event) -> None:
        done = asyncio.get_running_loop().create_future()
        self._queue.append((event, done))
        self._wake_writer()
        await done

    def _wake_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued())

    async def _write_queued(self) -> None:
        """Writes what is queued, one entry per round trip, while requests keep queueing."""
        while self._queue:
            batch = self._queue[:ENTRY_EVENTS]
            del self._queue[:ENTRY_EVENTS]
            events = json.dumps([event.packed() for event, _ in batch])
            try:
                await self._appender.xadd(self.stream, {"events": events})
            except redis.RedisError as exc:
                _settle(batch, translated(exc, "cannot buffer tracking events"))
            else:
                _settle(batch, None)

    async def aclose(self) -> None:
        if self._writer is not None:
            await self._writer
        await self._appender.aclose()

    def read(self, consumer: str, count: int, claim_idle: float) -> list[Entry]:
        with translating("cannot read tracking events"):
            try:
                return self._read(consumer, count, claim_idle)
            except redis.ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
                self._has_group = False  # the stream was deleted since: start again
                return self._read(consumer, count, claim_idle)

    def _read(self, consumer: str, count: int, claim_idle: float) -> list[Entry]:
        self._ensure_group()
        raw = self._own(consumer, "0", count)
        if len(raw) < count:
            claimed = self._client.xautoclaim(
                self.stream,
                self.group,
                consumer,
                min_idle_time=int(claim_idle * 1000),
                start_id="0-0",
                count=count - len(raw),
            )
            raw += claimed[1]
        if len(raw) < count:
            raw += self._own(consumer, ">", count - len(raw))
        return self._decode(raw)

    def _own(self, consumer: str, start: str, count: int) -> list[Any]:
        """Entries pending with ``consumer`` (start "0") or never delivered (start ">")."""
        # RESP2 reply: [[stream, [(id, fields), ...]]], or nothing at all.
        reply: Any = self._client.xreadgroup(
            self.group, consumer, {self.stream: start}, count=count
        )
        return list(reply[0][1]) if reply else []

    def _decode(self, raw: list[Any]) -> list[Entry]:
        entries: list[Entry] = []
        for key, fields in raw:
            try:
                events = tuple(map(Event.unpacked, json.loads(fields[b"events"])))
            except (KeyError, ValueError, TypeError):
                # Deleted meanwhile (no fields) or not ours: retrying would never succeed.
                log.warning("dropping unreadable tracking entry %s: %r", key, fields)
                self.ack([key.decode()])
                continue
            entries.append(Entry(key.decode(), events))
        return entries

    def _ensure_group(self) -> None:
        if self._has_group:
            return
        try:
            self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
        self._has_group = True

    def ack(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with (
            translating("cannot acknowledge tracking events"),
            self._client.pipeline(transaction=False) as pipe,
        ):
            pipe.xack(self.stream, self.group, *keys)
            pipe.xdel(self.stream, *keys)
            pipe.execute()

    def backlog(self) -> int:
        with translating("cannot read the tracking backlog"):
            return int(self._client.xlen(self.stream))

    def tally(self, by_kind: Mapping[str, int]) -> None:
        with (
            translating("cannot count tracking events"),
            self._client.pipeline(transaction=False) as pipe,
        ):
            for kind, count in by_kind.items():
                pipe.hincrby(self.stream + TALLY_SUFFIX, kind, count)
            pipe.execute()

    def tallies(self) -> dict[str, int]:
        with translating("cannot read tracking counts"):
            found = self._client.hgetall(self.stream + TALLY_SUFFIX)
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in found.items()}

    def retire(self, consumer: str) -> None:
        try:
            consumers = self._client.xinfo_consumers(self.stream, self.group)
            if any(c["name"].decode() == consumer and not c["pending"] for c in consumers):
                self._client.xgroup_delconsumer(self.stream, self.group, consumer)
        except redis.RedisError as exc:
            log.warning("could not retire tracking consumer %s: %s", consumer, exc)


def _settle(
    batch: Sequence[tuple[Event, asyncio.Future[None] | None]], error: Exception | None
) -> None:
    """Tell ``append`` callers how their write went; events only ``put`` are logged if lost."""
    if error is not None and (lost := sum(done is None for _, done in batch)):
        log.warning("%d tracking events lost: %s", lost, error)
    for _, done in batch:
        if done is None or done.done():  # done already: its request was cancelled
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


class MemoryBuffer:
    """The same as ``RedisBuffer`` within one process; loses its events on a hard kill."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._prefix = f"mem-{uuid.uuid4().hex[:8]}-"
        self._fresh: list[Event] = []  # put since the last read: they become entries then
        self._entries: dict[str, tuple[Event, ...]] = {}
        self._taken: dict[str, tuple[str, float]] = {}  # key → (consumer, when read)
        self._tallies: Counter[str] = Counter()

    def put(self, event: Event) -> None:
        with self._lock:
            self._fresh.append(event)

    async def append(self, event: Event) -> None:
        self.put(event)

    async def aclose(self) -> None:
        return None

    def read(self, consumer: str, count: int, claim_idle: float) -> list[Entry]:
        now = time.monotonic()
        with self._lock:
            self._seal()
            ready = [key for key in self._entries if self._ready(key, consumer, now, claim_idle)]
            # Its own pending entries first, as RedisBuffer does.
            ready.sort(key=lambda key: self._taken.get(key, ("", 0.0))[0] != consumer)
            picked = ready[:count]
            for key in picked:
                self._taken[key] = (consumer, now)
            return [Entry(key, self._entries[key]) for key in picked]

    def _seal(self) -> None:
        for start in range(0, len(self._fresh), ENTRY_EVENTS):
            chunk = tuple(self._fresh[start : start + ENTRY_EVENTS])
            self._entries[f"{self._prefix}{next(self._ids)}"] = chunk
        self._fresh = []

    def _ready(self, key: str, consumer: str, now: float, claim_idle: float) -> bool:
        owner, since = self._taken.get(key, (consumer, now))
        return owner == consumer or now - since >= claim_idle

    def ack(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)
                self._taken.pop(key, None)

    def retire(self, consumer: str) -> None:
        return None

    def backlog(self) -> int:
        with self._lock:
            self._seal()
            return len(self._entries)

    def tally(self, by_kind: Mapping[str, int]) -> None:
        with self._lock:
            self._tallies.update(by_kind)

    def tallies(self) -> dict[str, int]:
        with self._lock:
            return dict(self._tallies)


def in_memory(broker_url: str) -> bool:
    """Whether ``open_buffer`` keeps events in the process (``memory://``: no Redis)."""
    return broker_url.startswith("memory:")


def open_buffer(broker_url: str) -> RedisBuffer | MemoryBuffer:
    """A ``MemoryBuffer`` for ``memory://``, else the Redis stream on the broker."""
    return MemoryBuffer() if in_memory(broker_url) else RedisBuffer(broker_url)


def consumer_name() -> str:
    """Unique per process (and per flusher): pending entries are tracked by this name."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Flusher:
    """Moves events from a buffer to ``tracking_events``, one committed batch at a time."""

    def __init__(
        self,
        engine: Engine,
        buffer: Buffer,
        *,
        consumer: str | None = None,
        batch_size: int = BATCH_ENTRIES,
        claim_idle: float = CLAIM_IDLE,
    ) -> None:
        self.engine = engine
        self.buffer = buffer
        self.consumer = consumer or consumer_name()
        self.batch_size = batch_size
        self.claim_idle = claim_idle

    def flush(self) -> int:
        """Write what is buffered now; the number of events inserted.

        Raises ``DatabaseError`` (the entries stay buffered) or ``BrokerError``.
        """
        written = 0
        while True:
            batch = self.buffer.read(self.consumer, self.batch_size, self.claim_idle)
            written += self.write(batch) if batch else 0
            self.buffer.ack([entry.key for entry in batch])
            if batch:  # counted once acknowledged: a batch written twice counts once
                self.buffer.tally(Counter(e.kind for entry in batch for e in entry.events))
            # A short batch means it caught up: under steady traffic it would never be empty.
            if len(batch) < self.batch_size:
                return written

    def write(self, batch: Sequence[Entry]) -> int:
        """Insert a batch (entries already there are skipped); the number inserted."""
        with (
            translating(f"cannot write tracking events to {db.shown(self.engine.url)}"),
            db.session(self.engine) as session,
        ):
            return write_events(session, batch)

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Flush every ``interval`` seconds until ``stop`` is set, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            await asyncio.to_thread(self.flush_logged)
        await asyncio.to_thread(self.buffer.retire, self.consumer)

    def flush_logged(self) -> None:
        """One ``flush``; failures are logged, and retried by the next one."""
        try:
            self.flush()
        except MailerError as exc:
            log.warning("tracking events stay buffered: %s", exc)


def flush_once(engine: Engine, buffer: Buffer, *, claim_idle: float = 0.0) -> int:
    """Drain ``buffer`` into the database once; the number of events inserted.

    With ``claim_idle`` 0 it also takes entries other flushers are holding (writing one twice
    is harmless): afterwards, everything appended before the call is in the database.
    """
    flusher = Flusher(engine, buffer, claim_idle=claim_idle)
    try:
        return flusher.flush()
    finally:
        flusher.buffer.retire(flusher.consumer)


def write_events(session: Session, batch: Sequence[Entry]) -> int:
    """Insert a batch's events in ``session`` (those already there are skipped: their
    ``ingest_key`` is), making the unsubscribes they carry; the number inserted. The
    flusher's path, and inbound mail's for an unsubscribe by mail."""
    keyed = [pair for entry in batch for pair in entry.keyed()]
    sent = _sent_at(session, {(e.send_id, e.subscriber_id) for _, e in keyed})
    rows = [_row(key, event, sent) for key, event in keyed]
    inserted = _insert(session, rows)
    for _, event in keyed:
        if event.pending_unsubscribe:
            unsubscribe_by_id(session, event.subscriber_id)  # does nothing the second time
    return inserted


def _sent_at(
    session: Session, pairs: Collection[tuple[int, int]]
) -> dict[tuple[int, int], dt.datetime | None]:
    """When each (send, reader) was delivered; pairs without a ledger row are left out."""
    readers: dict[int, list[int]] = {}
    for send_id, subscriber_id in pairs:
        readers.setdefault(send_id, []).append(subscriber_id)
    found: dict[tuple[int, int], dt.datetime | None] = {}
    if dialect.is_postgresql(session):
        cursor = dialect.driver_cursor(session.connection())
        for send_id, ids in readers.items():  # an array: one parameter however many readers
            cursor.execute(_SENT_AT, (send_id, ids))
            found.update(((send_id, reader), at) for reader, at in cursor)
        return found
    # In slices: SQLite takes at most 32,766 parameters.
    for send_id, ids in readers.items():
        for start in range(0, len(ids), SENT_AT_SLICE):
            query = select(DeliveryRow.subscriber_id, DeliveryRow.sent_at).where(
                DeliveryRow.send_id == send_id,
                DeliveryRow.subscriber_id.in_(ids[start : start + SENT_AT_SLICE]),
            )
            found.update(((send_id, reader), at) for reader, at in session.execute(query))
    return found


_SENT_AT = (
    "SELECT subscriber_id, sent_at FROM deliveries WHERE send_id = %s AND subscriber_id = ANY(%s)"
)


def _row(
    key: str, event: Event, sent: Mapping[tuple[int, int], dt.datetime | None]
) -> dict[str, Any]:
    pair = (event.send_id, event.subscriber_id)
    sent_at = sent.get(pair)
    since = event.at - sent_at.timestamp() if sent_at else None
    # No ledger row: it went with the reader (erased), so keep no IP or user agent of theirs.
    known = pair in sent
    return {
        "kind": event.kind,
        "send_id": event.send_id,
        "subscriber_id": event.subscriber_id,
        "link_no": event.link_no,
        "classification": classify(event.kind, event.user_agent, event.ip, since),
        "user_agent": (event.user_agent or None) if known else None,
        "ip": event.ip if known else None,
        "at": dt.datetime.fromtimestamp(event.at, dt.UTC),
        "ingest_key": key,
    }


_COLUMNS = (
    "kind",
    "send_id",
    "subscriber_id",
    "link_no",
    "classification",
    "user_agent",
    "ip",
    "at",
    "ingest_key",
)
# One array per column: psycopg sends nine arrays as fast as one row, where an INSERT with
# thousands of VALUES spent most of a flush being parsed for its placeholders.
_UNNEST = (
    f"INSERT INTO tracking_events ({', '.join(_COLUMNS)}) "
    "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::int[], %s::text[], "
    "%s::text[], %s::text[], %s::timestamptz[], %s::text[]) "
    "ON CONFLICT (ingest_key) DO NOTHING"
)


def _insert(session: Session, rows: Sequence[Mapping[str, Any]]) -> int:
    """INSERT ... ON CONFLICT (ingest_key) DO NOTHING; the number of rows inserted."""
    if dialect.is_postgresql(session):
        cursor = dialect.driver_cursor(session.connection())
        cursor.execute(_UNNEST, [[row[c] for row in rows] for c in _COLUMNS])
        return int(cursor.rowcount)
    # The table, not the ORM entity: a Core executemany, without the ORM's per-row work.
    table = cast(Table, TrackingEventRow.__table__)
    insert = dialect.insert(session, table).on_conflict_do_nothing(index_elements=["ingest_key"])
    return len(session.execute(insert.returning(table.c.id), rows).all())
