"""Inbound mail: bounces, complaints, unsubscribes by mail and auto-replies read back in, by
``mailer bounces process`` (files) and ``mailer bounces serve`` (SMTP), on both backends.

The published samples are in tests/data/bounces (see its README); the VERP cases sign real
tokens for a hand-built ledger. The real Postfix run is in test_postfix.py.
"""

from __future__ import annotations

import datetime as dt
import json
import mailbox
import os
import re
import shutil
import smtplib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import pytest
from conftest import sqlite_only
from helpers import (
    BIN,
    add_post,
    add_send,
    assert_one_error_line,
    dev_env,
    free_port,
    ledger_row,
    mailer,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select, update
from workers import Processes

from mailer import db, subscribers
from mailer.db.models import (
    BounceEventRow,
    DeliveryRow,
    InboundMessageRow,
    SubscriberEventRow,
    SubscriberRow,
    TrackingEventRow,
)
from mailer.inbound import Ours, Policy, Tally, handle
from mailer.inbound.sources import read
from mailer.inbound.verdict import MAX_MESSAGE_BYTES, SCAN_BYTES, judge
from mailer.stats import send_stats
from mailer.tokens import Kind, Signer, Token
from mailer.vocabulary import InboundOutcome

DATA = Path(__file__).parent / "data" / "bounces"
SECRET = "inbound-test-secret-key"
SIGNER = Signer([SECRET])
OURS = Ours(SIGNER, domain="example.com", feedback="feedback@example.com")
POLICY = Policy(OURS, soft_bounce_limit=3, soft_bounce_days=30)
NOW = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
OUTCOMES = set(get_args(InboundOutcome))
KEYS = ["processed", "hard", "soft", "complaints", "unsubscribes", "auto_replies", "unmatched"]

# flufl.bounce's samples: (file, the addresses it reports, soft). As flufl.bounce's own tests
# list them, but for dsn_02, which says Action: failed with Status 4.4.7: the status decides.
FLUFL: list[tuple[str, list[str], bool]] = [
    ("postfix_01.txt", ["xxxxx@local.ie"], False),
    ("postfix_02.txt", ["yyyyy@digicool.com"], False),
    ("postfix_03.txt", ["ttttt@ggggg.com"], False),
    ("postfix_04.txt", ["userx@mail1.example.com"], False),
    ("postfix_05.txt", ["userx@example.net"], False),
    ("exim_01.txt", ["userx@its.example.nl"], False),
    ("sendmail_01.txt", ["zzzzz@shaft.coal.nl", "zzzzz@nfg.nl"], False),
    ("simple_01.txt", ["bbbsss@example.com"], False),
    ("hotpop_01.txt", ["userx@example.com"], False),
    ("newmailru_01.txt", ["zzzzz@newmail.ru"], False),
    ("simple_03.txt", ["userx@example.za"], True),
    ("simple_21.txt", ["userx@example.com"], True),
    ("groupwise_01.txt", ["userx@example.edu"], False),
    ("yale_01.txt", ["userx@cs.yale.edu", "userx@yale.edu"], False),
    ("dsn_01.txt", ["userx@example.com"], False),
    ("dsn_02.txt", ["zzzzz@example.uk"], True),
    ("dsn_03.txt", ["userx@example.be"], False),
    ("dsn_04.txt", ["userx@example.ch"], False),
    ("dsn_05.txt", ["userx@example.cz"], True),
    ("dsn_06.txt", ["userx@example.com"], True),
    ("dsn_07.txt", ["userx@example.nz"], True),
    ("dsn_08.txt", ["userx@example.de"], True),
    ("dsn_09.txt", ["userx@example.com"], False),
    ("dsn_10.txt", ["anne.person@dom.ain"], False),
    ("dsn_11.txt", ["joem@example.com"], False),
    ("dsn_12.txt", ["userx@example.jp"], False),
    ("dsn_13.txt", ["userx@example.com"], False),
    ("dsn_14.txt", ["userx@example.com.dk"], False),
    ("dsn_15.txt", ["userx@example.com"], False),
    ("dsn_16.txt", ["userx@example.com"], False),
    ("dsn_17.txt", ["userx@example.fi"], True),
    ("dsn_18.txt", ["email@replaced.net"], False),
    ("microsoft_01.txt", ["userx@example.com"], False),
    ("microsoft_02.txt", ["userx@example.com"], False),
    ("microsoft_04.txt", ["userx@example.com"], False),
    ("smtp32_01.txt", ["userx@example.ph"], False),
    ("qmail_01.txt", ["userx@example.de"], False),
    ("qmail_02.txt", ["userx@example.com"], False),
    ("qmail_03.txt", ["userx@example.jp"], False),
    ("qmail_04.txt", ["userx@example.au"], False),
    ("qmail_05.txt", ["userx@example.com"], False),
    ("qmail_06.txt", ["ntl@xxx.com"], False),
    ("qmail_07.txt", ["user@example.net"], False),
    ("llnl_01.txt", ["user1@example.gov"], False),
    ("netscape_01.txt", ["aaaaa@corel.com", "bbbbb@corel.com"], False),
    ("yahoo_01.txt", ["userx@example.com"], False),
    ("yahoo_11.txt", ["bad_user@aol.com"], False),
    ("sina_01.txt", ["userx@sina.com", "usery@sina.com"], False),
    ("aol_01.txt", ["screenname@aol.com"], False),
    ("caiwireless_01.txt", ["userx@example.com"], False),
]
# Ours, after published formats: (file, outcome, address it names).
SAMPLES = [
    ("gmail-5.1.1.eml", "hard", "gone.reader@gmail.com"),
    ("office365-5.1.10.eml", "hard", "no.such.person@outlook.com"),
    ("exim4-failed.eml", "hard", "ex.reader@readers.example"),
    ("qmail-failed.eml", "hard", "q.reader@oldhost.example"),
    ("yahoo-deferred-4.7.0.eml", "soft", "slow.reader@yahoo.com"),
    ("arf-rfc5965.eml", "complaint", "user@example.com"),
    ("ooo-exchange.eml", "auto_reply", None),
    ("vacation-precedence.eml", "auto_reply", None),
]


def assert_read_as_listed(raw: bytes, name: str, addresses: list[str], soft: bool) -> None:
    """``raw`` is judged as ``FLUFL`` lists its sample: hard or soft, and the same addresses."""
    verdict = judge(raw, OURS)
    assert verdict.outcome == ("soft" if soft else "hard"), name
    assert {a for a, _ in verdict.addresses} == {a.lower() for a in addresses}, name


def test_every_published_sample_is_read_as_flufl_bounce_reads_it() -> None:
    listed = {name for name, _, _ in FLUFL}
    assert listed == {p.name for p in (DATA / "flufl").glob("*.txt")}
    for name, addresses, soft in FLUFL:
        assert_read_as_listed((DATA / "flufl" / name).read_bytes(), name, addresses, soft)
    for name, outcome, address in SAMPLES:
        verdict = judge((DATA / name).read_bytes(), OURS)
        assert verdict.outcome == outcome, name
        assert [a for a, _ in verdict.addresses] == ([address] if address else []), name


@pytest.mark.parametrize(
    ("change", "replacement"),
    [("none", b""), ("8-bit", b"From: \xc3\x89quipe Postmaster <postmaster@mx.example>\n")],
)
def test_a_bounce_without_a_plain_from_header_is_read_all_the_same(
    change: str, replacement: bytes
) -> None:
    # One of flufl.bounce's detectors fails on a message without From, another on raw 8-bit
    # bytes in it, and one failure ends every detector's turn: 20 and 35 of these samples went
    # unread. Four of them are known by their sender (AOL, Sina, Yahoo, Yale), which is gone.
    by_sender = {"aol_01.txt", "sina_01.txt", "yahoo_11.txt", "yale_01.txt"}
    for name, addresses, soft in FLUFL:
        raw = (DATA / "flufl" / name).read_bytes()
        changed = re.sub(rb"(?mi)^From:.*\n(?:[ \t].*\n)*", replacement, raw, count=1)
        assert changed != raw, name
        if name in by_sender:
            continue
        assert_read_as_listed(changed, f"{name}, From {change}", addresses, soft)


def test_a_part_described_in_8_bit_bytes_hides_no_bounce() -> None:
    # A part before Postfix's notification, described in raw UTF-8 as a localised server
    # might: the detector that reads each part's description failed on it, and with it all.
    for name, addresses, soft in FLUFL:
        if not name.startswith("postfix_"):
            continue
        raw = (DATA / "flufl" / name).read_bytes()
        first = raw.index(b"\n--", raw.index(b"boundary=")) + 1
        boundary = raw[first : raw.index(b"\n", first)]
        part = boundary + b"\nContent-Description: R\xc3\xa9sum\xc3\xa9\n\nsee below\n\n"
        assert_read_as_listed(raw[:first] + part + raw[first:], name, addresses, soft)


def test_a_huge_message_is_read_as_its_start_says() -> None:
    # Each sample with 1.8 MB after it, as a returned original with attachments would be: the
    # heuristics read only the first SCAN_BYTES, and find what they found in the sample alone.
    filler = b"".join(b"%d quick brown foxes jump over the lazy dog\n" % i for i in range(40_000))
    assert len(filler) > 4 * SCAN_BYTES
    for name, addresses, soft in FLUFL:
        raw = (DATA / "flufl" / name).read_bytes()
        assert_read_as_listed(raw + filler, name, addresses, soft)
    for name, outcome, _ in SAMPLES:
        assert judge((DATA / name).read_bytes() + filler, OURS).outcome == outcome, name
    assert judge(b"Subject: big\n\n" + filler * 5, OURS).outcome == "unmatched"
    # That is the bound: a bounce's explanation after SCAN_BYTES of something else goes unread.
    head, _, body = (DATA / "qmail-failed.eml").read_bytes().partition(b"\n\n")
    assert judge(head + b"\n\n" + body, OURS).outcome == "hard"
    assert judge(head + b"\n\n" + filler + body, OURS).outcome == "unmatched"


def test_each_message_is_read_up_to_what_serve_takes(tmp_path: Path) -> None:
    message = b"Subject: big\n\n" + (b"x" * 79 + b"\n") * (MAX_MESSAGE_BYTES // 80 + 1)
    (tmp_path / "big.eml").write_bytes(message)
    (tmp_path / "big.mbox").write_bytes(b"From MAILER-DAEMON Tue Dec  1 09:00:00 2026\n" + message)
    for sub in ("cur", "new", "tmp"):
        (tmp_path / "box" / sub).mkdir(parents=True)
    (tmp_path / "box" / "new" / "1").write_bytes(message)
    for name in ("big.eml", "big.mbox", "box"):
        with read([tmp_path / name]) as items:
            assert [item.load() for item in items] == [message[:MAX_MESSAGE_BYTES]], name


@dataclass
class Ledger:
    engine: Engine
    send_id: int
    readers: dict[str, int]  # address → id

    def token(self, kind: Kind, address: str) -> str:
        return SIGNER.sign(Token(kind, self.send_id, self.readers[address]))

    def verp(self, address: str) -> str:
        return f"bounces+{self.token(Kind.BOUNCE, address)}@example.com"

    def unsubscribe(self, address: str) -> str:
        return f"unsubscribe+{self.token(Kind.UNSUBSCRIBE, address)}@example.com"

    def status(self, address: str) -> str:
        with db.session(self.engine) as s:
            found = s.get(SubscriberRow, self.readers[address])
            assert found is not None
            return found.status

    def ledger_bounced(self, address: str) -> bool:
        with db.session(self.engine) as s:
            return bool(
                s.scalar(
                    select(DeliveryRow.bounced).where(
                        DeliveryRow.send_id == self.send_id,
                        DeliveryRow.subscriber_id == self.readers[address],
                    )
                )
            )

    def rows(self) -> tuple[int, ...]:
        """How many rows every table inbound mail writes holds: unchanged means nothing done."""
        with db.session(self.engine) as s:
            return tuple(
                int(s.scalar(select(func.count()).select_from(table)) or 0)
                for table in (
                    InboundMessageRow,
                    BounceEventRow,
                    SubscriberEventRow,
                    TrackingEventRow,
                )
            )


READERS = ["ann@readers.example", "bob@readers.example", "cy@readers.example", "di@readers.example"]


@pytest.fixture
def ledger(engine: Engine) -> Ledger:
    """A send to four readers (and the published samples' readers), all delivered."""
    published = [a for _, addresses, _ in FLUFL for a in addresses]
    published += [a for _, _, a in SAMPLES if a]
    with db.session(engine) as s:
        send = add_send(s, add_post(s, "harbour"), status="done", started_at=NOW)
        readers = {}
        for address in dict.fromkeys(a.lower() for a in READERS + published):
            reader = subscribers.add(s, address).id
            readers[address] = reader
            ledger_row(s, send.id, reader, message_id=f"<sample.{send.id}.{reader}@example.com>")
        return Ledger(engine, send.id, readers)


def dsn(to: str, recipient: str, status: str, *, action: str = "failed", mid: str = "") -> bytes:
    """A delivery status notification as Postfix writes one, to the return path ``to``."""
    return (
        f"From: Mail Delivery System <MAILER-DAEMON@mx.readers.example>\n"
        f"To: {to}\nSubject: Undelivered Mail Returned to Sender\n"
        f"Message-Id: <dsn.{mid or status + recipient}@mx.readers.example>\n"
        "Auto-Submitted: auto-replied\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        "--B\nContent-Type: text/plain\n\nIt could not be delivered.\n\n"
        "--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.readers.example\n\n"
        f"Final-Recipient: rfc822; {recipient}\nAction: {action}\nStatus: {status}\n"
        f"Diagnostic-Code: smtp; {status[0]}50 {status} no\n\n"
        "--B\nContent-Type: text/rfc822-headers\n\nFrom: news@example.com\n"
        f"To: {recipient}\nSubject: Harbour\n\n--B--\n"
    ).encode()


def arf(to: str, original_from: str, recipient: str, *, kind: str = "abuse") -> bytes:
    """An RFC 5965 report, as a mailbox provider's feedback loop sends one."""
    return (
        f"From: fbl@isp.test\nTo: {to}\nSubject: complaint\nMessage-ID: <arf.{kind}@isp.test>\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="F"\n\n'
        "--F\nContent-Type: text/plain\n\nA complaint.\n\n"
        f"--F\nContent-Type: message/feedback-report\n\nFeedback-Type: {kind}\nUser-Agent: FBL/1\n"
        f"Version: 1\nOriginal-Mail-From: <{original_from}>\n"
        "Original-Rcpt-To: <redacted@isp.test>\n\n"
        f"--F\nContent-Type: message/rfc822\n\nFrom: news@example.com\nTo: {recipient}\n"
        "Subject: Harbour\n\nHello.\n--F--\n"
    ).encode()


def test_a_hard_bounce_by_its_verp_token_bounces_the_reader_and_the_ledger_row(
    ledger: Ledger,
) -> None:
    # The DSN names some other address (a forward): the token says whose message it was.
    raw = dsn(ledger.verp("ann@readers.example"), "ann.forwarded@elsewhere.example", "5.1.1")
    assert (
        handle(ledger.engine, raw, POLICY, [ledger.verp("ann@readers.example")], now=NOW) == "hard"
    )
    assert ledger.status("ann@readers.example") == "bounced"
    assert ledger.ledger_bounced("ann@readers.example")
    with db.session(ledger.engine) as s:
        event = s.scalars(select(SubscriberEventRow).where(SubscriberEventRow.new == "bounced"))
        assert [(e.old, e.send_id) for e in event] == [("active", ledger.send_id)]
        stats = send_stats(s, ledger.send_id).total
    assert (stats.bounced, stats.failed, stats.sent) == (1, 0, len(ledger.readers))

    before = ledger.rows()
    assert handle(ledger.engine, raw, POLICY, [ledger.verp("ann@readers.example")]) == "duplicate"
    assert ledger.rows() == before


def test_soft_bounces_suppress_a_reader_at_the_limit_within_the_window(ledger: Ledger) -> None:
    bob, cy = "bob@readers.example", "cy@readers.example"
    # Two 4.x.x bounces, 40 days apart, then two more: only three fall within 30 days.
    for n, day in enumerate((0, 40, 41)):
        raw = dsn(ledger.verp(bob), bob, "4.2.2", mid=f"bob{n}")
        at = NOW + dt.timedelta(days=day)
        assert handle(ledger.engine, raw, POLICY, now=at) == "soft"
        assert ledger.status(bob) == "active"
    # Postfix gives up on a 4xx with "Action: failed": the status decides, it is soft.
    raw = dsn(ledger.verp(bob), bob, "4.4.7", action="failed", mid="bob3")
    assert handle(ledger.engine, raw, POLICY, now=NOW + dt.timedelta(days=42)) == "soft"
    assert ledger.status(bob) == "bounced"
    assert not ledger.ledger_bounced(bob)  # soft: the message itself did not bounce

    raw = dsn(ledger.verp(cy), cy, "4.2.2", action="delayed")
    assert handle(ledger.engine, raw, POLICY, now=NOW) == "soft"
    with db.session(ledger.engine) as s:
        total = send_stats(s, ledger.send_id).total
    assert (total.soft_bounces, total.bounced) == (2, 0)


def test_a_complaint_makes_the_reader_complained_even_after_unsubscribing(
    ledger: Ledger,
) -> None:
    di = "di@readers.example"
    with db.session(ledger.engine) as s:
        subscribers.unsubscribe(s, di)
    # To the feedback address; the original's return path (a VERP token) names the reader.
    raw = arf("feedback@example.com", ledger.verp(di), "redacted")
    assert handle(ledger.engine, raw, POLICY, ["feedback@example.com"]) == "complaint"
    assert ledger.status(di) == "complained"
    # Not complaints: a "not-spam" report, and an authentication failure report.
    for kind in ("not-spam", "auth-failure"):
        raw = arf("feedback@example.com", ledger.verp("ann@readers.example"), "x", kind=kind)
        assert handle(ledger.engine, raw, POLICY) == "unmatched"
    assert ledger.status("ann@readers.example") == "active"
    with db.session(ledger.engine) as s:
        total = send_stats(s, ledger.send_id).total
    assert (total.complaints, total.complaint_rate) == (1, round(1 / len(ledger.readers), 6))


def test_mail_to_the_unsubscribe_address_unsubscribes_as_one_click_does(
    ledger: Ledger,
) -> None:
    cy = ledger.unsubscribe("cy@readers.example")
    raw = f"From: cy@readers.example\nTo: <{cy}>\nSubject: stop\nMessage-ID: <u1@r>\n\n".encode()
    assert handle(ledger.engine, raw, POLICY) == "unsubscribe"  # found by the To header
    assert ledger.status("cy@readers.example") == "unsubscribed"
    with db.session(ledger.engine) as s:
        total = send_stats(s, ledger.send_id).total
        events = s.scalars(select(TrackingEventRow.kind)).all()
    assert total.unsubscribes == 1 and events == ["unsubscribe"]
    # An out-of-office to it unsubscribes nobody; a token of another kind, or forged, no one.
    ann = ledger.unsubscribe("ann@readers.example")
    auto = f"To: {ann}\nAuto-Submitted: auto-replied\nMessage-ID: <u2@r>\n\naway\n".encode()
    assert handle(ledger.engine, auto, POLICY, [ann]) == "auto_reply"
    wrong_kind = ann.replace(
        ledger.token(Kind.UNSUBSCRIBE, "ann@readers.example"),
        ledger.token(Kind.OPEN, "ann@readers.example"),
    )
    forged = ann[:14] + ("A" if ann[14] != "A" else "B") + ann[15:]
    for address in (wrong_kind, forged):
        raw = f"To: {address}\nMessage-ID: <{address}>\n\nunsubscribe\n".encode()
        assert handle(ledger.engine, raw, POLICY) == "unmatched"
    assert ledger.status("ann@readers.example") == "active"


@pytest.mark.subprocess
def test_process_reads_eml_maildir_and_mbox_once(
    ledger: Ledger, db_url: str, tmp_path: Path
) -> None:
    env = {
        "MAILER_DATABASE_URL": db_url,
        "MAILER_SECRET_KEY": SECRET,
        "MAILER_FROM": "news@example.com",
    }
    maildir = mailbox.Maildir(tmp_path / "Maildir", create=True)
    for name, _, _ in FLUFL[:25]:
        maildir.add((DATA / "flufl" / name).read_bytes())
    mbox = mailbox.mbox(tmp_path / "bounces.mbox", create=True)
    for name, _, _ in FLUFL[25:]:
        mbox.add((DATA / "flufl" / name).read_bytes())
    mbox.close()  # written out and closed
    eml = tmp_path / "eml"
    eml.mkdir()
    for name, _, _ in SAMPLES:
        shutil.copy(DATA / name, eml / name)
    (eml / "unsubscribe.eml").write_bytes(
        f"To: {ledger.unsubscribe('ann@readers.example')}\nMessage-ID: <u@r>\n\nplease\n".encode()
    )
    bob = ledger.verp("bob@readers.example")
    # A success notice (an automatic message, no bounce); a person answering the return path.
    (eml / "delivered.eml").write_bytes(dsn(bob, "bob@readers.example", "2.0.0", action="failed"))
    (eml / "reply.eml").write_bytes(f"To: {bob}\nSubject: Re: Harbour\n\nLovely!\n".encode())
    paths = [str(tmp_path / "Maildir"), str(tmp_path / "bounces.mbox"), *map(str, eml.glob("*"))]
    with db.session(ledger.engine) as s:  # the Message-ID the Gmail sample returns
        s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.subscriber_id == ledger.readers["gone.reader@gmail.com"])
            .values(message_id="<sample.7.41@example.com>")
        )

    done = mailer(tmp_path, "bounces", "process", *paths, "--json", **env)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert list(found) == KEYS
    soft_flufl = sum(soft for _, _, soft in FLUFL)
    assert found == {
        "processed": len(FLUFL) + len(SAMPLES) + 3,
        "hard": len(FLUFL) - soft_flufl + 4,
        "soft": soft_flufl + 1,
        "complaints": 1,
        "unsubscribes": 1,
        "auto_replies": 3,
        "unmatched": 1,
    }
    assert ledger.status("gone.reader@gmail.com") == "bounced"
    assert ledger.ledger_bounced("gone.reader@gmail.com")  # its send: by the Message-ID
    assert not ledger.ledger_bounced("q.reader@oldhost.example")  # no Message-ID: no send
    assert ledger.status("q.reader@oldhost.example") == "bounced"
    assert ledger.status("user@example.com") == "complained"
    assert ledger.status("slow.reader@yahoo.com") == "active"
    assert ledger.status("ann@readers.example") == "unsubscribed"

    before = ledger.rows()
    again = mailer(tmp_path, "bounces", "process", *paths, "--json", **env)
    assert json.loads(again.stdout) == dict.fromkeys(KEYS, 0) | {"processed": found["processed"]}
    assert ledger.rows() == before
    text = mailer(tmp_path, "bounces", "process", paths[0], **env)
    assert text.stdout == "25 messages read: nothing new\n"


@pytest.mark.subprocess
@sqlite_only
def test_process_refuses_bad_paths_before_handling_anything(
    ledger: Ledger, db_url: str, tmp_path: Path
) -> None:
    env = {"MAILER_DATABASE_URL": db_url, "MAILER_SECRET_KEY": SECRET}
    good = tmp_path / "good.eml"
    good.write_bytes((DATA / "gmail-5.1.1.eml").read_bytes())
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.eml").write_bytes(b"")
    (tmp_path / "image.eml").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    (tmp_path / "notes.txt").write_text("just some notes\nnot mail\n")
    os.mkfifo(tmp_path / "pipe.eml")  # opened, it would wait for a writer forever
    (tmp_path / "zero.eml").symlink_to("/dev/zero")  # read, it would never end
    for box in ("dangling", "nested"):
        for sub in ("cur", "new", "tmp"):
            (tmp_path / box / sub).mkdir(parents=True)
        shutil.copy(good, tmp_path / box / "new" / "1.eml")
    (tmp_path / "dangling" / "new" / "gone.eml").symlink_to(tmp_path / "nowhere")
    (tmp_path / "nested" / "new" / "folder").mkdir()
    cases = {
        "missing.eml": ("missing.eml", "cannot read"),
        "folder": ("folder", "not a Maildir"),
        "empty.eml": ("empty.eml", "empty"),
        "image.eml": ("image.eml", "not an email message"),
        "notes.txt": ("notes.txt", "not an email message"),
        "pipe.eml": ("pipe.eml", "not a file"),
        "zero.eml": ("zero.eml", "not a file"),
        # The message in the Maildir that is wrong is named, not only its folder.
        "dangling": ("dangling/new/gone.eml", "cannot read"),
        "nested": ("nested/new/folder", "not a file"),
    }
    before = ledger.rows()
    for name, (named, reason) in cases.items():
        done = mailer(tmp_path, "bounces", "process", str(good), str(tmp_path / name), **env)
        assert_one_error_line(done, str(tmp_path / named), reason)
    assert ledger.rows() == before  # the good file, listed first, was not handled either
    assert ledger.status("gone.reader@gmail.com") == "active"


@pytest.mark.subprocess
@sqlite_only
def test_serve_takes_only_our_addresses_and_answers_after_the_commit(
    ledger: Ledger, db_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = dev_env(
        MAILER_DATABASE_URL=db_url,
        MAILER_SECRET_KEY=SECRET,
        MAILER_FROM="News <news@example.com>",
        MAILER_FEEDBACK_ADDRESS="fbl@example.com",
    )
    with Processes() as processes:
        server = processes.start(
            [str(BIN / "mailer"), "bounces", "serve", "--port", str(port)], env, tmp_path / "log"
        )
        client = _connect(port)
        client.ehlo()
        assert client.mail("")[0] == 250  # bounces come from the null sender
        ann, bob = ledger.verp("ann@readers.example"), ledger.verp("bob@readers.example")
        forged = ann.replace("bounces+", "bounces+x")
        for address, code in [
            ("someone@example.com", 550),
            ("bounces@example.com", 550),
            (forged, 550),
            (ann.replace("example.com", "example.org"), 550),
            ("feedback@example.com", 550),  # not the configured one
            (ann, 250),
            (ann.replace("@example.com", "@Example.COM"), 250),  # a domain has no case
            ("FBL@example.com", 250),
            (ledger.unsubscribe("cy@readers.example"), 250),
        ]:
            assert client.rcpt(address)[0] == code, address
        client.rset()
        client.sendmail("", [ann], dsn(ann, "ann@readers.example", "5.1.1"))
        assert ledger.status("ann@readers.example") == "bounced"  # recorded before the 250
        client.sendmail("", [bob], dsn(bob, "bob@readers.example", "4.2.2"))
        client.quit()
        server.terminate()
        assert server.wait(timeout=10) == 0
    log = (tmp_path / "log").read_text()
    assert "listening on 127.0.0.1" in log and ": hard" in log and ": soft" in log, log
    assert ledger.status("bob@readers.example") == "active"

    # The port is taken: one error line.
    with Processes() as processes:
        processes.start([str(BIN / "mailer"), "bounces", "serve", "--port", str(port)], env,
                        tmp_path / "log2")  # fmt: skip
        _connect(port).quit()
        done = subprocess.run(
            [str(BIN / "mailer"), "bounces", "serve", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert_one_error_line(done, f"--port {port}", "cannot listen")


def test_a_database_that_does_not_answer_gets_451_and_loses_nothing(tmp_path: Path) -> None:
    from aiosmtpd.controller import Controller

    from mailer.inbound.server import Handler

    broken = db.connect("postgresql+psycopg://nobody@127.0.0.1:1/none")  # nothing listens
    port = free_port()
    controller = Controller(Handler(broken, POLICY), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with smtplib.SMTP("127.0.0.1", port) as client:
            address = f"bounces+{SIGNER.sign(Token(Kind.BOUNCE, 1, 1))}@example.com"
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("", [address], dsn(address, "a@b.test", "5.1.1"))
            assert refused.value.smtp_code == 451
    finally:
        controller.stop()
        broken.dispose()


def test_the_tally_counts_each_outcome_under_its_key() -> None:
    tally = Tally.of(["hard", "hard", "duplicate", "auto_reply", "complaint", "unmatched"])
    assert tally == Tally(processed=6, hard=2, complaints=1, auto_replies=1, unmatched=1)


def _connect(port: int) -> smtplib.SMTP:
    deadline = time.monotonic() + 20
    while True:
        try:
            return smtplib.SMTP("127.0.0.1", port, timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@settings(max_examples=300, deadline=None)
@given(
    sample=st.sampled_from(sorted((DATA / "flufl").glob("*.txt")) + sorted(DATA.glob("*.eml"))),
    cut=st.floats(0, 1),
    junk=st.binary(max_size=200),
)
def test_any_mangled_message_gets_a_verdict_never_an_exception(
    sample: Path, cut: float, junk: bytes
) -> None:
    raw = sample.read_bytes()
    mangled = raw[: int(len(raw) * cut)] + junk + raw[int(len(raw) * cut) :]
    assert judge(mangled, OURS).outcome in OUTCOMES
    assert judge(junk, OURS, ["feedback@example.com"]).outcome in OUTCOMES
