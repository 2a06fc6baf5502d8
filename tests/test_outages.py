"""Proven under real outages: a send of 2,000 readers through a real Celery worker, a real SMTP
server and real services, with a fault injected mid-send, must end ``done`` on its own.

Each scenario sends to ``READERS`` readers (spread over ``DOMAINS`` domains, as a real list is:
a 421 backs off only the domains it came from), starts the fault once ``FAULT_AT`` messages
arrived, then waits, bounded, for the send to become ``done`` with no manual step, and checks:

- every reader got exactly one message (RCPT TO counted per address at the server; a message
  cut off mid-DATA is never recorded);
- the ledger agrees: every row ``sent`` (no ``unknown``, ``failed``, ``skipped``, nothing left
  ``queued``, ``sending`` or ``deferred``), and the sent rows are the addresses received;
- the send's status is ``done``.

A send that gets stuck fails after ``STALL_S`` seconds without progress (or its deadline) with
the ledger's and the server's counts and the worker's errors. Each test uses a broker of its
own (a ``redis-server`` on a free port, without persistence) and the worker's default number
of processes. Only the broker scenario runs ``celery beat``: it is the one whose recovery
needs the periodic reconciler (the worker lives on, so no start-up reconcile comes to help).
Each scenario runs on one backend (the broker's on both) to keep the suite short; the
PostgreSQL ones are marked ``postgres``. Select them with ``-m outage``. Scenarios 9 to 13
and 15 break things at one chosen moment: they send to six readers (``small``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
import redis
from celery import Celery
from helpers import BIN, free_port, run_mailer
from smtp_servers import Outage, Recorder, Slow, SmtpServer, greylist, serve, wait_until
from sqlalchemy import Engine, make_url, select, text
from sqlalchemy.exc import OperationalError
from workers import Processes, RedisServer, add_readers, environment, kill, start_beat, start_worker

from mailer import db, sends
from mailer.db.models import DeliveryRow, SendBatchRow, SubscriberRow
from mailer.vocabulary import DeliveryState

pytestmark = [pytest.mark.outage, pytest.mark.subprocess]

READERS = 2000
DOMAINS = 100
FAULT_AT = 300  # messages arrived before the fault starts
STALL_S = 45.0  # longer than beat's 30 s reconcile period and the longest back-off wait here
SLUG = "the-outage"
POST = f"---\ntitle: The Outage\nslug: {SLUG}\n---\n\nHello {{{{ name }}}}.\n"
POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)

# Short enough to keep each test near a minute. The retry budget is the default's shape (6
# attempts from a 1 m back-off: 31 min of patience) scaled to the 1 s back-off: 10 attempts
# give 8.5 min, far more than any outage here, where 6 would give up after 31 s, about as
# long as the 421 outage: a reader would fail by the retry policy, not by a defect.
SETTINGS = {
    "MAILER_BATCH_SIZE": "200",
    "MAILER_BATCH_LEASE": "5s",
    "MAILER_RETRY_BACKOFF": "1s",
    "MAILER_RETRY_ATTEMPTS": "10",
    "MAILER_SMTP_CONNECT_TIMEOUT": "5s",
    "MAILER_SMTP_COMMAND_TIMEOUT": "10s",
    "MAILER_SMTP_DATA_TIMEOUT": "10s",
}


@dataclass
class Rig:
    """The services of one scenario, and what it needs to start, fault and check them."""

    engine: Engine
    db_url: str
    tmp_path: Path
    processes: Processes
    broker: RedisServer
    server: SmtpServer
    handler: Outage
    env: dict[str, str]
    addresses: list[str]
    send_id: int = 0
    logs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def worker(self, name: str = "worker") -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"{name}.log"
        self.logs.append(log)
        return start_worker(self.processes, self.env, log, name=name)

    def beat(self) -> subprocess.Popen[bytes]:
        log = self.tmp_path / "beat.log"
        self.logs.append(log)
        return start_beat(self.processes, self.env, log)

    def send(self) -> None:
        out = run_mailer(self.env, self.tmp_path, "send", SLUG, "--segment", "all", "--yes")
        self.send_id = int(out)

    def received(self) -> int:
        return len(self.handler.messages)

    def mid_send(self, count: int = FAULT_AT) -> int:
        """Wait for ``count`` messages to have arrived; check the send is not over yet."""
        try:
            wait_until(lambda: self.received() >= count, timeout=60)
        except AssertionError:
            raise AssertionError(self.report(f"{count} messages never arrived")) from None
        arrived = self.received()
        assert arrived < READERS - 200, self.report(f"the fault came too late ({arrived} in)")
        self.notes.append(f"fault at {arrived} messages")
        return arrived

    def counts(self) -> tuple[str, dict[str, int]]:
        """The send's status and its ledger's counts by state (the zeros left out)."""
        for _ in range(20):  # the test's own connection may meet the fault too
            try:
                with db.session(self.engine) as session:
                    info = sends.show(session, self.send_id)
                return info.status, {k: v for k, v in info.counts.items() if v}
            except OperationalError:
                time.sleep(0.5)
        raise AssertionError("the test could not read the ledger")

    def wait_done(self, timeout: float = 90.0) -> None:
        """Wait until the send is done; fail on the deadline or ``STALL_S`` without progress."""
        start = last_change = time.monotonic()
        last: object = None
        while True:
            status, counts = self.counts()
            if status == "done":
                self.notes.append(f"done {time.monotonic() - start:.0f} s after the wait began")
                return
            now = time.monotonic()
            progress = (status, counts, self.received())
            if progress != last:
                last, last_change = progress, now
            if now - last_change > STALL_S:
                raise AssertionError(self.report(f"stuck: no progress for {STALL_S:g} s"))
            if now - start > timeout:
                raise AssertionError(self.report(f"not done within {timeout:g} s"))
            time.sleep(0.5)

    def report(self, what: str) -> str:
        status, counts = self.counts() if self.send_id else ("not created", {})
        received = Counter(m.rcpt_tos[0] for m in self.handler.messages)
        twice = sum(1 for n in received.values() if n > 1)
        lines = [
            f"{what}: send {self.send_id} is {status}; ledger {counts}; the server received "
            f"{sum(received.values())} messages for {len(received)} of {READERS} readers "
            f"({twice} mailed more than once); " + "; ".join(self.notes),
        ]
        for log in self.logs:
            errors, warnings = _trouble(log)
            lines.append(f"--- {log.name}: {len(errors)} errors, the last 10 ---")
            lines += errors[-10:]
            lines.append(f"--- {log.name}: {len(warnings)} warnings, the last 10 ---")
            lines += warnings[-10:]
        return "\n".join(lines)

    def check(self) -> None:
        """Every reader mailed exactly once, and the ledger says so: the send is done."""
        status, counts = self.counts()
        received = Counter(m.rcpt_tos[0] for m in self.handler.messages)
        with db.session(self.engine) as session:
            states = dict(
                session.execute(
                    select(SubscriberRow.email_key, DeliveryRow.state)
                    .join(SubscriberRow, SubscriberRow.id == DeliveryRow.subscriber_id)
                    .where(DeliveryRow.send_id == self.send_id)
                ).all()
            )
        sent = {a for a, s in states.items() if s == "sent"}
        twice = sorted(a for a, n in received.items() if n > 1)
        never = set(self.addresses) - set(received)
        assert status == "done", self.report(f"the send is {status}")
        assert counts == {"sent": READERS}, self.report("not every ledger row is sent")
        assert not twice, self.report(f"{len(twice)} readers mailed twice, e.g. {twice[:3]}")
        assert not never, self.report(f"{len(never)} readers never mailed")
        assert sent == set(received), self.report("the ledger's sent rows are not the received")
        print("; ".join(self.notes))  # shown by pytest -rA: when the fault came, how long


@contextlib.contextmanager
def rig(
    engine: Engine, db_url: str, tmp_path: Path, delay: float, **settings: str
) -> Iterator[Rig]:
    """The readers, a post, a broker, an SMTP server answering each message after ``delay``
    seconds; every process the block starts is killed when it ends, whatever happens."""
    addresses = add_readers(engine, READERS, domains=DOMAINS)
    (tmp_path / "post.md").write_text(POST)
    handler = Outage(delay)
    with (
        RedisServer(tmp_path / "redis") as broker,
        serve(handler) as server,
        Processes() as processes,
    ):
        env = environment(db_url, broker.url, server.port, **(SETTINGS | settings))
        run_mailer(env, tmp_path, "posts", "add", "post.md")
        yield Rig(engine, db_url, tmp_path, processes, broker, server, handler, env, addresses)


def _trouble(log: Path) -> tuple[list[str], list[str]]:
    """A worker log's error lines (tracebacks' last lines too) and its warning lines."""
    if not log.exists():
        return [], []
    lines = log.read_text(errors="replace").splitlines()
    error = re.compile(r"ERROR|CRITICAL|^\w+(\.\w+)*(Error|Exception): ")
    return (
        [line for line in lines if error.search(line)],
        [line for line in lines if "WARNING" in line],
    )


@pytest.mark.parametrize("db_url", [POSTGRES], indirect=True)
def test_smtp_server_down_20s(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """1. The SMTP server stops listening (open connections dropped) for 20 s, then is back."""
    with rig(engine, db_url, tmp_path, delay=0.1) as r:
        r.worker()
        r.send()
        r.mid_send()
        r.server.down()
        time.sleep(20)
        r.server.up()
        r.wait_done()
        r.check()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_smtp_421_to_everything_30s(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """2. For 30 s every SMTP command (EHLO, MAIL, RCPT, DATA, ...) gets 421 and a hang-up."""
    with rig(engine, db_url, tmp_path, delay=0.1) as r:
        r.worker()
        r.send()
        r.mid_send()
        r.handler.refuse_all(30)
        time.sleep(30)
        assert r.handler.refused > 0, "no command was refused: the fault proved nothing"
        r.notes.append(f"{r.handler.refused} commands refused")
        r.wait_done()
        r.check()


@pytest.mark.parametrize("db_url", [POSTGRES], indirect=True)
def test_connection_closed_mid_data(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """3. For 15 s every other message is cut off mid-DATA: 354, a few lines, then hang-up."""
    with rig(engine, db_url, tmp_path, delay=0.1) as r:
        r.worker()
        r.send()
        r.mid_send()
        r.handler.cut_data(15, every=2)
        time.sleep(15)
        assert r.handler.cut > 0, "no message was cut off: the fault proved nothing"
        r.notes.append(f"{r.handler.cut} messages cut off mid-DATA")
        r.wait_done()
        r.check()


@pytest.mark.parametrize(
    ("db_url", "rate_limit"),
    [pytest.param("sqlite", "5000/s", id="sqlite-rate-limited"), (POSTGRES, "0")],
    indirect=["db_url"],
)
def test_broker_redis_restarted_empty(
    engine: Engine, db_url: str, rate_limit: str, tmp_path: Path
) -> None:
    """4. The broker's Redis (no persistence: its queued tasks are lost) is down for 20 s.

    Runs beat, as a deployment does: the worker lives on, so no start-up reconcile helps, and
    only a periodic reconcile can re-enqueue the batches whose task messages went down with
    Redis (beat's, every 30 s, in the original design; each worker's own timer since main's
    50a0166). On both backends: this was the worst of the reported outages. On SQLite with a
    rate limit, whose shared state is in the same Redis: every running batch loses it too.
    """
    with rig(engine, db_url, tmp_path, delay=0.1, MAILER_RATE_LIMIT=rate_limit) as r:
        r.worker()
        r.beat()
        r.send()
        r.mid_send()
        r.broker.stop()
        time.sleep(20)
        r.broker.start()
        r.wait_done(timeout=120)
        r.check()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_broker_frozen_30s(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """14. The broker stops answering for 30 s but keeps every connection open and every key
    (SIGSTOP, as behind a network partition or a stalled VM), then answers again.

    Rate-limited, so every message waits on the throttle's state in that Redis; with beat, whose
    ticks fail meanwhile. Longer than any timeout here (the throttle's 5 s, the lease's 5 s):
    the running batches must let go within seconds, not hang on Redis while it is away.
    """
    with rig(engine, db_url, tmp_path, delay=0.1, MAILER_RATE_LIMIT="5000/s") as r:
        r.worker()
        r.beat()
        r.send()
        arrived = r.mid_send()
        r.broker.freeze()
        time.sleep(15)
        with db.session(r.engine) as session:
            held = session.scalars(
                select(SendBatchRow.batch_no).where(
                    SendBatchRow.send_id == r.send_id, SendBatchRow.lease_owner.is_not(None)
                )
            ).all()
        assert not held, r.report(f"batches {held} still held 15 s into the freeze")
        time.sleep(15)
        r.notes.append(f"{r.received() - arrived} arrived while it was frozen")
        assert r.counts()[0] != "done", "the send ended while frozen: the fault proved nothing"
        r.broker.thaw()
        r.wait_done(timeout=120)
        r.check()


@pytest.mark.parametrize("db_url", [POSTGRES], indirect=True)
def test_postgres_backends_terminated(
    engine: Engine, db_url: str, pg_admin: Engine, tmp_path: Path
) -> None:
    """5. Every connection to the send's database is terminated, three times, 2 s apart."""
    name = make_url(db_url).database
    terminate = text(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = :name AND pid <> pg_backend_pid()"
    )
    with rig(engine, db_url, tmp_path, delay=0.1) as r:
        r.worker()
        r.send()
        r.mid_send()
        for _ in range(3):
            with pg_admin.connect() as conn:
                terminated = conn.scalar(terminate, {"name": name})
            r.notes.append(f"{terminated} backends terminated at {r.received()} messages")
            time.sleep(2)
        r.wait_done()
        r.check()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_write_lock_held_8s(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """6. Another process holds SQLite's write lock for 8 s (the busy timeout is 5 s)."""
    path = make_url(db_url).database
    hold = (
        "import sqlite3, sys, time\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "conn.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(8)\n"
        "conn.execute('COMMIT')\n"
    )
    with rig(engine, db_url, tmp_path, delay=0.1) as r:
        r.worker()
        r.send()
        r.mid_send()
        log = tmp_path / "lock.log"
        locker = r.processes.start([sys.executable, "-c", hold, str(path)], dict(os.environ), log)
        wait_until(lambda: "locked" in log.read_text(), timeout=10)
        assert locker.wait(timeout=20) == 0, log.read_text()
        r.notes.append(f"lock released at {r.received()} messages")
        r.wait_done()
        r.check()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_two_workers_on_sqlite(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """7. Two worker processes (each with its default pool) share one SQLite database."""
    with rig(engine, db_url, tmp_path, delay=0.05) as r:
        r.worker("first")
        r.worker("second")
        r.send()
        r.mid_send()
        r.wait_done()
        r.check()


@pytest.mark.parametrize("db_url", [POSTGRES], indirect=True)
def test_sigterm_then_sigkill_then_new_worker(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """8. ``docker stop``: SIGTERM to the worker, SIGKILL to its group 10 s later if it still
    runs; a new worker finishes the send. Nothing may be left ``unknown``.

    Batches of 500 at 0.6 s a message over 16 connections take ~19 s: the SIGTERM comes with
    more than 10 s of each running batch left, so waiting for the batch to end is too late.
    """
    with rig(engine, db_url, tmp_path, delay=0.6, MAILER_BATCH_SIZE="500") as r:
        worker = r.worker("first")
        r.send()
        r.mid_send(200)
        os.kill(worker.pid, signal.SIGTERM)
        sent_at = time.monotonic()
        try:
            worker.wait(timeout=10)
            exited_after: float | None = time.monotonic() - sent_at
            r.notes.append(f"the worker exited {exited_after:.1f} s after SIGTERM")
        except subprocess.TimeoutExpired:
            exited_after = None
            kill(worker)
            r.notes.append("the worker still ran 10 s after SIGTERM: SIGKILLed")
        r.worker("second")
        r.wait_done()
        r.check()
        assert exited_after is not None, r.report("the worker ignored SIGTERM for 10 s")


def _held_tasks(client: redis.Redis) -> list[dict[str, Any]]:
    """The headers of the tasks the broker holds unacknowledged (taken by a worker)."""
    return [json.loads(entry)[0]["headers"] for entry in client.hvals("unacked")]


def _holds_a_batch(client: redis.Redis, *, later: bool = False) -> bool:
    """A batch's task is among the broker's unacknowledged ones (``later``: one held for
    later, with a countdown). Not the only one: the worker may also have taken a reconcile it
    had not yet started (acknowledged only then)."""
    return any(
        task["task"] == "mailer.deliver_batch" and (task["eta"] is not None or not later)
        for task in _held_tasks(client)
    )


@dataclass
class Small:
    """Six readers, the post, and a broker and an SMTP server of the test's own: for the
    scenarios that break things at one chosen moment, with workers started by the test."""

    engine: Engine
    tmp_path: Path
    readers: list[str]
    broker: RedisServer
    server: SmtpServer
    processes: Processes
    env: dict[str, str]

    def worker(self, name: str) -> subprocess.Popen[bytes]:
        return start_worker(self.processes, self.env, self.tmp_path / f"{name}.log", name=name)

    def send(self) -> int:
        return int(run_mailer(self.env, self.tmp_path, "send", SLUG, "--segment", "all", "--yes"))

    def counts(self, send_id: int) -> dict[DeliveryState, int]:
        with db.session(self.engine) as session:
            return sends.show(session, send_id).counts

    def wait_done(self, send_id: int, timeout: float) -> None:
        def done() -> bool:
            with db.session(self.engine) as session:
                return sends.status(session, send_id) == "done"

        wait_until(done, timeout=timeout)

    def check(self, send_id: int) -> None:
        accepted = Counter(m.rcpt_tos[0] for m in self.server.handler.messages)
        assert accepted == Counter(self.readers), "each reader got exactly one message"
        assert self.counts(send_id)["sent"] == len(self.readers)


@contextlib.contextmanager
def small(
    engine: Engine, db_url: str, tmp_path: Path, handler: Recorder | None = None, **settings: str
) -> Iterator[Small]:
    readers = add_readers(engine, 6)
    (tmp_path / "post.md").write_text(POST)
    with (
        RedisServer(tmp_path / "redis") as broker,
        serve(handler) as server,
        Processes() as processes,
    ):
        env = environment(db_url, broker.url, server.settings().port, **settings)
        run_mailer(env, tmp_path, "posts", "add", "post.md")
        yield Small(engine, tmp_path, readers, broker, server, processes, env)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_killed_holding_a_batch_s_next_run(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """9. Every reader is greylisted, so the batch's next run is a task held for later (a
    countdown) in the worker; the worker is SIGKILLed while it holds it. The task stays in the
    broker's unacknowledged hash until the visibility timeout (hours); the reconciler of a new
    worker runs the batch once its next run is overdue."""
    # The next run is held for 15 s: the window in which the worker is killed.
    settings = {"MAILER_RETRY_BACKOFF": "15s", "MAILER_BATCH_LEASE": "2s"}
    with small(engine, db_url, tmp_path, greylist(), **settings) as s:
        first = s.worker("first")
        send_id = s.send()
        client = redis.Redis.from_url(s.broker.url)

        def holding_the_next_run() -> bool:
            deferred = s.counts(send_id)["deferred"]
            return deferred == len(s.readers) and _holds_a_batch(client, later=True)

        wait_until(holding_the_next_run, timeout=30)
        kill(first)
        assert _holds_a_batch(client), "the killed worker's next run left the broker"
        client.close()
        s.worker("second")
        s.wait_done(send_id, timeout=90)
        s.check(send_id)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_killed_after_taking_a_task_before_its_lease(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """15. The worker takes the batch's task and is SIGKILLed before its run takes the lease
    (the test holds SQLite's write lock, so the run waits there). The task stays in the
    broker's unacknowledged hash for hours and the batch never ran: the reconciler of a new
    worker counts a task taken more than a lease ago by no run as dead, and runs the batch."""
    with small(engine, db_url, tmp_path, MAILER_BATCH_SIZE="6", MAILER_BATCH_LEASE="2s") as s:
        send_id = s.send()
        client = redis.Redis.from_url(s.broker.url)
        lock = sqlite3.connect(str(make_url(db_url).database), isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            first = s.worker("first")
            wait_until(lambda: _holds_a_batch(client), timeout=30)
            time.sleep(1)  # the run is waiting for the lock to take the lease
            kill(first)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert s.counts(send_id)["queued"] == len(s.readers), "the run took nothing"
        assert _holds_a_batch(client), "the killed worker's task left the broker"
        client.close()
        s.worker("second")
        s.wait_done(send_id, timeout=30)
        s.check(send_id)


# Where a worker can die between two writes of its own: a trigger holds the second write (it
# sleeps inside it) until the test has SIGKILLed the worker; the write then dies with it.
HELD_WRITES = {
    # sends.expect_run after the lease's release: the batch's deferred readers are due later.
    "after releasing a batch, before noting its next run": (
        "send_batches",
        "OLD.lease_owner IS NULL AND NEW.lease_owner IS NULL",
    ),
    # sends.finish_if_done after the last batch ended: no reader is left to run it again.
    "after the last reader, before marking the send done": ("sends", "NEW.status = 'done'"),
}
# Only the first write that matches is held: a sequence, which the killed write's rollback
# leaves as it is.
HOLD = """
CREATE SEQUENCE held;
CREATE FUNCTION hold_once() RETURNS trigger AS $$
BEGIN
    IF ({condition}) AND nextval('held') = 1 THEN PERFORM pg_sleep(300); END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER hold_once BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION hold_once();
"""
UNHOLD = "DROP TRIGGER hold_once ON {table}; DROP FUNCTION hold_once(); DROP SEQUENCE held"
HELD = "SELECT pid FROM pg_stat_activity WHERE datname = :name AND wait_event = 'PgSleep'"


@pytest.mark.parametrize("db_url", [POSTGRES], indirect=True)
@pytest.mark.parametrize("moment", list(HELD_WRITES))
def test_a_worker_killed_between_two_writes(
    engine: Engine, db_url: str, pg_admin: Engine, tmp_path: Path, moment: str
) -> None:
    """10. The worker is SIGKILLed between two writes, each of which leaves the ledger true,
    with its task unacknowledged (the broker gives it back only after hours): the reconciler
    of a new worker finishes the send."""
    table, condition = HELD_WRITES[moment]
    name = {"name": make_url(db_url).database}
    # Greylisted readers are deferred: the batch is released with a next run to note.
    handler = greylist() if table == "send_batches" else None
    settings = {"MAILER_RETRY_BACKOFF": "5s", "MAILER_BATCH_LEASE": "2s"}
    with engine.begin() as conn:
        conn.execute(text(HOLD.format(table=table, condition=condition)))
    try:
        with (
            small(engine, db_url, tmp_path, handler, **settings) as s,
            pg_admin.connect() as admin,
        ):
            first = s.worker("first")
            send_id = s.send()
            wait_until(lambda: admin.execute(text(HELD), name).first() is not None, timeout=30)
            kill(first)
            admin.execute(text(f"SELECT pg_terminate_backend(pid) FROM ({HELD}) held"), name)
            client = redis.Redis.from_url(s.broker.url)
            assert _holds_a_batch(client), "the killed worker's task left the broker"
            client.close()
            s.worker("second")
            s.wait_done(send_id, timeout=60)
            s.check(send_id)
    finally:
        with engine.begin() as conn:
            conn.execute(text(UNHOLD.format(table=table)))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_send_s_tasks_lost_while_the_broker_holds_other_work(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """11. The send's batch tasks are published, then lost (Redis restarted without
    persistence) before any worker took them, and the broker holds other work: a task held for
    ten minutes. The reconciler of the worker that then starts enqueues the lost batches: it
    does not wait for the broker to be empty."""
    with small(engine, db_url, tmp_path, MAILER_BATCH_SIZE="2", MAILER_BATCH_LEASE="2s") as s:
        send_id = s.send()
        client = redis.Redis.from_url(s.broker.url)
        assert client.llen("celery") == 3, "one task per batch, waiting for a worker"
        client.close()
        s.broker.stop()
        s.broker.start()
        Celery(broker=s.broker.url).send_task("mailer.ping", countdown=600)
        s.worker("worker")
        s.wait_done(send_id, timeout=30)
        client = redis.Redis.from_url(s.broker.url)
        held = [task["task"] for task in _held_tasks(client)]
        assert "mailer.ping" in held, "the other work is still held"
        client.close()
        s.check(send_id)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ctrl_c_or_a_kill_while_delivering_without_a_broker(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """12. No broker answers, so `mailer send` delivers in its own process, where no reconciler
    carries a send on. Ctrl-C: the message in flight finishes, the send is paused, the command
    says how to resume it and exits 130, its stdout still the one JSON document. SIGKILL during
    `mailer sends resume`: the send is left sending, and `mailer sends resume` carries it on
    all the same. No reader gets two messages; the one in flight at the kill is ``unknown``."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    settings = {
        "MAILER_BROKER_URL": nowhere,
        "MAILER_SMTP_CONCURRENCY": "1",  # one message at a time, 0.5 s each
        "MAILER_BATCH_SIZE": "2",
        "MAILER_BATCH_LEASE": "2s",
    }
    with small(engine, db_url, tmp_path, Slow(0.5), **settings) as s:
        args = [str(BIN / "mailer"), "send", SLUG, "--segment", "all", "--yes", "--json"]
        with (tmp_path / "send.out").open("wb") as out:  # stdout alone: the JSON document
            sending = subprocess.Popen(args, env=s.env, cwd=tmp_path, stdout=out, stderr=PIPE)
            try:
                # The command's start alone can take seconds on a busy machine.
                s.server.handler.wait_for(1, timeout=30)
                sending.send_signal(signal.SIGINT)
                _, said = sending.communicate(timeout=30)
            finally:
                sending.kill()  # a no-op once it has exited
        assert sending.returncode == 130
        send_id = json.loads((tmp_path / "send.out").read_text())["send_id"]
        assert f"send {send_id} paused: `mailer sends resume {send_id}`" in said.decode()
        with db.session(engine) as session:
            assert sends.status(session, send_id) == "paused"
        counts = s.counts(send_id)
        assert counts["sending"] == 0 and counts["sent"] == len(s.server.handler.messages)

        args = [str(BIN / "mailer"), "sends", "resume", str(send_id)]
        resuming = s.processes.start(args, s.env, tmp_path / "resume.log", cwd=tmp_path)
        wait_until(lambda: s.counts(send_id)["sending"] == 1, timeout=30)
        kill(resuming)
        with db.session(engine) as session:
            assert sends.status(session, send_id) == "sending"
        run_mailer(s.env, tmp_path, "sends", "resume", str(send_id))
        with db.session(engine) as session:
            assert sends.status(session, send_id) == "done"
        counts = s.counts(send_id)
        received = Counter(m.rcpt_tos[0] for m in s.server.handler.messages)
        with db.session(engine) as session:
            sent = set(
                session.scalars(
                    select(SubscriberRow.email)
                    .join(DeliveryRow, DeliveryRow.subscriber_id == SubscriberRow.id)
                    .where(DeliveryRow.send_id == send_id, DeliveryRow.state == "sent")
                )
            )
    assert max(received.values()) == 1, "no reader got two messages"
    assert (counts["sent"], counts["unknown"]) == (len(s.readers) - 1, 1)
    assert sent <= set(received) <= set(s.readers)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ctrl_c_while_waiting_for_deferred_readers_without_a_broker(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """13. Every reader is greylisted and their next attempt is a minute away: `mailer send`,
    delivering in its own process, waits. Ctrl-C ends the wait at once and pauses the send."""
    settings = {"MAILER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with small(engine, db_url, tmp_path, greylist(), MAILER_RETRY_BACKOFF="60s", **settings) as s:
        args = [str(BIN / "mailer"), "send", SLUG, "--segment", "all", "--yes"]
        sending = s.processes.start(args, s.env, tmp_path / "send.log", cwd=tmp_path)
        log = tmp_path / "send.log"
        wait_until(lambda: "created" in log.read_text(), timeout=30)
        send_id = int(re.findall(r"send (\d+) created", log.read_text())[0])
        wait_until(lambda: s.counts(send_id)["deferred"] == len(s.readers), timeout=30)
        time.sleep(0.5)  # the batch has ended: the command waits for the next attempt
        asked = time.monotonic()
        sending.send_signal(signal.SIGINT)
        assert sending.wait(timeout=30) == 130
        assert time.monotonic() - asked < 5, "the wait for deferred readers outlasted Ctrl-C"
        with db.session(engine) as session:
            assert sends.status(session, send_id) == "paused"
        assert f"send {send_id} paused" in log.read_text()
