"""The tracker over real HTTP (uvicorn), with the real Redis buffer, on SQLite and PostgreSQL.

Apps run in a thread (``helpers.running``) on a free port with the flusher's interval set to an
hour, so events reach the database when the app stops (its last flush) or when a test flushes
by hand.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from conftest import REDIS_URL
from helpers import CHROME, add_send, dev_env, free_port, ledger_row, running
from prometheus_client.parser import text_string_to_metric_families
from smtp_servers import wait_until
from sqlalchemy import Engine, create_engine, func, make_url, select
from starlette.types import ASGIApp

from mailer import db, heartbeat
from mailer.db.models import (
    LinkRow,
    SubscriberEventRow,
    SubscriberRow,
    TrackingEventRow,
    utcnow,
)
from mailer.errors import DatabaseError
from mailer.metrics import render
from mailer.subscribers import manage
from mailer.tokens import Kind, Signer, Token
from mailer.tracking.app import PIXEL, StripeWebhook, create_app
from mailer.tracking.ingest import (
    STREAM,
    Event,
    MemoryBuffer,
    RedisBuffer,
    flush_once,
)

SECRET = "tracker-test-secret-0123456789"
SITE = "https://news.example.com"
ARTICLE = "https://example.org/articles/harbour?utm_source=mail"
SUBSCRIBE = f"{SITE}/subscribe?plan=annual"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}
signer = Signer([SECRET])


@dataclass
class World:
    engine: Engine
    db_url: str
    send_id: int
    readers: dict[str, int]  # name → subscriber id

    def token(self, kind: Kind, reader: str, link_no: int = 0) -> str:
        return signer.sign(Token(kind, self.send_id, self.readers[reader], link_no))

    def events(self) -> list[TrackingEventRow]:
        with db.session(self.engine) as session:
            query = select(TrackingEventRow).order_by(TrackingEventRow.id)
            return list(session.scalars(query))

    def status(self, reader: str) -> str:
        with db.session(self.engine) as session:
            row = session.get(SubscriberRow, self.readers[reader])
            assert row is not None
            return row.status

    def status_changes(self, reader: str) -> int:
        with db.session(self.engine) as session:
            return (
                session.scalar(
                    select(func.count()).where(
                        SubscriberEventRow.subscriber_id == self.readers[reader],
                        SubscriberEventRow.kind == manage.STATUS_CHANGED,
                        SubscriberEventRow.new == "unsubscribed",
                    )
                )
                or 0
            )


@pytest.fixture
def world(engine: Engine, db_url: str, redis_db: redis.Redis) -> World:
    """A send with two links; readers delivered a minute ago ("early" just now)."""
    now = utcnow()
    sent = {"ann": now - dt.timedelta(minutes=1), "bob": now - dt.timedelta(minutes=1)}
    sent |= {"early": now, "gone": now - dt.timedelta(minutes=1)}
    with db.session(engine) as session:
        send = add_send(session, status="done")
        session.add_all([LinkRow(send_id=send.id, link_no=0, url=ARTICLE)])
        session.add_all([LinkRow(send_id=send.id, link_no=1, url=SUBSCRIBE)])
        readers = {}
        for name, at in sent.items():
            reader = manage.add(session, f"{name}@example.com")
            readers[name] = reader.id
            ledger_row(session, send.id, reader.id, sent_at=at)
        send_id = send.id
    return World(engine, db_url, send_id, readers)


def make_app(engine: Engine, buffer: RedisBuffer, **options: Any) -> ASGIApp:
    return create_app(
        engine=engine,
        signer=signer,
        site_url=SITE,
        buffer=buffer,
        flush_interval=options.pop("flush_interval", 3600.0),
        **options,
    )


def test_pixel_answers_a_gif_at_once_and_the_flusher_classifies_the_open(world: World) -> None:
    buffer = RedisBuffer(REDIS_URL)
    with running(make_app(world.engine, buffer, flush_interval=0.05)) as client:
        human = client.get(
            f"/o/{world.token(Kind.OPEN, 'ann')}.gif", headers={"User-Agent": CHROME}
        )
        assert human.status_code == 200
        assert human.content == PIXEL and len(PIXEL) == 43
        assert human.headers["content-type"] == "image/gif"
        assert human.headers["cache-control"] == (
            "no-store, no-cache, must-revalidate, private, max-age=0"
        )
        assert (human.headers["pragma"], human.headers["expires"]) == ("no-cache", "0")
        apple = client.get(
            f"/o/{world.token(Kind.OPEN, 'bob')}.gif", headers={"User-Agent": "Mozilla/5.0"}
        )
        early = client.get(
            f"/o/{world.token(Kind.OPEN, 'early')}.gif", headers={"User-Agent": CHROME}
        )
        assert apple.content == early.content == PIXEL
        wait_until(lambda: len(world.events()) == 3)  # the periodic flusher, not the last one
    by_reader = {e.subscriber_id: e for e in world.events()}
    assert by_reader[world.readers["ann"]].classification == "human"
    assert by_reader[world.readers["bob"]].classification == "machine"  # Apple MPP
    assert by_reader[world.readers["early"]].classification == "machine"  # seconds after sent
    ann = by_reader[world.readers["ann"]]
    assert (ann.kind, ann.send_id, ann.user_agent, ann.ip) == (
        "open",
        world.send_id,
        CHROME,
        "127.0.0.1",
    )
    assert abs((ann.at - utcnow()).total_seconds()) < 30


def test_x_forwarded_for_counts_only_behind_a_trusted_proxy(world: World) -> None:
    forwarded = {"X-Forwarded-For": "198.51.100.7, 10.0.0.1", "User-Agent": CHROME}
    for trust in (False, True):
        with running(make_app(world.engine, RedisBuffer(REDIS_URL), trust_proxy=trust)) as client:
            client.get(f"/o/{world.token(Kind.OPEN, 'ann')}.gif", headers=forwarded)
    assert [e.ip for e in world.events()] == ["127.0.0.1", "198.51.100.7"]


def _other_kind(world: World) -> dict[str, str]:
    return {
        "open": world.token(Kind.CLICK, "ann"),
        "click": world.token(Kind.UNSUBSCRIBE, "ann"),
        "unsubscribe": world.token(Kind.OPEN, "ann"),
    }


def bad_tokens(world: World, kind: Kind) -> list[str]:
    good = world.token(kind, "ann")
    tampered = good[:-3] + ("AAA" if good[-3:] != "AAA" else "BBB")
    forged = Signer(["another-secret-0123456789"]).sign(Token(kind, world.send_id, 1))
    preview = signer.sign(Token(kind, 0, world.readers["ann"]))  # mailer preview's send 0
    wrong = _other_kind(world)[kind.name.lower()]
    return [tampered, forged, preview, wrong, "not-a-token", "A" * 40, ""]


def test_bad_tokens_get_a_plain_404_and_record_nothing(world: World) -> None:
    buffer = RedisBuffer(REDIS_URL)
    with running(make_app(world.engine, buffer)) as client:
        answers = [client.get(f"/o/{t}.gif") for t in bad_tokens(world, Kind.OPEN)]
        answers += [client.get(f"/c/{t}") for t in bad_tokens(world, Kind.CLICK)]
        for token in bad_tokens(world, Kind.UNSUBSCRIBE):
            answers += [client.get(f"/u/{token}"), client.post(f"/u/{token}", data=ONE_CLICK)]
    assert {a.status_code for a in answers} == {404}
    assert all(len(a.content) < 20 and "location" not in a.headers for a in answers)
    assert flush_once(world.engine, buffer) == 0
    assert world.events() == []
    assert world.status("ann") == "active"


def test_a_click_redirects_to_the_stored_url_only(world: World) -> None:
    buffer = RedisBuffer(REDIS_URL)
    with running(make_app(world.engine, buffer)) as client:
        article = client.get(
            f"/c/{world.token(Kind.CLICK, 'ann', 0)}?url=https://evil.example/",
            headers={"User-Agent": CHROME, "Host": "evil.example"},
        )
        subscribe = client.get(f"/c/{world.token(Kind.CLICK, 'bob', 1)}")
        unknown = client.get(f"/c/{world.token(Kind.CLICK, 'ann', 7)}")
    assert (article.status_code, article.headers["location"]) == (302, ARTICLE)
    assert subscribe.status_code == 302
    location = urlsplit(subscribe.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{SITE}/subscribe"
    query = parse_qs(location.query)
    assert query["plan"] == ["annual"]
    ref = signer.verify(query["mailer_ref"][0])
    assert ref == Token(Kind.REF, world.send_id, world.readers["bob"])
    assert unknown.status_code == 404
    clicks = [(e.kind, e.subscriber_id, e.link_no) for e in world.events()]
    assert clicks == [("click", world.readers["ann"], 0), ("click", world.readers["bob"], 1)]


def test_one_click_unsubscribe_is_immediate_and_idempotent(world: World) -> None:
    url = f"/u/{world.token(Kind.UNSUBSCRIBE, 'ann')}"
    with db.session(world.engine) as session:
        manage.erase(session, "gone@example.com")
    buffer = RedisBuffer(REDIS_URL)
    with running(make_app(world.engine, buffer)) as client:
        page = client.get(url)
        assert page.status_code == 200 and world.status("ann") == "active"  # GET changes nothing
        assert '<form method="post">' in page.text
        assert 'name="List-Unsubscribe" value="One-Click"' in page.text
        assert client.post(url).status_code == 400
        assert client.post(url, data={"List-Unsubscribe": "Maybe"}).status_code == 400
        first = client.post(url, data=ONE_CLICK)
        assert first.status_code == 200 and "unsubscribed" in first.text
        assert "set-cookie" not in first.headers and "location" not in first.headers
        assert world.status("ann") == "unsubscribed"  # at once, not at the next flush
        again = client.post(url, files={"List-Unsubscribe": (None, "One-Click")})  # multipart
        assert again.status_code == 200
        erased = client.post(f"/u/{world.token(Kind.UNSUBSCRIBE, 'gone')}", data=ONE_CLICK)
        assert erased.status_code == 200
    assert world.status_changes("ann") == 1
    kinds = [(e.kind, e.subscriber_id, e.classification) for e in world.events()]
    assert kinds == [("unsubscribe", world.readers["ann"], "human")] * 2


def test_stripe_webhooks_go_to_the_injected_handler(world: World) -> None:
    calls: list[tuple[bytes, str | None]] = []

    def handler(payload: bytes, signature: str | None) -> int:
        calls.append((payload, signature))
        return 400 if signature is None else 200

    webhook: StripeWebhook = handler
    buffer = RedisBuffer(REDIS_URL)
    with running(make_app(world.engine, buffer, stripe_webhook=webhook)) as client:
        signed = client.post(
            "/webhooks/stripe", content=b'{"id": "evt_1"}', headers={"Stripe-Signature": "t=1"}
        )
        unsigned = client.post("/webhooks/stripe", content=b"{}")
    assert (signed.status_code, unsigned.status_code) == (200, 400)
    assert calls == [(b'{"id": "evt_1"}', "t=1"), (b"{}", None)]


def append_all(buffer: RedisBuffer, events: list[Event]) -> None:
    async def run() -> None:
        for event in events:
            buffer.put(event)
        await buffer.aclose()

    asyncio.run(run())


def test_flushing_again_after_a_crash_before_the_ack_inserts_nothing_twice(
    world: World, monkeypatch: pytest.MonkeyPatch, redis_db: redis.Redis
) -> None:
    at = utcnow().timestamp()
    events = [Event("open", world.send_id, world.readers["ann"], at + i) for i in range(5)]
    buffer = RedisBuffer(REDIS_URL)
    append_all(buffer, events)

    def crash(keys: object) -> None:
        raise KeyboardInterrupt("killed between the commit and the acknowledgement")

    with monkeypatch.context() as patch:
        patch.setattr(buffer, "ack", crash)
        with pytest.raises(KeyboardInterrupt):
            flush_once(world.engine, buffer)
    assert len(world.events()) == 5
    assert flush_once(world.engine, buffer) == 0
    assert len(world.events()) == 5
    assert redis_db.xlen(STREAM) == 0
    assert flush_once(world.engine, buffer) == 0


def test_a_large_backlog_is_written_in_one_go(world: World) -> None:
    # Thousands of readers in one batch: a row-value IN list of them overflowed PostgreSQL.
    buffer = MemoryBuffer()
    at = utcnow().timestamp()
    for reader in range(1, 12_001):
        buffer.put(Event("open", world.send_id, reader, at, user_agent=CHROME))
    buffer.put(Event("open", world.send_id, world.readers["ann"], at + 120, user_agent=CHROME))
    assert flush_once(world.engine, buffer) == 12_001
    [ann] = [e for e in world.events() if e.at.timestamp() == pytest.approx(at + 120, abs=0.01)]
    assert (ann.user_agent, ann.classification) == (CHROME, "human")


def unreachable(db_url: str, tmp_path: Path) -> Engine:
    """The same backend, but a database that cannot be written."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        return create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}")
    return db.connect(url.set(database="mailer_no_such_database").render_as_string(False))


def test_events_arriving_while_the_database_is_down_are_written_later(
    world: World, tmp_path: Path
) -> None:
    down = unreachable(world.db_url, tmp_path)
    buffer = RedisBuffer(REDIS_URL)
    with running(make_app(down, buffer, flush_interval=0.05)) as client:
        opened = client.get(
            f"/o/{world.token(Kind.OPEN, 'bob')}.gif", headers={"User-Agent": CHROME}
        )
        left = client.post(f"/u/{world.token(Kind.UNSUBSCRIBE, 'ann')}", data=ONE_CLICK)
        assert (opened.status_code, left.status_code) == (200, 200)
    with pytest.raises(DatabaseError):
        flush_once(down, buffer)
    down.dispose()
    assert world.events() == [] and world.status("ann") == "active"
    # The app's flusher still holds the entries: flush_once takes them over.
    assert flush_once(world.engine, buffer) == 2
    assert sorted(e.kind for e in world.events()) == ["open", "unsubscribe"]
    assert world.status("ann") == "unsubscribed"
    assert world.status_changes("ann") == 1


@pytest.mark.subprocess
def test_sigterm_makes_the_served_tracker_write_its_buffer(world: World, tmp_path: Path) -> None:
    port = free_port()
    env = dev_env()
    env |= {
        "MAILER_DATABASE_URL": world.db_url,
        "MAILER_BROKER_URL": REDIS_URL,
        "MAILER_SECRET_KEY": SECRET,
        "MAILER_TRACKER_FLUSH_INTERVAL": "1h",
    }
    mailer = [sys.executable, "-m", "mailer", "tracker", "serve", "--port", str(port)]
    process = subprocess.Popen(mailer, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(base), timeout=15)
        pixel = httpx.get(f"{base}/o/{world.token(Kind.OPEN, 'ann')}.gif")
        assert pixel.status_code == 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr.decode()
    assert b"Application shutdown complete" in stderr
    assert [(e.kind, e.subscriber_id) for e in world.events()] == [("open", world.readers["ann"])]


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/o/x.gif", timeout=1).status_code == 404
    except httpx.TransportError:
        return False


def test_memory_buffer_keeps_entries_until_acknowledged() -> None:
    buffer = MemoryBuffer()
    buffer.put(Event("open", 1, 2, 0.0))
    first = buffer.read("a", 10, claim_idle=60)
    assert [e.events for e in first] == [(Event("open", 1, 2, 0.0),)]
    assert buffer.read("b", 10, claim_idle=60) == []  # held by "a"
    assert buffer.read("a", 10, claim_idle=60) == first  # "a" gets it again until it acks
    assert buffer.read("b", 10, claim_idle=0) == first  # a dead holder's entries are claimed
    buffer.ack([first[0].key])
    assert buffer.read("b", 10, claim_idle=0) == []


def test_health_and_readiness_name_what_does_not_answer(world: World) -> None:
    with running(make_app(world.engine, RedisBuffer(REDIS_URL))) as client:
        assert (client.get("/healthz").status_code, client.get("/healthz").text) == (200, "ok")
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "checks": {"database": "ok", "redis": "ok"}}

    unreachable = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    no_redis = RedisBuffer(f"redis://127.0.0.1:{free_port()}/0")
    with running(make_app(unreachable, no_redis, flush_interval=None)) as client:
        assert client.get("/healthz").status_code == 200  # alive, though not ready
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        checks = ready.json()["checks"]
        assert "Connection refused" in checks["database"]
        assert "Connection refused" in checks["redis"]
    unreachable.dispose()


def test_metrics_parse_and_agree_with_the_ledger(world: World, redis_db: redis.Redis) -> None:
    buffer = RedisBuffer(REDIS_URL)
    heartbeat.record(redis_db, 1_800_000_000.5)
    redis_db.rpush("celery", "a task", "another")
    metrics = functools.partial(render, world.engine, redis_db, buffer)
    app = make_app(world.engine, buffer, flush_interval=0.05, metrics=metrics, metrics_token="s3")
    with running(app) as client:
        client.get(f"/o/{world.token(Kind.OPEN, 'ann')}.gif", headers={"User-Agent": CHROME})
        wait_until(lambda: len(world.events()) == 1)
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        answer = client.get("/metrics", headers={"Authorization": "Bearer s3"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }
    send = str(world.send_id)
    assert samples[("mailer_send_messages", (("send_id", send), ("state", "sent")))] == 4
    assert samples[("mailer_sends", (("status", "done"),))] == 1
    assert samples[("mailer_queue_length", (("queue", "celery"),))] == 2
    assert samples[("mailer_tracking_backlog", ())] == 0
    assert samples[("mailer_tracker_events_total", (("kind", "open"),))] == 1
    assert samples[("mailer_scheduler_last_run_timestamp_seconds", ())] == 1_800_000_000.5
