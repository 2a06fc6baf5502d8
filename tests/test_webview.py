"""View in browser: ``GET /v/TOKEN`` over real HTTP serves the message that reader was sent.

A real send is planned (sends.create: composed variants, links, ledger rows) for a free and a
paid reader; the tracker runs under uvicorn with the Redis buffer, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from conftest import REDIS_URL
from helpers import CHROME, running
from sqlalchemy import Engine, create_engine, delete, select, update
from starlette.types import ASGIApp

from mailer import db, sends
from mailer.compose import Publication, compose
from mailer.db.models import DeliveryRow, SubscriberRow, TrackingEventRow, utcnow
from mailer.delivery.personalise import Personaliser, Recipient
from mailer.posts import parse_post
from mailer.posts.store import save_post
from mailer.subscribers import manage
from mailer.tokens import Kind, Signer, Token
from mailer.tracking.app import create_app
from mailer.tracking.ingest import RedisBuffer, flush_once
from mailer.vocabulary import Tier

SECRET = "webview-test-secret-0123456789"
TRACKER = "https://t.example.com"
POST = Path(__file__).resolve().parents[1] / "examples" / "posts" / "the-harbour-in-numbers.md"
PUB = Publication(
    name="The Demo Dispatch",
    postal_address="1 Example Street, Springfield",
    site_url="https://example.com",
    tracker_url=TRACKER,
    from_address="The Demo Dispatch <news@example.com>",
)
signer = Signer([SECRET])
COMPOSITION = compose(parse_post(POST), PUB)
TIERS: tuple[Tier, ...] = ("free", "paid")


@dataclass
class Send:
    engine: Engine
    send_id: int
    readers: dict[str, Recipient]  # tier → reader

    def token(self, tier: str, kind: Kind = Kind.VIEW) -> str:
        return signer.sign(Token(kind, self.send_id, self.readers[tier].subscriber_id))

    def emailed(self, tier: str) -> str:
        """The view link in the message this reader was sent."""
        personaliser = Personaliser(
            COMPOSITION.free if tier == "free" else COMPOSITION.paid,
            send_id=self.send_id,
            signer=signer,
            tracker_url=TRACKER,
        )
        return personaliser.values(self.readers[tier])["view_url"]


@pytest.fixture
def send(engine: Engine, redis_db: redis.Redis) -> Send:
    with db.session(engine) as session:
        save_post(session, parse_post(POST), source=str(POST))
        readers = {
            tier: manage.add(
                session, f"{tier}@example.com", name=f"{tier.title()} O'Reader", tier=tier
            )
            for tier in TIERS
        }
        send_id = sends.create(session, "the-harbour-in-numbers", "all", COMPOSITION, batch_size=10)
        # Delivered a minute ago, so the view is not taken for a scanner's prefetch.
        session.execute(
            update(DeliveryRow)
            .where(DeliveryRow.send_id == send_id)
            .values(state="sent", sent_at=utcnow() - dt.timedelta(minutes=1))
        )
    return Send(
        engine,
        send_id,
        {tier: Recipient(r.id, r.email, r.name) for tier, r in readers.items()},
    )


def app(engine: Engine, buffer: RedisBuffer) -> ASGIApp:
    return create_app(
        engine=engine,
        signer=signer,
        site_url=PUB.site_url,
        buffer=buffer,
        flush_interval=3600.0,
        tracker_url=TRACKER,
    )


def test_each_reader_sees_their_own_variant_filled_in_without_a_pixel(send: Send) -> None:
    buffer = RedisBuffer(REDIS_URL)
    with running(app(send.engine, buffer)) as client:
        pages = {}
        for tier in TIERS:
            url = send.emailed(tier)
            assert url == f"{TRACKER}/v/{send.token(tier)}"
            answer = client.get(url.removeprefix(TRACKER), headers={"User-Agent": CHROME})
            assert answer.status_code == 200
            assert answer.headers["content-type"] == "text/html; charset=utf-8"
            assert "no-store" in answer.headers["cache-control"]
            assert "img-src https: http:" in answer.headers["content-security-policy"]
            pages[tier] = answer.text
    free, paid = pages["free"], pages["paid"]
    assert "Keep reading with a 7-day free trial" in free and "How I counted" not in free
    assert "Keep reading" not in paid and "How I counted" in paid
    for tier, page in pages.items():
        reader = send.readers[tier]
        assert page.lower().startswith("<!doctype html>")
        assert f"Hello {html.escape(reader.name or '')}, and thank you" in page
        assert f"because {reader.email} subscribed" in page
        assert "@@" not in page and "{{" not in page
        assert "/o/" not in page and "View in browser" not in page  # no pixel, no link to itself
        # Its links are the reader's own tracked links, so clicks count as in the email.
        for token in re.findall(rf'href="{re.escape(TRACKER)}/c/([\w-]+)"', page):
            parsed = signer.verify(token)
            assert parsed is not None and parsed.kind is Kind.CLICK
            assert (parsed.send_id, parsed.subscriber_id) == (send.send_id, reader.subscriber_id)
        assert f"{TRACKER}/u/{send.token(tier, Kind.UNSUBSCRIBE)}" in page
    # Each view is an open by a person (written by the app's last flush as it stopped).
    with db.session(send.engine) as session:
        events = session.scalars(select(TrackingEventRow)).all()
    assert sorted((e.kind, e.classification, e.subscriber_id) for e in events) == sorted(
        ("open", "human", r.subscriber_id) for r in send.readers.values()
    )


def test_bad_tokens_and_readers_outside_the_send_get_a_404(send: Send) -> None:
    good = send.token("free")
    other_send = signer.sign(Token(Kind.VIEW, send.send_id + 1, send.readers["free"].subscriber_id))
    stranger = signer.sign(Token(Kind.VIEW, send.send_id, 999_999))
    bad = [
        good[:-3] + ("AAA" if good[-3:] != "AAA" else "BBB"),  # tampered
        Signer(["another-secret-0123456789"]).sign(Token(Kind.VIEW, send.send_id, 1)),
        signer.sign(Token(Kind.VIEW, 0, send.readers["free"].subscriber_id)),  # a preview's
        send.token("free", Kind.OPEN),  # another route's kind
        other_send,
        stranger,
        "not-a-token",
    ]
    buffer = RedisBuffer(REDIS_URL)
    with running(app(send.engine, buffer)) as client:
        answers = [client.get(f"/v/{token}") for token in bad]
        with db.session(send.engine) as session:  # an erased reader's ledger rows go with them
            session.execute(
                delete(SubscriberRow).where(SubscriberRow.id == send.readers["paid"].subscriber_id)
            )
        answers.append(client.get(f"/v/{send.token('paid')}"))
    assert [a.status_code for a in answers] == [404] * len(answers)
    assert all(a.text == "not found\n" for a in answers)
    assert flush_once(send.engine, buffer) == 0
    with db.session(send.engine) as session:
        assert session.scalars(select(TrackingEventRow)).all() == []


def test_without_a_tracker_url_there_is_no_web_version(send: Send) -> None:
    plain = create_app(
        engine=send.engine,
        signer=signer,
        site_url=PUB.site_url,
        buffer=RedisBuffer(REDIS_URL),
        flush_interval=3600.0,
    )
    with running(plain) as client:
        assert client.get(f"/v/{send.token('free')}").status_code == 404


def test_with_the_database_down_a_view_is_a_503_and_counts_nothing(
    send: Send, tmp_path: Path
) -> None:
    down = create_engine(f"sqlite:///{tmp_path}/no/such/folder/mailer.db")
    buffer = RedisBuffer(REDIS_URL)
    with running(app(down, buffer)) as client:
        answer = client.get(f"/v/{send.token('free')}")
    assert (answer.status_code, answer.headers["retry-after"]) == (503, "5")
    assert flush_once(send.engine, buffer) == 0
