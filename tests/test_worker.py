"""A real Celery worker on the real Redis: killed with SIGKILL mid-batch, then restarted;
and Flower watching its tasks.

The send completes with no reader missed and none mailed twice, except the messages in flight
at the kill: those are ``unknown``, and not resent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
from conftest import REDIS_URL
from helpers import BIN, free_port, run_mailer
from smtp_servers import Slow, serve, wait_until
from sqlalchemy import Engine, select
from workers import Processes, add_readers, environment, kill, start_worker

from mailer import db, sends
from mailer.db.models import DeliveryRow, SubscriberRow

pytestmark = pytest.mark.subprocess

POST = "---\ntitle: Killed Mid Batch\n---\n\nHello {{ name }}.\n"
READERS = 120
CONCURRENCY = 2
BATCH_TASK = "mailer.deliver_batch"


@pytest.fixture
def broker(redis_db: redis.Redis) -> str:
    return REDIS_URL


@pytest.fixture
def processes() -> Iterator[Processes]:
    with Processes() as started:
        yield started


def test_sigkill_mid_batch_then_restart(
    engine: Engine, db_url: str, broker: str, processes: Processes, tmp_path: Path
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
        worker = start_worker(processes, env, log, concurrency=1)
        send_id = int(
            run_mailer(env, tmp_path, "send", "killed-mid-batch", "--segment", "all", "--yes")
        )
        wait_until(lambda: len(server.handler.messages) >= 20, timeout=30)
        kill(worker)
        at_kill = len(server.handler.messages)
        assert at_kill < READERS, "the kill came too late to prove anything"

        start_worker(processes, env, log, concurrency=1)

        def finished() -> bool:
            with db.session(engine) as session:
                return sends.status(session, send_id) == "done"

        wait_until(finished, timeout=60)
        processes.kill_all()
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
    engine: Engine, db_url: str, broker: str, processes: Processes, tmp_path: Path
) -> None:
    add_readers(engine, 6)
    (tmp_path / "post.md").write_text(POST)
    port = free_port()
    with serve() as server:
        env = environment(
            db_url,
            broker,
            server.settings().port,
            MAILER_BATCH_SIZE="2",
            FLOWER_UNAUTHENTICATED_API="true",
        )
        flower_args = ["flower", f"--port={port}", "--address=127.0.0.1"]
        processes.start(
            [str(BIN / "celery"), "-A", "worker.app", *flower_args],
            env,
            tmp_path / "flower.log",
        )
        start_worker(processes, env, tmp_path / "worker.log", concurrency=1)
        api = f"http://127.0.0.1:{port}/api/tasks"
        wait_until(lambda: _get_json(api) is not None, timeout=30)
        run_mailer(env, tmp_path, "posts", "add", "post.md")
        send_id = run_mailer(
            env, tmp_path, "send", "killed-mid-batch", "--segment", "all", "--yes"
        ).strip()
        done: list[dict[str, Any]] = []

        def batches_done() -> bool:
            tasks = (_get_json(api) or {}).values()
            done[:] = [t for t in tasks if (t["name"], t["state"]) == (BATCH_TASK, "SUCCESS")]
            return len(done) == 3

        # Flower learns of tasks only from their events: this fails if events are off.
        wait_until(batches_done, timeout=30)
        processes.kill_all()
    assert len(server.handler.messages) == 6
    # Each task names its send and which batch of how many it is.
    assert sorted(t["args"] for t in done) == [
        f"send {send_id} (killed-mid-batch), batch {n} of 3" for n in (1, 2, 3)
    ]


def _get_json(url: str) -> dict[str, Any] | None:
    try:
        return cast(dict[str, Any], httpx.get(url, timeout=2).json())
    except (httpx.HTTPError, ValueError):
        return None
