"""Scheduled sends: started on time by beat's clock, missed past the grace, started once."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from smtp_servers import Slow, serve, wait_until
from sqlalchemy import Engine
from workers import (
    Processes,
    RedisServer,
    add_readers,
    environment,
    run_mailer,
    start_beat,
    start_worker,
)

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


def test_a_send_due_while_the_worker_is_busy_starts_on_time_once_with_two_beats(
    tmp_path: Path,
) -> None:
    db_url = f"sqlite:///{tmp_path / 'mailer.db'}"
    db.upgrade(db_url)
    engine = db.connect(db_url)
    add_readers(engine, 800)
    (tmp_path / "busy.md").write_text("---\ntitle: Busy\n---\n\nA long send.\n")
    (tmp_path / "due.md").write_text("---\ntitle: Due\n---\n\nOn time.\n")
    # One message a second per connection: both worker processes stay busy for the whole test.
    with RedisServer(tmp_path) as broker, serve(Slow(1.0)) as smtp, Processes() as processes:
        env = environment(db_url, broker.url, smtp.settings().port, MAILER_BATCH_SIZE="200")
        for post in ("busy.md", "due.md"):
            run_mailer(env, tmp_path, "posts", "add", post)
        start_worker(processes, env, tmp_path / "worker.log")
        beats = [tmp_path / "beat1", tmp_path / "beat2"]
        for directory in beats:
            directory.mkdir()
            start_beat(processes, env, directory / "beat.log")
        run_mailer(env, tmp_path, "send", "busy", "--segment", "all", "--yes")
        smtp.handler.wait_for(20, timeout=30)  # the worker is busy now
        at = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=5)
        due = int(
            run_mailer(
                env,
                tmp_path,
                "send",
                "due",
                "--segment",
                "all",
                "--yes",
                "--at",
                at.strftime("%Y-%m-%dT%H:%M:%S"),
            )
        )
        assert status(engine, due).status == "scheduled"

        def started() -> bool:
            return status(engine, due).status == "sending"

        wait_until(started, timeout=(at - dt.datetime.now(dt.UTC)).total_seconds() + 20)
        started_at = status(engine, due).started_at
        assert started_at is not None and started_at - at < dt.timedelta(seconds=20)
        assert started_at >= at
    engine.dispose()
    lines = "".join((d / "beat.log").read_text() for d in beats)
    assert lines.count(f"send {due} (due) started") == 1, lines
