"""MAILER_LOG_FORMAT=json: every line of the worker, beat and tracker is one JSON object, and a
send's lines carry its ``send_id``."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import BIN, free_port, run_mailer
from smtp_servers import serve, wait_until
from workers import Processes, RedisServer, add_readers, environment

from mailer import db, sends

pytestmark = pytest.mark.subprocess

POST = "---\ntitle: Logged\n---\n\nHello.\n"


def lines(log: Path) -> list[dict[str, Any]]:
    text = log.read_text()
    assert text.strip(), f"{log.name} is empty"
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_logs_of_worker_beat_and_tracker(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'mailer.db'}"
    db.upgrade(db_url)
    engine = db.connect(db_url)
    add_readers(engine, 5)
    (tmp_path / "post.md").write_text(POST)
    port = free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("worker", "beat", "tracker")}
    # `-A worker`, the usual Celery idiom, as well as `-A worker.app` elsewhere.
    celery = [str(BIN / "celery"), "--quiet", "-A", "worker"]
    with RedisServer(tmp_path) as broker, serve() as smtp, Processes() as processes:
        env = environment(db_url, broker.url, smtp.settings().port, MAILER_LOG_FORMAT="json")
        # Printed before logging starts, and only to root (the image runs as a user).
        env["PYTHONWARNINGS"] = "ignore:You're running the worker with superuser privileges"
        worker = processes.start(
            [*celery, "worker", "--loglevel=INFO", "-c", "1", "--without-gossip"],
            env,
            logs["worker"],
            cwd=tmp_path,
        )
        beat = processes.start(
            [*celery, "beat", "--loglevel=INFO", "-s", str(tmp_path / "schedule")],
            env,
            logs["beat"],
            cwd=tmp_path,
        )
        tracker = processes.start(
            [str(BIN / "mailer"), "tracker", "serve", "--port", str(port)],
            env,
            logs["tracker"],
            cwd=tmp_path,
        )
        run_mailer(env, tmp_path, "posts", "add", "post.md")
        send_id = int(run_mailer(env, tmp_path, "send", "logged", "--segment", "all", "--yes"))

        def done() -> bool:
            with db.session(engine) as session:
                return sends.status(session, send_id) == "done"

        wait_until(done, timeout=60)
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200, 30)
        for process in (worker, beat, tracker):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    engine.dispose()
    worker_lines = lines(logs["worker"])
    assert {"time", "level", "logger", "message"} <= set(worker_lines[0])
    about_the_send = [line for line in worker_lines if line.get("send_id") == send_id]
    assert [line["message"] for line in about_the_send if "started" in line["message"]] == [
        f"send {send_id} (logged) started; batches: 1"
    ]
    assert any("done" in line["message"] for line in about_the_send), worker_lines
    assert any("succeeded" in line["message"] for line in about_the_send), worker_lines
    assert any("Warm shutdown" in line["message"] for line in worker_lines)
    assert lines(logs["beat"]) and lines(logs["tracker"])
