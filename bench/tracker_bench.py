"""Tracker benchmark (issue 5): wrk against the open pixel, and against nginx in the same run.

Targets on a 2-core machine, 64 connections: at least 0.15x the requests per second of nginx
serving a static GIF, p99 at most 20 ms, and every answered request found in the database
after the flush. Both servers get two processes (one per core) and the same wrk script,
which cycles through ``BENCH_TRACKER_READERS`` different readers' pixel URLs.

The tracker runs as ``mailer tracker serve`` on a throwaway PostgreSQL database and a private
``redis-server``; it is stopped with SIGTERM, so it writes its buffer,
and ``mailer tracker flush`` writes whatever another process left. Needs Debian's ``wrk`` and
``nginx-light`` (``make bench`` installs them).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, update

from bench.databases import postgres_database, redis_server
from bench.processes import accepts, dev_env, free_port, stop, wait_for
from mailer import db, sends
from mailer.compose import Publication
from mailer.config import load_settings
from mailer.db.models import DeliveryRow, SubscriberRow, TrackingEventRow
from mailer.posts import parse_post_text
from mailer.posts.store import save_post
from mailer.tokens import Kind, Signer, Token
from mailer.tracking.app import PIXEL

READERS = int(os.environ.get("BENCH_TRACKER_READERS", 10_000))
DURATION = os.environ.get("BENCH_TRACKER_DURATION", "15s")
CONNECTIONS = 64
PROCESSES = 2
BIN = Path(sys.executable).parent
POST = "---\ntitle: Tracker Bench\n---\n\nHello {{ name }}, [a link](https://example.com/a).\n"

Row = tuple[str, float, str]


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rate: float  # requests per second
    p99_ms: float
    errors: int  # non-2xx answers, socket errors and timeouts


def run_wrk(port: int, script: Path) -> WrkResult:
    done = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{CONNECTIONS}",
            f"-d{DURATION}",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    value, unit = _found(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99_ms = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = sum(map(int, socket.groups() if socket else ()))
    errors += int(non_2xx.group(1)) if non_2xx else 0
    requests = int(_found(r"(\d+) requests in", out)[0])
    rate = float(_found(r"Requests/sec:\s+([\d.]+)", out)[0])
    return WrkResult(requests, rate, p99_ms, errors)


def _found(pattern: str, text: str) -> tuple[str, ...]:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"wrk printed no {pattern!r}:\n{text}")
    return match.groups()


def wrk_script(folder: Path, paths: list[str]) -> Path:
    """A wrk script that requests ``paths`` in turn, each wrk thread from its own offset."""
    script = folder / "paths.lua"
    listed = ",\n".join(f'"{p}"' for p in paths)
    script.write_text(
        f"local paths = {{\n{listed}\n}}\n"
        "local i = 0\n"
        "setup = function(thread) thread:set('offset', math.random(#paths)) end\n"
        "init = function() i = tonumber(offset) or 0 end\n"
        "request = function()\n"
        "  i = i + 1\n"
        "  return wrk.format('GET', paths[(i % #paths) + 1])\n"
        "end\n"
    )
    return script


@contextmanager
def nginx(folder: Path) -> Iterator[int]:
    """nginx serving PIXEL for every /o/... path, with the tracker's no-cache headers."""
    root = folder / "nginx"
    (root / "logs").mkdir(parents=True)
    (root / "pixel.gif").write_bytes(PIXEL)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(
        f"""
user root;
worker_processes {PROCESSES};
daemon off;
pid {root}/nginx.pid;
error_log {root}/logs/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /o/ {{
            default_type image/gif;
            add_header Cache-Control "no-store, no-cache, must-revalidate, private, max-age=0";
            try_files /pixel.gif =404;
        }}
    }}
}}
"""
    )
    process = subprocess.Popen(["nginx", "-p", str(root), "-c", str(conf)], start_new_session=True)
    try:
        wait_for(lambda: accepts(port), 10, "nginx")
        yield port
    finally:
        stop(process)


@contextmanager
def tracker(env: dict[str, str], folder: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    with (folder / "tracker.log").open("ab") as log:
        process = subprocess.Popen(
            [
                str(BIN / "mailer"),
                "tracker",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(PROCESSES),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: accepts(port), 30, "mailer tracker serve")
        yield port, process
    finally:
        stop(process, timeout=60)


def pixel_paths(url: str, env: dict[str, str]) -> list[str]:
    """A sent send to ``READERS`` readers; each reader's open-pixel path."""
    settings = load_settings(env, env_file=None)
    post = parse_post_text(POST, "tracker-bench.md")
    engine = db.connect(url)
    try:
        with db.session(engine) as session:
            session.add_all(
                SubscriberRow(
                    email=f"reader{n}@example.com",
                    email_key=f"reader{n}@example.com",
                    domain="example.com",
                    tier="free",
                )
                for n in range(READERS)
            )
            save_post(session, post, "tracker-bench.md")
            draft = sends.draft(session, post, "all", Publication.from_settings(settings))
            send_id = sends.plan(session, draft, batch_size=500).send_id
            # Delivered an hour ago: the opens are people's, not prefetches.
            session.execute(
                update(DeliveryRow).values(
                    state="sent", sent_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
                )
            )
            ids = list(session.scalars(select(SubscriberRow.id)))
    finally:
        engine.dispose()
    signer = Signer(settings.secret_keys)
    return [f"/o/{signer.sign(Token(Kind.OPEN, send_id, i))}.gif" for i in ids]


def opens_recorded(url: str) -> int:
    engine = db.connect(url)
    try:
        with db.session(engine) as session:
            return session.scalar(select(func.count()).where(TrackingEventRow.kind == "open")) or 0
    finally:
        engine.dispose()


def main() -> list[Row]:
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tracker_bench_")))
        url = stack.enter_context(postgres_database())
        broker = stack.enter_context(redis_server(folder))
        env = dev_env(MAILER_DATABASE_URL=url, MAILER_BROKER_URL=broker)
        db.upgrade(url)
        script = wrk_script(folder, pixel_paths(url, env))

        with nginx(folder) as port:
            run_wrk(port, script)  # warm-up
            base = run_wrk(port, script)
        with tracker(env, folder) as (port, _):
            warm_up = run_wrk(port, script)
            ours = run_wrk(port, script)
            behind = opens_recorded(url)
            stopping = time.perf_counter()
        # SIGTERM made the tracker write its buffer; this writes anything left.
        subprocess.run(
            [str(BIN / "mailer"), "tracker", "flush", "--json"],
            env=env,
            capture_output=True,
            check=True,
        )
        drain_s = time.perf_counter() - stopping
        recorded = opens_recorded(url)

    answered = warm_up.requests + ours.requests
    # wrk counts answers it read; a request in flight when it stopped may be recorded too.
    extra = recorded - answered
    complete = 0 <= extra <= 2 * CONNECTIONS
    ratio = ours.rate / base.rate
    return [
        (
            f"nginx, static GIF, {PROCESSES} workers, {CONNECTIONS} connections (req/s)",
            base.rate,
            f"p99 {base.p99_ms:.2f} ms; {base.errors} errors",
        ),
        (
            f"tracker GET /o/TOKEN.gif, {PROCESSES} processes, {CONNECTIONS} connections (req/s)",
            ours.rate,
            f"{ratio:.3g}x nginx, target >= 0.15: {'met' if ratio >= 0.15 else 'missed'}; "
            f"{ours.errors} errors; {READERS:,} readers' tokens in turn",
        ),
        (
            "  tracker p99 latency (ms)",
            ours.p99_ms,
            f"target <= 20: {'met' if ours.p99_ms <= 20 else 'missed'}",
        ),
        (
            "  opens in the database after the flush",
            float(recorded),
            f"{answered:,} answered (warm-up included), {extra:+,} in flight at wrk's end: "
            + ("every answered request recorded" if complete else "**requests lost**"),
        ),
        (
            "  written after wrk stopped (events)",
            float(recorded - behind),
            f"the flusher's backlog when the load ended, written in {drain_s:.1f} s "
            "(stopping the tracker included)",
        ),
    ]


if __name__ == "__main__":
    from bench.machine import describe

    print(f"Machine: {describe()}\n")
    for name, value, note in main():
        print(f"| {name} | {value:,.1f} | {note} |")
