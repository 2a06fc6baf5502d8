"""Scheduled sends: started on time by beat's clock, missed past the grace, started once."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DEV, assert_one_error_line, cli, free_port, run_mailer
from smtp_servers import Slow, serve, wait_until
from sqlalchemy import Engine, update
from workers import Processes, RedisServer, add_readers, environment, start_beat, start_worker

from mailer import db, sends
from mailer.compose import Publication
from mailer.config import load_settings
from mailer.db.models import SendRow, SubscriberRow, utcnow
from mailer.errors import InputError
from mailer.posts import parse_post_text
from mailer.posts.store import save_post
from mailer.when import parse_time

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
    settings = load_settings(DEV, env_file=None)
    with db.session(engine) as session:
        post = parse_post_text("---\ntitle: On Time\n---\n\nHello.\n", "post.md")
        publication = Publication.from_settings(settings)
        draft = sends.draft(session, post, "all", publication, scheduled_at=at)
        return sends.plan(session, draft, batch_size=10).send_id


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


@pytest.mark.subprocess
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
        # Far enough ahead that the command still finds it in the future on a loaded machine
        # (with 5 s, one CI run's `mailer send` started too late); the busy send lasts ~25 s.
        at = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=10)
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


NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("in 10m", NOW + dt.timedelta(minutes=10)),
        ("in 1h30m", NOW + dt.timedelta(minutes=90)),
        ("IN 2d", NOW + dt.timedelta(days=2)),
        ("2026-12-01T09:00:00+01:00", dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)),
        ("2026-12-01T09:00:00Z", dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)),
        ("2026-12-01 09:00", dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)),  # Paris, winter
        ("2027-07-01 09:00", dt.datetime(2027, 7, 1, 7, 0, tzinfo=dt.UTC)),  # Paris, summer
    ],
)
def test_times_an_author_can_give(text: str, expected: dt.datetime) -> None:
    assert parse_time(text, timezone="Europe/Paris", now=NOW) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tomorrow", "is not a time"),
        ("in ten minutes", "is not a time"),
        ("2026-13-01 09:00", "is not a time"),
        ("2026-11-30T11:00:00Z", "is in the past"),
        ("in 0s", "is in the past"),
    ],
)
def test_times_that_are_refused(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_time(text, timezone="UTC", now=NOW)


@pytest.mark.subprocess
def test_schedule_reschedule_miss_start_and_cancel_from_the_cli(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'mailer.db'}"
    db.upgrade(db_url)
    engine = db.connect(db_url)
    add_readers(engine, 3)
    (tmp_path / "post.md").write_text("---\ntitle: Later\n---\n\nHello.\n")
    with serve() as smtp:
        no_broker = f"redis://127.0.0.1:{free_port()}/0"  # delivered in the command itself
        env = environment(db_url, no_broker, smtp.settings().port)
        run_mailer(env, tmp_path, "posts", "add", "post.md")
        send = ["send", "later", "--segment", "all", "--yes"]

        at_noon = cli(env, tmp_path, *send, "--at", "at noon")
        assert_one_error_line(at_noon, "--at: 'at noon' is not a time")
        past = cli(env, tmp_path, *send, "--at", "2020-01-01T00:00Z")
        assert_one_error_line(past, "is in the past")
        with db.session(engine) as session:
            assert sends.list_sends(session) == []  # nothing half-made

        first = int(run_mailer(env, tmp_path, *send, "--at", "in 1h"))
        shown = run_mailer(env, tmp_path, "sends", "show", str(first))
        assert "— scheduled" in shown and "scheduled " in shown
        assert f"{first}  scheduled  for " in run_mailer(env, tmp_path, "sends", "list")
        resumed = cli(env, tmp_path, "sends", "resume", str(first))
        assert_one_error_line(resumed, "only when paused, failed or sending")

        run_mailer(env, tmp_path, "sends", "reschedule", str(first), "--at", "in 2h")
        later = status(engine, first).scheduled_at
        assert later is not None and later - utcnow() > dt.timedelta(minutes=110)

        second = int(run_mailer(env, tmp_path, *send, "--at", "in 1h"))
        with db.session(engine) as session:  # no beat ran for hours: both are missed
            session.execute(update(SendRow).values(scheduled_at=utcnow() - dt.timedelta(hours=3)))
        start_due(engine)
        assert status(engine, first).status == status(engine, second).status == "missed"

        run_mailer(env, tmp_path, "sends", "start", str(first), "--yes")
        assert status(engine, first).status == "done" and len(smtp.handler.messages) == 3
        run_mailer(env, tmp_path, "sends", "cancel", str(second))
        info = status(engine, second)
        assert info.status == "cancelled" and info.counts["skipped"] == 3

        third = run_mailer(env, tmp_path, *send, "--at", "in 2s", "--wait", "--json")
        assert json.loads(third)["status"] == "done" and len(smtp.handler.messages) == 6
    engine.dispose()
