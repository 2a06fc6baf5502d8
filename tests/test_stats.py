"""``mailer stats`` on a hand-built ledger and events, on both backends."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import sqlite_only
from helpers import add_post, add_send, assert_one_error_line, ledger_row, mailer
from sqlalchemy import Engine, update
from typer.testing import CliRunner

from mailer import db, subscribers
from mailer.cli import app
from mailer.db.models import (
    BounceEventRow,
    DeliveryRow,
    SendVariantRow,
    TrackingEventRow,
)
from mailer.errors import NotFoundError
from mailer.stats import Counts, Hour, SendStats, resolve, send_stats, timeline
from mailer.vocabulary import DeliveryState, Variant

START = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)
KEYS = {
    "recipients",
    "sent",
    "failed",
    "bounced",
    "unique_opens",
    "human_opens",
    "machine_opens",
    "unique_clicks",
    "unsubscribes",
    "trial_starts",
    "conversions",
    "open_rate",
    "click_rate",
    "conversion_rate",
    "soft_bounces",
    "complaints",
    "complaint_rate",
}

HARD_BOUNCE = "550 5.1.1 No such user"  # delivery marks this one bounced, and no other
# (variant, state, last reply, events as (kind, classification, minutes after the start))
READERS: list[tuple[Variant, DeliveryState, str | None, list[tuple[str, str | None, int]]]] = [
    # human open and click, then converted from a trial (a trial reader gets the paid variant)
    (
        "paid",
        "sent",
        "250 ok",
        [("open", "human", 5), ("click", "human", 6), ("converted", None, 90)],
    ),
    # a click without an open (images off): a human open all the same; started a trial
    ("free", "sent", "250 ok", [("click", "human", 30), ("trial_started", None, 31)]),
    ("free", "sent", "250 ok", [("open", "machine", 1), ("open", "machine", 2)]),  # machine only
    ("free", "sent", "250 ok", [("open", "machine", 1), ("open", "human", 150)]),  # both
    ("free", "sent", "250 ok", [("click", "machine", 1)]),  # a link scanner: nothing counts
    ("paid", "sent", "250 ok", [("open", "human", 61), ("unsubscribe", None, 62)]),
    ("free", "failed", HARD_BOUNCE, []),
    ("free", "failed", "553 sender news@example.com refused: 5.7.1 Sender rejected", []),
    ("paid", "failed", "gave up after 6 attempts: 421 try later", []),
    ("paid", "queued", None, []),
]


@dataclass
class Sent:
    engine: Engine
    send_id: int
    older_send_id: int


@pytest.fixture
def sent(engine: Engine) -> Sent:
    with db.session(engine) as s:
        post = add_post(s, "harbour", audience="paid")
        older = add_send(s, post, status="done", started_at=START)
        send = add_send(s, post, status="done", started_at=START)
        for variant in ("free", "paid"):
            s.add(
                SendVariantRow(
                    send_id=send.id,
                    variant=variant,
                    subject="The Harbour",
                    nonce="n",
                    template=b"",
                    html_size={"free": 41_000, "paid": 104_900}[variant],
                )
            )
        readers = []
        for n, (variant, state, reply, events) in enumerate(READERS):
            reader = subscribers.add(s, f"r{n}@example.com").id
            readers.append(reader)
            ledger_row(
                s,
                send.id,
                reader,
                variant=variant,
                state=state,
                last_reply=reply,
                bounced=reply == HARD_BOUNCE,
            )
            for kind, classification, minutes in events:
                s.add(
                    TrackingEventRow(
                        kind=kind,
                        send_id=send.id,
                        subscriber_id=reader,
                        classification=classification,
                        at=START + dt.timedelta(minutes=minutes),
                    )
                )
            # Another send's events, and a second open of the same reader, change nothing.
            s.add(TrackingEventRow(kind="click", send_id=older.id, subscriber_id=reader,
                                   classification="human", at=START))  # fmt: skip
        s.add(TrackingEventRow(kind="open", send_id=send.id, subscriber_id=999_999,
                               classification="human", at=START))  # fmt: skip  # not in the ledger
        # What came back later (mailer bounces): a hard bounce of a message the server took,
        # a soft bounce, complaints (one reader twice), and another send's soft bounce.
        s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.send_id == send.id, DeliveryRow.subscriber_id == readers[4])
            .values(bounced=True)
        )
        for kind, n, send_id in [
            ("hard", 4, send.id),
            ("soft", 3, send.id),
            ("soft", 2, older.id),
            ("complaint", 2, send.id),
            ("complaint", 5, send.id),
            ("complaint", 5, send.id),
        ]:
            s.add(BounceEventRow(kind=kind, subscriber_id=readers[n], send_id=send_id,
                                 message_key=f"{kind}{n}", at=START))  # fmt: skip
        return Sent(engine, send.id, older.id)


def test_numbers_overall_and_by_variant(sent: Sent) -> None:
    with db.session(sent.engine) as s:
        found = send_stats(s, sent.send_id)
    assert found.html_bytes == {"free": 41_000, "paid": 104_900}
    assert found.by_variant["free"] == Counts(
        recipients=6,
        sent=4,
        failed=2,
        bounced=2,  # the 550 (not the refused sender), and one that came back later
        soft_bounces=1,
        complaints=1,
        unique_opens=3,  # click-only, machine-only, both
        human_opens=2,  # the click implies one; machine-only does not
        machine_opens=1,
        unique_clicks=1,
        unsubscribes=0,
        trial_starts=1,
        conversions=0,
    )
    assert found.by_variant["paid"] == Counts(
        recipients=4,
        sent=2,
        failed=1,
        bounced=0,  # gave up after 4xx: not a bounce
        complaints=1,  # two reports of one reader
        unique_opens=2,
        human_opens=2,
        machine_opens=0,
        unique_clicks=1,
        unsubscribes=1,
        trial_starts=0,
        conversions=1,
    )
    total = found.total
    assert (total.recipients, total.sent, total.human_opens, total.unique_clicks) == (10, 6, 4, 2)
    assert (total.open_rate, total.click_rate, total.conversion_rate) == (0.6667, 0.3333, 0.1667)
    assert (total.complaints, total.complaint_rate, total.complaints_over_limit) == (
        2,
        0.333333,
        True,
    )
    assert found.as_json()["subject"] == "The Harbour"


def test_timeline_counts_readers_per_hour(sent: Sent) -> None:
    with db.session(sent.engine) as s:
        hours = timeline(s, sent.send_id)
    assert len(hours) == 24  # a day at least, charted as it is
    assert hours[0] == Hour(0, human_opens=1, machine_opens=2, clicks=2)  # not 999999
    assert hours[1] == Hour(1, human_opens=1)
    assert hours[2] == Hour(2, human_opens=1)
    assert hours[3:] == [Hour(h) for h in range(3, 24)]


def test_slugs_name_the_latest_send_that_is_no_test(sent: Sent) -> None:
    with db.session(sent.engine) as s:
        assert resolve(s, "harbour") == sent.send_id
        assert resolve(s, str(sent.older_send_id)) == sent.older_send_id
        with pytest.raises(NotFoundError, match="'nope'"):
            resolve(s, "nope")
        with pytest.raises(NotFoundError, match="'424242'"):
            resolve(s, "424242")
        add_post(s, "draft")
        with pytest.raises(NotFoundError, match="'draft' has not been sent"):
            resolve(s, "draft")


def test_cli_json_table_and_html(
    sent: Sent, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no developer's .env
    env = {"MAILER_DATABASE_URL": db_url}
    runner = CliRunner()

    result = runner.invoke(app, ["stats", "harbour", "--json"], env=env)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)  # one JSON document, nothing else
    assert set(document) >= KEYS | {"send_id", "slug", "subject", "by_variant"}
    assert set(document["by_variant"]) == {"free", "paid"}
    for variant in ("free", "paid"):
        assert set(document["by_variant"][variant]) == KEYS
    assert (document["send_id"], document["slug"], document["human_opens"]) == (
        sent.send_id,
        "harbour",
        4,
    )

    table = runner.invoke(app, ["stats", str(sent.send_id)], env=env)
    assert table.exit_code == 0, table.output
    assert "human opens" in table.stdout and "66.7%" in table.stdout
    assert re.search(r"html size\s.*\b40 KB\s.*\b102 KB", table.stdout)

    report = tmp_path / "out" / "report.html"
    result = runner.invoke(app, ["stats", "harbour", "--html", str(report), "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["send_id"] == sent.send_id
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "<svg" in page and "<polyline" in page
    assert "The Harbour" in page and "Free → trial → paid" in page
    assert 'class="card alert"' in page and "over Gmail&#39;s 0.30% limit" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert not re.search(r"<(script|link|img|iframe)\b|@import|url\(", page, re.I)
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]  # no temp file left


@pytest.mark.subprocess
@sqlite_only
def test_cli_errors_name_what_is_wrong(sent: Sent, db_url: str, tmp_path: Path) -> None:
    env = {"MAILER_DATABASE_URL": db_url}
    assert_one_error_line(mailer(tmp_path, "stats", "no-such-post", **env), "'no-such-post'")
    (tmp_path / "blocker").write_text("a file, not a folder", encoding="utf-8")
    unwritable = tmp_path / "blocker" / "report.html"
    assert_one_error_line(
        mailer(tmp_path, "stats", "harbour", "--html", str(unwritable), **env), str(unwritable)
    )
    assert_one_error_line(
        mailer(tmp_path, "stats", "harbour", "--html", str(tmp_path), **env), str(tmp_path)
    )


@pytest.mark.parametrize(("complaints", "flagged"), [(0, False), (3, False), (4, True)])
def test_the_report_flags_complaints_over_gmails_limit(complaints: int, flagged: bool) -> None:
    from mailer.report import render_html

    counts = Counts(recipients=1000, sent=1000, complaints=complaints)
    found = SendStats(1, "s", "S", "S", "done", None, {"free": counts, "paid": Counts()})
    assert found.as_json()["complaint_rate"] == complaints / 1000
    page = render_html(found, [], generated=START)
    assert ('class="card alert"' in page) == flagged
    assert ("limit" in page) == flagged
