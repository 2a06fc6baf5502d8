"""End-to-end send benchmark (issue 9): ``mailer send --wait`` timed from start to exit.

Targets on a 2-core machine: ``mailer send SLUG --segment all --yes --wait`` to 20,000 readers
of the sample post ``examples/posts/the-quiet-harbour.md`` (about 16 KB of HTML, a 23.6 KB
paid message), from the command's start to its exit (CLI start, compose,
planning, enqueueing and the wait included), at least 1.0x a bare aiosmtplib loop (one
process, 16 connections, the pipeline's own message prebuilt once) sending as many messages
to the same Postfix ``smtp-sink``, measured just before the send and just after it (the mean:
the shared machine's load drifts); at 100,000 readers at least 1.2x.

Default settings throughout: the SQLite database at ``var/mailer.db`` under a fresh folder,
16 connections per process, batches of 500, and one ``celery -A worker.app worker`` with its
default processes (one per core). Only the endpoints are set: a private ``redis-server`` and
the sink. Each size gets a fresh folder, database and worker. Worker CPU per message is the
worker processes' own CPU time over the send, so it says what a message costs whatever else
the shared machine is doing; the CLI's is measured the same way.

Sizes from ``BENCH_SEND_SIZES`` (default ``20000,100000``), the post from ``BENCH_SEND_POST``.
"""

from __future__ import annotations

import csv
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from celery import Celery

from bench.databases import postgres_database, redis_server
from bench.delivery_bench import (
    Sink,
    _cpu_seconds,
    _pids_in_group,
    baseline_loop,
    paid_message,
    smtp_sink,
)
from bench.processes import dev_env, stop, wait_for
from mailer import db
from mailer.compose import Publication, compose
from mailer.config import load_settings
from mailer.posts import parse_post
from mailer.posts.store import save_post
from mailer.subscribers.importer import import_csv

SIZES = [int(n) for n in os.environ.get("BENCH_SEND_SIZES", "20000,100000").split(",")]
TARGETS = {20_000: 1.0, 100_000: 1.2}
POST = Path(
    os.environ.get(
        "BENCH_SEND_POST",
        Path(__file__).resolve().parent.parent / "examples" / "posts" / "the-quiet-harbour.md",
    )
)
BIN = Path(sys.executable).parent
TIERS = {"free": 0.5, "paid": 0.3, "trial": 0.1, "comped": 0.1}  # both variants are used
DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "proton.me", "example.org"]
NAMES = ["Ana Lima", "Zoë Ångström", "山田 健二", ""]

Row = tuple[str, float, str]


@dataclass(frozen=True)
class Result:
    readers: int
    loop_before: float  # the bare loop just before the send, msg/s (0: not run)
    loop_after: float  # and just after it (the shared machine's load drifts)
    rate: float  # readers / (command start to exit)
    elapsed: float
    worker_us: float  # worker CPU (all processes, user + system) per message
    cli_us: float  # the `mailer send` process's CPU per message
    sink_us: float
    message_bytes: int


def _readers_csv(path: Path, count: int) -> None:
    rng = random.Random(count)
    tiers = rng.choices(list(TIERS), list(TIERS.values()), k=count)
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["email", "name", "tier"])
        for i, tier in enumerate(tiers):
            out.writerow([f"reader{i}@{DOMAINS[i % len(DOMAINS)]}", NAMES[i % len(NAMES)], tier])


def _env(broker: str, sink: Sink, extra: Mapping[str, str]) -> dict[str, str]:
    return dev_env(
        MAILER_BROKER_URL=broker, MAILER_SMTP_URL=f"smtp://127.0.0.1:{sink.port}", **extra
    )


@contextmanager
def _worker(env: dict[str, str], folder: Path, broker: str) -> Iterator[subprocess.Popen[bytes]]:
    with (folder / "worker.log").open("ab") as out:
        process = subprocess.Popen(
            [str(BIN / "celery"), "-A", "worker.app", "worker", "--loglevel", "WARNING"],
            env=env,
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stopping it stops its pool too
        )
    try:
        with Celery(broker=broker) as app:
            wait_for(lambda: bool(app.control.ping(timeout=0.5)), 60, "worker")
        yield process
    finally:
        stop(process)


def one_size(
    readers: int,
    sink: Sink,
    extra: Mapping[str, str] = MappingProxyType({}),
    *,
    loops: bool = True,
    postgres: bool = False,
) -> Result:
    """One send of ``readers`` and, if ``loops``, the bare loop before and after it; ``extra``
    settings for the send; on a throwaway PostgreSQL database if ``postgres``, else the default
    SQLite one."""
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="send_bench_")))
        broker = stack.enter_context(redis_server(folder))
        # The default database: SQLite at var/mailer.db under the folder.
        url = f"sqlite:///{folder / 'var' / 'mailer.db'}"
        if postgres:
            url = stack.enter_context(postgres_database())
            extra = {**extra, "MAILER_DATABASE_URL": url}
        env = _env(broker, sink, extra)
        settings = load_settings(env, env_file=None)
        post = parse_post(POST)
        composition = compose(post, Publication.from_settings(settings))
        # The baseline sends the very bytes the pipeline sends: the paid variant, personalised.
        message = paid_message(composition, settings)

        db.upgrade(url)
        engine = db.connect(url)
        stack.callback(engine.dispose)
        with db.session(engine) as session:
            save_post(session, post, str(POST))
        _readers_csv(folder / "readers.csv", readers)
        import_csv(engine, folder / "readers.csv")

        loop_before = baseline_loop(sink, message, readers) if loops else 0.0
        worker = stack.enter_context(_worker(env, folder, broker))
        pids = _pids_in_group(worker.pid)
        cpu_before = _cpu_seconds(pids), _cpu_seconds([sink.pid])
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        received_before = sink.received()
        start = time.perf_counter()
        cli = subprocess.run(
            [str(BIN / "mailer"), "send", post.slug, "--segment", "all", "--yes", "--wait"],
            env=env,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        elapsed = time.perf_counter() - start
        worker_cpu = _cpu_seconds(pids) - cpu_before[0]
        sink_cpu = _cpu_seconds([sink.pid]) - cpu_before[1]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli_cpu = (children.ru_utime + children.ru_stime) - (
            children_before.ru_utime + children_before.ru_stime
        )
        if cli.returncode:
            raise RuntimeError(f"mailer send failed ({cli.returncode}): {cli.stderr[-2000:]}")
        time.sleep(0.2)  # the sink's counter line trails its last reply
        received = sink.received() - received_before
        if received != readers:
            raise RuntimeError(f"the sink got {received} of {readers} messages")
        loop_after = baseline_loop(sink, message, readers) if loops else 0.0
    return Result(
        readers=readers,
        loop_before=loop_before,
        loop_after=loop_after,
        rate=readers / elapsed,
        elapsed=elapsed,
        worker_us=worker_cpu / readers * 1e6,
        cli_us=cli_cpu / readers * 1e6,
        sink_us=sink_cpu / readers * 1e6,
        message_bytes=len(message),
    )


def rows(result: Result) -> list[Row]:
    r = result
    loop_rate = (r.loop_before + r.loop_after) / 2
    ratio = r.rate / loop_rate
    target = TARGETS.get(r.readers)
    verdict = f", target >= {target}: {'met' if ratio >= target else 'missed'}" if target else ""
    return [
        (
            f"bare aiosmtplib loop, 16 connections, {r.readers:,} messages (msg/s)",
            loop_rate,
            f"baseline: the mean of {r.loop_before:.0f} before the send and "
            f"{r.loop_after:.0f} after; the pipeline's own {r.message_bytes:,}-byte message",
        ),
        (
            f"`mailer send --wait`, {r.readers:,} readers, start to exit (msg/s)",
            r.rate,
            f"{ratio:.3g}x the loop{verdict}; {r.elapsed:.1f} s",
        ),
        (
            f"  worker CPU per message, {r.readers:,} readers (us)",
            r.worker_us,
            f"all worker processes, user + system; `mailer send` {r.cli_us:.0f} us, "
            f"smtp-sink {r.sink_us:.0f} us",
        ),
    ]


def main(report: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Every size in turn; ``report`` gets each row as soon as it is measured."""
    out: list[Row] = []
    with ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="send_bench_sink_"))
        sink = stack.enter_context(smtp_sink(Path(folder)))
        for readers in SIZES:
            for row in rows(one_size(readers, sink)):
                report(row)
                out.append(row)
    return out


def print_row(row: Row) -> None:
    name, value, note = row
    print(f"| {name} | {value:.1f} | {note} |", flush=True)


if __name__ == "__main__":
    main(print_row)
