"""Scheduled sends: started on time by beat's clock, missed past the grace, started once."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from mailer import db, sends
from mailer.compose import Publication, compose
from mailer.config import load_settings
from mailer.db.models import SubscriberRow, utcnow
from mailer.db.posts_repo import save_post
from mailer.posts import parse_post_text

GRACE = dt.timedelta(hours=1)


@pytest.fixture
def schedule(engine: Engine) -> Iterator[Engine]:
    with db.session(engine) as session:
        session.add(
            SubscriberRow(email="a@example.com", email_key="a@example.com", domain="example.com")
        )
        post = parse_post_text("---\ntitle: On Time\n---\n\nHello.\n", "post.md")
        save_post(session, post, source="post.md")
    yield engine


def scheduled(engine: Engine, at: dt.datetime) -> int:
    settings = load_settings({}, env_file=None)
    with db.session(engine) as session:
        post = parse_post_text("---\ntitle: On Time\n---\n\nHello.\n", "post.md")
        composition = compose(post, Publication.from_settings(settings))
        return sends.create(session, "on-time", "all", composition, batch_size=10, scheduled_at=at)


def start_due(engine: Engine) -> dict[int, list[int]]:
    with db.session(engine) as session:
        return sends.start_due(session, grace=GRACE)


def status(engine: Engine, send_id: int) -> sends.SendInfo:
    with db.session(engine) as session:
        return sends.show(session, send_id)


def test_a_due_send_starts_once_and_a_later_one_waits(
    schedule: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    now = utcnow()
    due = scheduled(schedule, now - dt.timedelta(seconds=2))
    later = scheduled(schedule, now + dt.timedelta(hours=1))
    with caplog.at_level(logging.INFO, logger="mailer.sends"):
        assert start_due(schedule) == {due: [0]}
        assert start_due(schedule) == {}  # a second scheduler finds nothing more to start
    assert status(schedule, due).status == "sending"
    assert status(schedule, later).status == "scheduled"
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert f"send {due} (on-time) started" in caplog.text


def test_a_send_found_late_starts_with_a_warning(
    schedule: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    late = scheduled(schedule, utcnow() - dt.timedelta(minutes=12))
    with caplog.at_level(logging.WARNING, logger="mailer.sends"):
        assert start_due(schedule) == {late: [0]}
    assert f"send {late} (on-time) started 12m0" in caplog.text


def test_a_send_found_past_the_grace_is_missed(
    schedule: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    missed = scheduled(schedule, utcnow() - dt.timedelta(hours=2))
    with caplog.at_level(logging.WARNING, logger="mailer.sends"):
        assert start_due(schedule) == {}
    info = status(schedule, missed)
    assert info.status == "missed" and "no scheduler started it in time" in (info.error or "")
    assert f"send {missed} (on-time) missed: found 2h00m0" in caplog.text
    assert "MAILER_SCHEDULE_GRACE (1h00m00s)" in caplog.text
