"""The delivery engine against real SMTP servers, on SQLite and PostgreSQL.

Each reader gets exactly one message; faults map to the right ledger states; pause, resume,
a batch run twice, and a run that dies with messages in flight never send twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import email
import email.policy
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest
from helpers import DEV
from smtp_servers import CloseAfter, DropAfterData, Message, Refuse, Slow, greylist, serve
from sqlalchemy import Engine, create_engine, event, select, text, update

from mailer import db, sends
from mailer.compose import Publication
from mailer.config import Settings, load_settings
from mailer.db.models import (
    DeliveryRow,
    SendBatchRow,
    SendRow,
    SendVariantRow,
    SubscriberEventRow,
    SubscriberRow,
    utcnow,
)
from mailer.delivery import runner
from mailer.delivery.ledger import SqlLedger
from mailer.delivery.runner import Runtime, next_run, run_inline
from mailer.delivery.smtp import SmtpPool
from mailer.errors import TransientDeliveryError
from mailer.posts import parse_post_text
from mailer.posts.store import save_post
from mailer.vocabulary import TIERS, Tier

POST = """\
---
title: Harbour Notes
audience: paid
---
Free readers see this part.

<!-- paywall -->

Only paying readers see this part.
"""


@dataclass
class Setup:
    engine: Engine
    db_url: str
    readers: dict[str, Tier]  # address → tier

    def settings(self, smtp_port: int, **extra: str) -> Settings:
        return load_settings(
            {
                **DEV,
                "MAILER_DATABASE_URL": self.db_url,
                "MAILER_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
                "MAILER_RETRY_BACKOFF": "50ms",
                "MAILER_BATCH_SIZE": "7",
                "MAILER_SMTP_CONCURRENCY": "4",
                "MAILER_SMTP_COMMAND_TIMEOUT": "2s",
                "MAILER_SMTP_DATA_TIMEOUT": "2s",
                **extra,
            },
            env_file=None,
        )

    def create_send(self, settings: Settings, segment: str = "all") -> int:
        with db.session(self.engine) as session:
            post = parse_post_text(POST, "post.md")
            save_post(session, post, source="post.md")
            draft = sends.draft(session, post, segment, Publication.from_settings(settings))
            return sends.plan(session, draft, batch_size=settings.batch_size).send_id

    def deliver(self, settings: Settings, send_id: int) -> None:
        runtime = Runtime(settings, engine=self.engine)
        try:
            run_inline(runtime, send_id)
        finally:
            runtime.close()

    def info(self, send_id: int) -> sends.SendInfo:
        with db.session(self.engine) as session:
            return sends.show(session, send_id)


@pytest.fixture
def setup(engine: Engine, db_url: str) -> Iterator[Setup]:
    readers = {f"reader{i}@example.com": TIERS[i % 4] for i in range(30)}
    with db.session(engine) as session:
        session.add_all(
            SubscriberRow(
                email=address,
                email_key=address,
                domain="example.com",
                name=f"Reader {i}",
                tier=tier,
            )
            for i, (address, tier) in enumerate(readers.items())
        )
    yield Setup(engine, db_url, readers)


def by_recipient(messages: list[Message]) -> Counter[str]:
    return Counter(m.rcpt_tos[0] for m in messages)


def parsed(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_every_reader_gets_exactly_one_message_of_their_variant(setup: Setup) -> None:
    with serve() as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings)
        setup.deliver(settings, send_id)
        messages = server.handler.messages
    assert by_recipient(messages) == Counter(list(setup.readers))
    info = setup.info(send_id)
    assert info.status == "done"
    assert info.counts["sent"] == len(setup.readers) and info.recipients == len(setup.readers)
    assert info.by_variant == {"free": 8, "paid": 22}
    # Connections are reused: far fewer than messages.
    assert server.connections <= settings.smtp_concurrency * 2
    with db.session(setup.engine) as session:
        ledger = {row.subscriber_id: row for row in session.scalars(select(DeliveryRow))}
    for message in messages:
        body = parsed(message.data)
        address = message.rcpt_tos[0]
        html = body.get_body(("html",)).get_content()  # type: ignore[union-attr]
        if setup.readers[address] == "free":
            assert "Keep reading with a 7-day free trial" in html
            assert "Only paying readers" not in html
        else:
            assert "Only paying readers" in html and "Keep reading" not in html
        assert message.mail_from.startswith("bounces+") and message.mail_from.endswith(
            "@example.com"
        )
        assert max(len(line) for line in message.data.split(b"\r\n")) <= 998
        assert body["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        row = next(r for r in ledger.values() if r.message_id == body["Message-ID"])
        assert row.state == "sent" and row.sent_at is not None and row.last_reply


def test_audience_counts_readers_per_variant(setup: Setup) -> None:
    with db.session(setup.engine) as session:
        assert sends.audience(session, "all") == sends.Audience(free=8, paid=22)
        assert sends.audience(session, "tier:free") == sends.Audience(free=8, paid=0)


def test_readers_suppressed_after_planning_are_skipped(setup: Setup) -> None:
    gone = "reader3@example.com"
    with serve() as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings)
        with db.session(setup.engine) as session:
            session.execute(
                update(SubscriberRow)
                .where(SubscriberRow.email_key == gone)
                .values(status="unsubscribed")
            )
        setup.deliver(settings, send_id)
        received = by_recipient(server.handler.messages)
    assert gone not in received and len(received) == len(setup.readers) - 1
    assert setup.info(send_id).counts["skipped"] == 1


def test_only_the_segment_is_mailed(setup: Setup) -> None:
    with serve() as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings, "tier:paid,comped")
        setup.deliver(settings, send_id)
        received = by_recipient(server.handler.messages)
    assert set(received) == {a for a, t in setup.readers.items() if t in ("paid", "comped")}


def test_greylisted_readers_are_deferred_then_sent(setup: Setup) -> None:
    with serve(greylist()) as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings)
        setup.deliver(settings, send_id)
        received = by_recipient(server.handler.messages)
    assert received == Counter(list(setup.readers))
    with db.session(setup.engine) as session:
        attempts = set(session.scalars(select(DeliveryRow.attempts)))
    assert attempts == {2}
    assert setup.info(send_id).status == "done"


def test_a_hard_bounce_fails_one_reader_and_marks_them_bounced(setup: Setup) -> None:
    bad = "reader5@example.com"
    with serve(Refuse("550 5.1.1 No such user", address=bad)) as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings)
        setup.deliver(settings, send_id)
        received = by_recipient(server.handler.messages)
    assert bad not in received and len(received) == len(setup.readers) - 1
    info = setup.info(send_id)
    assert info.counts["failed"] == 1 and info.status == "done"
    with db.session(setup.engine) as session:
        reader = session.scalars(select(SubscriberRow).where(SubscriberRow.email_key == bad)).one()
        assert reader.status == "bounced"
        event = session.scalars(
            select(SubscriberEventRow).where(SubscriberEventRow.subscriber_id == reader.id)
        ).one()
        assert (event.old, event.new, event.send_id) == ("active", "bounced", send_id)
        reply, bounced = session.execute(
            select(DeliveryRow.last_reply, DeliveryRow.bounced).where(
                DeliveryRow.subscriber_id == reader.id
            )
        ).one()
    assert reply is not None and reply.startswith("550")
    assert bounced


def test_a_refused_sender_is_not_a_bounce(setup: Setup) -> None:
    with serve(Refuse("553 5.7.1 Sender rejected", stage="mail")) as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings, "tier:paid")
        setup.deliver(settings, send_id)
    assert setup.info(send_id).counts["failed"] == 7
    with db.session(setup.engine) as session:
        assert set(session.scalars(select(SubscriberRow.status))) == {"active"}
        assert set(session.scalars(select(DeliveryRow.bounced))) == {False}


def test_a_dropped_connection_is_retried(setup: Setup) -> None:
    with serve(DropAfterData()) as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings, "tier:trial")
        setup.deliver(settings, send_id)
        received = by_recipient(server.handler.messages)
    assert received == Counter(a for a, t in setup.readers.items() if t == "trial")


def test_slow_replies_time_out_and_give_up_after_the_attempts(setup: Setup) -> None:
    with serve(Slow(1.5, stage="data")) as server:
        settings = setup.settings(
            server.settings().port, MAILER_SMTP_DATA_TIMEOUT="300ms", MAILER_RETRY_ATTEMPTS="2"
        )
        send_id = setup.create_send(settings, "tier:comped")
        setup.deliver(settings, send_id)
    info = setup.info(send_id)
    assert info.counts["failed"] == 7 and info.status == "done"
    with db.session(setup.engine) as session:
        replies = set(session.scalars(select(DeliveryRow.last_reply)))
    assert all(r is not None and r.startswith("gave up after 2 attempts") for r in replies)


def test_421_mid_session_reconnects(setup: Setup) -> None:
    with serve(CloseAfter(3)) as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings)
        setup.deliver(settings, send_id)
        received = by_recipient(server.handler.messages)
    assert received == Counter(list(setup.readers))
    assert setup.info(send_id).status == "done"


def test_running_a_batch_again_sends_nothing_twice(setup: Setup) -> None:
    with serve() as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings)
        setup.deliver(settings, send_id)
        runtime = Runtime(settings, engine=setup.engine)
        for batch_no in range(5):
            runtime.run_batch(send_id, batch_no)  # a redelivered task for every batch
        runtime.close()
        received = by_recipient(server.handler.messages)
    assert received == Counter(list(setup.readers))


def test_pause_then_resume_sends_nothing_twice(setup: Setup) -> None:
    with serve(Slow(0.05)) as server:
        settings = setup.settings(server.settings().port, MAILER_SMTP_CONCURRENCY="1")
        send_id = setup.create_send(settings)
        runtime = Runtime(settings, engine=setup.engine)
        first = runtime.run_batch(send_id, 0)
        assert first.sent == 7, first
        with db.session(setup.engine) as session:
            sends.pause(session, send_id)
        stopped = runtime.run_batch(send_id, 1)
        assert (stopped.outcome, stopped.send_status, stopped.sent) == ("stopped", "paused", 0)
        assert setup.info(send_id).counts["queued"] == len(setup.readers) - 7
        with db.session(setup.engine) as session:
            sends.resume(session, send_id)
        run_inline(runtime, send_id)
        runtime.close()
        received = by_recipient(server.handler.messages)
    assert received == Counter(list(setup.readers))
    assert setup.info(send_id).status == "done"


def test_a_pause_between_claim_and_status_read_strands_nobody(setup: Setup) -> None:
    # PostgreSQL reads each statement afresh: a pause can commit after the claim (which saw
    # "sending") and before the same flush reads the status. SQLite's one writer rules it out.
    if setup.engine.dialect.name != "postgresql":
        pytest.skip("needs a database where another connection writes mid-transaction")
    paused: list[bool] = []
    claimed: list[bool] = []

    def pause_before_status_read(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("UPDATE deliveries") and "RETURNING" in statement:  # a claim
            claimed.append(True)
        elif statement.startswith("SELECT sends.status") and claimed and not paused:
            paused.append(True)
            with db.session(setup.engine) as session:
                sends.pause(session, send_id)

    with serve() as server:
        settings = setup.settings(server.settings().port, MAILER_SMTP_CONCURRENCY="2")
        send_id = setup.create_send(settings)
        runtime = Runtime(settings, engine=setup.engine)
        event.listen(setup.engine, "before_cursor_execute", pause_before_status_read)
        try:
            result = runtime.run_batch(send_id, 0)
        finally:
            event.remove(setup.engine, "before_cursor_execute", pause_before_status_read)
        assert paused and (result.outcome, result.send_status) == ("stopped", "paused")
        assert setup.info(send_id).counts["sending"] == 0
        assert len(server.handler.messages) == result.sent > 0  # the claimed ones went out
        with db.session(setup.engine) as session:
            sends.resume(session, send_id)
        run_inline(runtime, send_id)
        runtime.close()
        received = by_recipient(server.handler.messages)
    assert received == Counter(list(setup.readers))


def test_a_pause_mid_batch_strands_nobody(setup: Setup) -> None:
    with serve(Slow(0.02)) as server:
        settings = setup.settings(server.settings().port, MAILER_BATCH_SIZE="30")
        send_id = setup.create_send(settings)
        runtime = Runtime(settings, engine=setup.engine)
        running = threading.Thread(target=runtime.run_batch, args=(send_id, 0))
        running.start()
        server.handler.wait_for(5)
        with db.session(setup.engine) as session:
            sends.pause(session, send_id)
        running.join(timeout=30)
        assert setup.info(send_id).counts["sending"] == 0
        with db.session(setup.engine) as session:
            sends.resume(session, send_id)
        run_inline(runtime, send_id)
        runtime.close()
        received = by_recipient(server.handler.messages)
    assert received == Counter(list(setup.readers))
    info = setup.info(send_id)
    assert info.counts["unknown"] == 0 and info.status == "done"


def test_a_batch_no_live_run_holds_is_stalled_once_its_next_run_is_overdue(setup: Setup) -> None:
    send_id = setup.create_send(setup.settings(0))
    late, soon = dt.timedelta(seconds=-1), dt.timedelta(hours=1)
    with db.session(setup.engine) as session:
        assert sends.stalled_batches(session) == []
        sends.expect_run(session, send_id, 0, within=late)
        sends.expect_run(session, send_id, 1, within=soon)
        # A run holds batch 2: its lease, not a note of a next run, says when it is stalled.
        session.execute(
            update(SendBatchRow)
            .where(SendBatchRow.batch_no == 2)
            .values(lease_owner="alive", lease_until=utcnow() + soon)
        )
        sends.expect_run(session, send_id, 2, within=late)
        # Batch 3's worker died: its lease expired unreleased.
        session.execute(
            update(SendBatchRow)
            .where(SendBatchRow.batch_no == 3)
            .values(lease_owner="dead", lease_until=utcnow() + late)
        )
        assert sends.stalled_batches(session) == [(send_id, 0), (send_id, 3)]
        for batch_no in (0, 3):  # enqueued again: wait a while
            sends.expect_run(session, send_id, batch_no, within=soon)
        assert sends.stalled_batches(session) == []
        # The dead run's lease is released: the next run takes batch 3 at once.
        owners = session.scalars(
            select(SendBatchRow.lease_owner)
            .where(SendBatchRow.batch_no <= 3)
            .order_by(SendBatchRow.batch_no)
        )
        assert list(owners) == [None, None, "alive", None]


def test_a_released_batch_is_stalled_unless_its_next_run_is_noted_within_a_lease(
    setup: Setup,
) -> None:
    # A worker killed between releasing the batch and noting its next run (and whose task the
    # broker keeps for hours) leaves it to the reconciler, a lease later.
    send_id = setup.create_send(setup.settings(0))
    ledger = SqlLedger(setup.engine, send_id, 0, lease=0.0, patience=0.0)
    assert ledger.acquire() == ("taken", 0.0)
    ledger.release()
    ledger.close()
    with db.session(setup.engine) as session:
        assert sends.stalled_batches(session) == [(send_id, 0)]
        sends.expect_run(session, send_id, 0, within=dt.timedelta(hours=1))
        assert sends.stalled_batches(session) == []


def test_the_reconciler_marks_done_a_send_whose_last_run_died_before_it_could(
    setup: Setup,
) -> None:
    done, unfinished = (setup.create_send(setup.settings(0)) for _ in range(2))
    with db.session(setup.engine) as session:
        session.execute(update(DeliveryRow).where(DeliveryRow.send_id == done).values(state="sent"))
        assert sends.finish_all_done(session) == [done]
        assert sends.finish_all_done(session) == []
    assert (setup.info(done).status, setup.info(unfinished).status) == ("done", "sending")


def test_messages_in_flight_at_a_crash_become_unknown_and_are_not_resent(setup: Setup) -> None:
    with serve() as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings)
        # A worker died in batch 0 with two messages claimed: its lease ran out unreleased.
        with db.session(setup.engine) as session:
            claimed = list(
                session.scalars(select(DeliveryRow.id).where(DeliveryRow.batch_no == 0).limit(2))
            )
            session.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id.in_(claimed))
                .values(state="sending", attempts=1)
            )
            session.execute(
                update(SendBatchRow)
                .where(SendBatchRow.batch_no == 0)
                .values(lease_owner="dead-worker", lease_until=utcnow())
            )
            assert sends.stalled_batches(session) == [(send_id, 0)]
        setup.deliver(settings, send_id)
        assert len(server.handler.messages) == len(setup.readers) - 2
        info = setup.info(send_id)
        assert info.counts["unknown"] == 2 and info.status == "done"

        with db.session(setup.engine) as session:
            count, batches = sends.retry_unknown(session, send_id)
        assert (count, batches) == (2, [0])
        setup.deliver(settings, send_id)
        received = by_recipient(server.handler.messages)
    assert received == Counter(list(setup.readers))
    assert setup.info(send_id).status == "done"


def test_a_live_lease_makes_a_second_run_wait(setup: Setup) -> None:
    with serve() as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings)
        with db.session(setup.engine) as session:
            session.execute(
                update(SendBatchRow)
                .where(SendBatchRow.batch_no == 0)
                .values(lease_owner="other", lease_until=utcnow().replace(year=2100))
            )
        runtime = Runtime(settings, engine=setup.engine)
        result = runtime.run_batch(send_id, 0)
        runtime.close()
    assert result.outcome == "held" and result.due_in is not None and result.due_in > 0
    assert result.sent == 0


def test_cancel_skips_the_rest(setup: Setup) -> None:
    with serve() as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings)
        with db.session(setup.engine) as session:
            sends.cancel(session, send_id)
        setup.deliver(settings, send_id)
        assert server.handler.messages == []
    info = setup.info(send_id)
    assert info.status == "cancelled" and info.counts["skipped"] == len(setup.readers)


# Whatever fails inside a batch, it ends in order: no lane outlives it, what reached the server
# is recorded, what was claimed but not sent is queued again, and the batch runs again.


class FailingThrottle:
    """Raises what ``RedisThrottle`` raises when Redis fails, on its ``fail_at``-th acquire."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls = 0

    async def acquire(self, domain: str) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise TransientDeliveryError("rate limiter: Redis failed: Connection refused")

    async def backoff(self, domain: str) -> None:
        pass


def states(setup: Setup, send_id: int) -> dict[str, int]:
    return {k: v for k, v in setup.info(send_id).counts.items() if v}


def no_task_left(runtime: Runtime) -> None:
    pending = [t for t in asyncio.all_tasks(runtime.loop) if not t.done()]
    assert pending == [], pending


def test_a_lane_that_fails_stops_the_batch_in_order_and_it_runs_again(setup: Setup) -> None:
    with serve(Slow(0.05)) as server:
        settings = setup.settings(server.settings().port, MAILER_BATCH_SIZE="30")
        send_id = setup.create_send(settings)
        runtime = Runtime(settings, engine=setup.engine, throttle=FailingThrottle(fail_at=6))
        result = runtime.run_batch(send_id, 0)
        no_task_left(runtime)
        at_return = len(server.handler.messages)
        time.sleep(0.3)  # a lane left behind would hand more messages to the server now
        assert len(server.handler.messages) == at_return
        assert result.outcome == "interrupted" and "Redis failed" in (result.error or "")
        counts = states(setup, send_id)
        assert counts == {"sent": at_return, "queued": len(setup.readers) - at_return}
        assert result.sent == at_return
        wait = next_run(result)
        assert wait is not None and 0 < wait <= 2 * runner.INTERRUPTED_FIRST_S
        assert setup.info(send_id).status == "sending"

        runtime.throttle = FailingThrottle(fail_at=0)
        run_inline(runtime, send_id)
        runtime.close()
        received = by_recipient(server.handler.messages)
    assert received == Counter(list(setup.readers))
    assert setup.info(send_id).status == "done"


def test_a_lost_lease_ends_the_run_with_no_lane_left(setup: Setup) -> None:
    with serve(Slow(0.05)) as server:
        settings = setup.settings(
            server.settings().port, MAILER_BATCH_SIZE="30", MAILER_BATCH_LEASE="600ms"
        )
        send_id = setup.create_send(settings)
        runtime = Runtime(settings, engine=setup.engine)
        running = concurrent.futures.ThreadPoolExecutor(1).submit(runtime.run_batch, send_id, 0)
        server.handler.wait_for(4)
        with db.session(setup.engine) as session:  # another run takes the batch over
            session.execute(
                update(SendBatchRow).values(
                    lease_owner="thief", lease_until=utcnow().replace(year=2100)
                )
            )
        result = running.result(timeout=30)
        no_task_left(runtime)
        runtime.close()
    assert result.outcome == "taken_over" and next_run(result) is None
    counts = states(setup, send_id)
    assert counts["sent"] == len(server.handler.messages) == result.sent
    assert "sending" not in counts  # what was in flight was recorded


def test_a_missing_batch_is_nothing_to_do_ever(setup: Setup) -> None:
    with serve() as server:
        settings = setup.settings(server.settings().port)
        send_id = setup.create_send(settings)
        runtime = Runtime(settings, engine=setup.engine)
        result = runtime.run_batch(send_id, 99)
        runtime.close()
    assert result.outcome == "missing" and next_run(result) is None


def test_a_shutdown_hands_the_rest_over_at_once(setup: Setup) -> None:
    with serve(Slow(0.02)) as server:
        settings = setup.settings(server.settings().port, MAILER_BATCH_SIZE="30")
        send_id = setup.create_send(settings)
        runtime = Runtime(
            settings,
            engine=setup.engine,
            stop_requested=lambda: len(server.handler.messages) >= 5,
        )
        result = runtime.run_batch(send_id, 0)
        no_task_left(runtime)
        assert result.outcome == "handed_over" and next_run(result) == 0
        counts = states(setup, send_id)
        assert counts == {"sent": result.sent, "queued": len(setup.readers) - result.sent}
        runtime.stop_requested = lambda: False
        run_inline(runtime, send_id)
        runtime.close()
        received = by_recipient(server.handler.messages)
    assert received == Counter(list(setup.readers))


class Crashing:
    """An SMTP client that fails mid-message for one reader: the server may have it or not."""

    def __init__(self, pool: Any, address: str) -> None:
        self.pool = pool
        self.address = address

    async def send(self, envelope_from: str, recipient: str, message: bytes) -> Any:
        if recipient == self.address:
            raise RuntimeError("client bug")
        return await self.pool.send(envelope_from, recipient, message)


def test_a_client_that_fails_mid_message_leaves_that_reader_unknown_not_resent(
    setup: Setup,
) -> None:
    crash = "reader4@example.com"
    with serve() as server:
        settings = setup.settings(server.settings().port, MAILER_BATCH_SIZE="30")
        send_id = setup.create_send(settings)
        pool = SmtpPool(settings.smtp, size=4, connect_timeout=2, command_timeout=2, data_timeout=2)
        crashing = Runtime(settings, engine=setup.engine, sender=Crashing(pool, crash))
        result = crashing.run_batch(send_id, 0)
        no_task_left(crashing)
        assert result.outcome == "interrupted" and result.unknown == 1
        crashing.loop.run_until_complete(pool.close())
        crashing.close()
        setup.deliver(settings, send_id)
        received = by_recipient(server.handler.messages)
    assert received == Counter(a for a in setup.readers if a != crash)
    info = setup.info(send_id)
    assert info.counts["unknown"] == 1 and info.status == "done"


def test_postgresql_connections_killed_mid_batch_lose_nothing(setup: Setup) -> None:
    if setup.engine.dialect.name != "postgresql":
        pytest.skip("terminates PostgreSQL backends")
    with serve(Slow(0.02)) as server:
        settings = setup.settings(server.settings().port, MAILER_BATCH_SIZE="30")
        send_id = setup.create_send(settings)
        runtime = Runtime(settings, engine=setup.engine)
        running = concurrent.futures.ThreadPoolExecutor(1).submit(runtime.run_batch, send_id, 0)
        server.handler.wait_for(5)
        admin = create_engine(setup.engine.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar()
        admin.dispose()
        assert killed
        result = running.result(timeout=60)
        no_task_left(runtime)
        if result.outcome != "ran":  # the kill landed outside a flush: it runs again
            run_inline(runtime, send_id)
        runtime.close()
        received = by_recipient(server.handler.messages)
    assert received == Counter(list(setup.readers))
    info = setup.info(send_id)
    assert info.counts["sent"] == len(setup.readers) and info.status == "done"


def test_a_batch_that_keeps_failing_fails_its_send_at_the_maximum_age(setup: Setup) -> None:
    with serve() as server:
        settings = setup.settings(server.settings().port, MAILER_RETRY_MAX_AGE="1h")
        send_id = setup.create_send(settings)
        with db.session(setup.engine) as session:  # a template nothing can personalise
            session.execute(update(SendVariantRow).values(template=b"garbage"))
        runtime = Runtime(settings, engine=setup.engine)
        early = runtime.run_batch(send_id, 0)
        assert early.outcome == "interrupted" and "Message-ID" in (early.error or "")
        assert setup.info(send_id).status == "sending"
        assert states(setup, send_id) == {"queued": len(setup.readers)}
        with db.session(setup.engine) as session:
            session.execute(update(SendRow).values(started_at=utcnow() - dt.timedelta(hours=2)))
        late = runtime.run_batch(send_id, 0)
        runtime.close()
        assert server.handler.messages == []
    assert (late.outcome, late.send_status) == ("stopped", "failed") and next_run(late) is None
    info = setup.info(send_id)
    assert info.status == "failed" and "Message-ID" in (info.error or "")
    assert states(setup, send_id) == {"queued": len(setup.readers)}  # `resume` carries on
