"""Real worker processes for tests: ``celery worker``, ``celery beat``, ``mailer`` commands and
a Redis server of a test's own, each in a process group of its own so nothing outlives a test.

    with Processes() as processes:                # SIGKILLs every group it started, at the end
        worker = start_worker(processes, env, tmp_path / "worker.log")
        ...
        kill(worker)                              # SIGKILL to the whole group (pool children too)

    with RedisServer(tmp_path) as broker:         # a free port, no persistence
        broker.url; broker.stop(); broker.start() # same port again, empty

``environment(db_url, broker, smtp_port, MAILER_X="...")`` is the ``MAILER_*`` environment of
a process; ``add_readers(engine, n, domains=k)`` adds ``n`` readers spread over ``k`` domains.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis
from helpers import BIN, HOST, dev_env, free_port
from sqlalchemy import Engine

from mailer import db
from mailer.db.models import SubscriberRow


class Processes:
    """Starts processes in new sessions (process groups) and SIGKILLs every group at the end."""

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[bytes]] = []

    def start(
        self, args: Sequence[str], env: dict[str, str], log: Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                list(args),
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a kill takes its children too
            )
        self._started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self._started:
            kill(process)
        self._started.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill_all()


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process's whole group (it leads one: started with a new session)."""
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):  # unkillable (D state): give up
        process.wait(timeout=10)


def start_worker(
    processes: Processes,
    env: dict[str, str],
    log: Path,
    *,
    name: str = "test",
    concurrency: int | None = None,
) -> subprocess.Popen[bytes]:
    """``celery -A worker.app worker``; ``concurrency`` None keeps Celery's default (CPUs)."""
    args = [
        str(BIN / "celery"),
        "-A",
        "worker.app",
        "worker",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"{name}-{os.getpid()}@%h",
    ]
    if concurrency is not None:
        args += ["-c", str(concurrency)]
    return processes.start(args, env, log, cwd=log.parent)


def start_beat(processes: Processes, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``celery -A worker.app beat``, its schedule file beside ``log``."""
    args = [
        str(BIN / "celery"),
        "-A",
        "worker.app",
        "beat",
        "--loglevel=INFO",
        "-s",
        str(log.parent / "celerybeat-schedule"),
    ]
    return processes.start(args, env, log, cwd=log.parent)


def environment(db_url: str, broker: str, smtp_port: int, **settings: str) -> dict[str, str]:
    return {
        **dev_env(),
        "MAILER_DATABASE_URL": db_url,
        "MAILER_BROKER_URL": broker,
        "MAILER_SMTP_URL": f"smtp://{HOST}:{smtp_port}",
        **settings,
    }


def add_readers(engine: Engine, count: int, *, domains: int = 1) -> list[str]:
    """``count`` active free readers, r0@... to r{count-1}@...; their addresses."""
    addresses = [
        f"r{i}@example.com" if domains == 1 else f"r{i}@d{i % domains}.example.com"
        for i in range(count)
    ]
    with db.session(engine) as session:
        session.add_all(
            SubscriberRow(
                email=address,
                email_key=address,
                domain=address.rpartition("@")[2],
                tier="free",
            )
            for address in addresses
        )
    return addresses


class RedisServer:
    """A ``redis-server`` of a test's own on a free port, without persistence: stopping it
    loses every key (queued Celery tasks included), as a crashed broker does."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self._processes = Processes()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self._process is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--bind", HOST, "--port", str(self.port)]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        self._process = self._processes.start(args, dict(os.environ), self.directory / "redis.log")
        client = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=1)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if self._process.poll() is not None or time.monotonic() > deadline:
                    log = (self.directory / "redis.log").read_text(errors="replace")
                    raise AssertionError(f"redis-server on {self.port} did not start:\n{log}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM (as ``docker stop`` does), then wait: with no persistence, all is lost."""
        process, self._process = self._process, None
        assert process is not None, "not running"
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill(process)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers, as behind a network partition."""
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: it answers again, with everything it held."""
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._process = None
        self._processes.kill_all()
