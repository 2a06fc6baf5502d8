"""``mailer doctor`` against real parts: a broker, beat, an SMTP server, the tracker, a worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import BIN, cli, free_port
from smtp_servers import serve, wait_until
from workers import Processes, RedisServer, environment, start_beat, start_worker

from mailer import db

pytestmark = pytest.mark.subprocess


def doctor(env: dict[str, str], cwd: Path) -> tuple[int, dict[str, Any]]:
    done = cli(env, cwd, "doctor", "--json")
    return done.returncode, json.loads(done.stdout)  # stdout is the JSON document alone


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_doctor_names_the_part_that_fails_then_passes(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'mailer.db'}"
    db.upgrade(db_url)
    port = free_port()
    with RedisServer(tmp_path) as broker, serve() as smtp, Processes() as processes:
        env = environment(
            db_url,
            broker.url,
            smtp.settings().port,
            MAILER_TRACKER_URL=f"http://127.0.0.1:{port}",
            MAILER_SECRET_KEY="a-long-random-test-key",
        )
        processes.start(
            [str(BIN / "mailer"), "tracker", "serve", "--port", str(port)],
            env,
            tmp_path / "tracker.log",
        )
        start_beat(processes, env, tmp_path / "beat.log")
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/healthz"), timeout=30)

        status, report = doctor(env, tmp_path)
        checks = {c["name"]: c for c in report["checks"]}
        assert status == 1 and report["ok"] is False
        assert not checks["worker"]["ok"]
        assert "celery -A worker.app worker" in checks["worker"]["detail"]
        others = {name for name, check in checks.items() if check["ok"]}
        assert others == {"database", "broker", "smtp", "beat", "tracker", "secret_key", "dkim"}

        start_worker(processes, env, tmp_path / "worker.log", concurrency=1)
        wait_until(lambda: doctor(env, tmp_path)[0] == 0, timeout=60)
