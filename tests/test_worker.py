"""A real Celery worker on the real Redis: killed with SIGKILL mid-batch, then restarted;
and Flower watching its tasks.

The send completes with no reader missed and none mailed twice, except the messages in flight
at the kill: those are ``unknown``, and not resent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from conftest import own_redis
from smtp_servers import Slow, serve, wait_until
from sqlalchemy import Engine, select

from mailer import db, sends
from mailer.db.models import DeliveryRow, SubscriberRow

BROKER_DB = 11  # this suite's own Redis database; never 0
BROKER = f"redis://127.0.0.1:6379/{BROKER_DB}"
BIN = Path(sys.executable).parent
POST = "---\ntitle: Killed Mid Batch\n---\n\nHello {{ name }}.\n"
READERS = 120
CONCURRENCY = 2
BATCH_TASK = "mailer.deliver_batch"


@pytest.fixture
def broker() -> Iterator[str]:
    with own_redis(BROKER):
        yield BROKER


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(BIN / "celery"),
            "-A",
            "worker.app",
            "worker",
            "-c",
            "1",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "-n",
            f"test-{os.getpid()}@%h",
        ],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: SIGKILL takes the pool child too
    )


def add_readers(engine: Engine, count: int) -> None:
    with db.session(engine) as session:
        session.add_all(
            SubscriberRow(
                email=f"r{i}@example.com",
                email_key=f"r{i}@example.com",
                domain="example.com",
                tier="free",
            )
            for i in range(count)
        )


def environment(db_url: str, broker: str, smtp_port: int, **settings: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MAILER_")},
        "MAILER_DATABASE_URL": db_url,
        "MAILER_BROKER_URL": broker,
        "MAILER_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
        **settings,
    }


def run_mailer(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "mailer"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_sigkill_mid_batch_then_restart(
    engine: Engine, db_url: str, broker: str, tmp_path: Path
) -> None:
    add_readers(engine, READERS)
    (tmp_path / "post.md").write_text(POST)
    with serve(Slow(0.03)) as server:
        env = environment(
            db_url,
            broker,
            server.settings().port,
            MAILER_BATCH_SIZE="40",
            MAILER_SMTP_CONCURRENCY=str(CONCURRENCY),
            MAILER_BATCH_LEASE="2s",
        )

        run_mailer(env, tmp_path, "posts", "add", "post.md")
        log = tmp_path / "worker.log"
        worker = start_worker(env, log)
        try:
            send_id = int(
                run_mailer(env, tmp_path, "send", "killed-mid-batch", "--segment", "all", "--yes")
            )
            wait_until(lambda: len(server.handler.messages) >= 20, timeout=30)
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
            at_kill = len(server.handler.messages)
            assert at_kill < READERS, "the kill came too late to prove anything"

            worker = start_worker(env, log)

            def finished() -> bool:
                with db.session(engine) as session:
                    return sends.status(session, send_id) == "done"

            wait_until(finished, timeout=60)
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
        received = Counter(m.rcpt_tos[0] for m in server.handler.messages)

    with db.session(engine) as session:
        states = dict(
            session.execute(
                select(SubscriberRow.email_key, DeliveryRow.state).join(
                    SubscriberRow, SubscriberRow.id == DeliveryRow.subscriber_id
                )
            ).all()
        )
    unknown = {a for a, s in states.items() if s == "unknown"}
    sent = {a for a, s in states.items() if s == "sent"}
    assert sent | unknown == set(states) and len(states) == READERS, Counter(states.values())
    assert max(received.values()) == 1, "nobody is mailed twice"
    assert sent <= set(received), "every reader marked sent got the message"
    assert set(received) - sent <= unknown, "only in-flight messages are unaccounted for"
    assert len(unknown) <= CONCURRENCY, "only what was in flight at the kill is unknown"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_flower_sees_the_batch_tasks(
    engine: Engine, db_url: str, broker: str, tmp_path: Path
) -> None:
    add_readers(engine, 6)
    (tmp_path / "post.md").write_text(POST)
    port = _free_port()
    with serve() as server:
        env = environment(
            db_url,
            broker,
            server.settings().port,
            MAILER_BATCH_SIZE="2",
            FLOWER_UNAUTHENTICATED_API="true",
        )
        flower = subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "worker.app",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
            ],
            env=env,
            stdout=(tmp_path / "flower.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        worker = start_worker(env, tmp_path / "worker.log")
        try:
            api = f"http://127.0.0.1:{port}/api/tasks"
            wait_until(lambda: _get_json(api) is not None, timeout=30)
            run_mailer(env, tmp_path, "posts", "add", "post.md")
            run_mailer(env, tmp_path, "send", "killed-mid-batch", "--segment", "all", "--yes")

            def batches_done() -> bool:
                tasks = (_get_json(api) or {}).values()
                done = [t for t in tasks if (t["name"], t["state"]) == (BATCH_TASK, "SUCCESS")]
                return len(done) == 3

            # Flower learns of tasks only from their events: this fails if events are off.
            wait_until(batches_done, timeout=30)
        finally:
            for process in (worker, flower):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
    assert len(server.handler.messages) == 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> dict[str, Any] | None:
    try:
        return cast(dict[str, Any], httpx.get(url, timeout=2).json())
    except (httpx.HTTPError, ValueError):
        return None
