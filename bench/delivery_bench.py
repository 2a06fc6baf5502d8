"""Delivery benchmark (issue 4): a whole send through Celery workers, the ledger and SMTP.

Targets on a 2-core machine: a send to 100,000 readers of a post with ~20 KB of HTML, from
``mailer send`` to the last 250, at least 1.0x a bare aiosmtplib loop (a) and 0.25x
``smtp-source`` (b), both measured in the same run against the same Postfix ``smtp-sink``;
worker peak RSS at most 250 MB per process, the same with 1,000,000 readers planned; planning
1,000,000 readers in at most 20 s.

The whole send runs once per entry of ``BENCH_SENDS`` (SMTP connections per worker process x
batch size; the first entry is the headline, the others show what the settings are worth),
each with freshly started workers. Worker CPU per message is the processes' own CPU time over
the send, so it says what a message costs whatever else the shared machine is doing.

Everything it starts runs in its own process group and is stopped at the end, failure or not:
the sink, the workers, a throwaway PostgreSQL database and a private ``redis-server``. Sizes
come from ``BENCH_*`` variables for quick runs, e.g. ``BENCH_RECIPIENTS=5000
BENCH_PLAN_RECIPIENTS=20000 BENCH_SOURCE_MESSAGES=5000 BENCH_LOOP_MESSAGES=2000
python -m bench.delivery_bench``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiosmtplib
import psycopg
from celery import Celery
from sqlalchemy import Engine, func, select, text

from bench.databases import postgres_database, redis_server
from bench.processes import accepts, dev_env, free_port, stop, wait_for
from mailer import db, sends
from mailer.compose import Composition, Publication, compose
from mailer.config import Settings, load_settings
from mailer.db.models import DeliveryRow
from mailer.delivery.personalise import Personaliser, Recipient
from mailer.posts import Post, parse_post_text
from mailer.posts.store import save_post
from mailer.tokens import Signer

if TYPE_CHECKING:
    from mailer.delivery.dkim import DkimSigner  # cryptography: only the DKIM bench signs


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


RECIPIENTS = _env_int("BENCH_RECIPIENTS", 100_000)
PLANNED = _env_int("BENCH_PLAN_RECIPIENTS", 1_000_000)
SOURCE_MESSAGES = _env_int("BENCH_SOURCE_MESSAGES", 100_000)
LOOP_MESSAGES = _env_int("BENCH_LOOP_MESSAGES", 30_000)
LOOP_CONNECTIONS = 16
WORKERS = _env_int("BENCH_WORKERS", 1)  # celery worker instances
PROCESSES = _env_int("BENCH_WORKER_PROCESSES", 2)  # prefork processes per worker (-c)
# "concurrency x batch size" per whole send; 16x500 are the shipped defaults.
SENDS = [
    (int(c), int(b))
    for c, b in (s.split("x") for s in os.environ.get("BENCH_SENDS", "16x500,64x500").split(","))
]
HTML_BYTES = 20_000
BIN = Path(sys.executable).parent
SLUG = "delivery-bench"
STALL_S = 120.0  # the sink got nothing for this long: the send is stuck, give up
TICKS = os.sysconf("SC_CLK_TCK")

TIERS = {"free": 0.5, "paid": 0.3, "trial": 0.1, "comped": 0.1}  # both variants are used
DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "proton.me", "example.org"]
NAMES = ["Ana Lima", "Zoë Ångström", "山田 健二", None]
WORDS = ["ledger", "harbour", "season", "orchard", "keeper", "signal", "letter", "ferry"]

Row = tuple[str, float, str]


@dataclass(frozen=True)
class Sink:
    """A running smtp-sink; ``received`` reads its running message counter."""

    port: int
    pid: int
    log: Path

    def received(self) -> int:
        with self.log.open("rb") as f:
            f.seek(max(self.log.stat().st_size - 200, 0))
            counts = re.findall(rb"mesg=(\d+)", f.read())
        return int(counts[-1]) if counts else 0


@dataclass(frozen=True)
class SendResult:
    rate: float  # messages per second, from `mailer send` to the last 250
    elapsed: float
    first: float  # seconds to the first 250: what planning and enqueueing cost
    cli: float  # seconds until `mailer send` returned
    worker_us: float  # worker CPU (all processes, user + system) per message
    sink_us: float  # smtp-sink CPU per message
    rss: float  # the largest peak RSS of one worker process, MB
    rss_worker: float  # the largest sum of peaks over one worker's processes, MB


def _pids_in_group(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid:  # after the command: state, ppid, pgrp, ...
            pids.append(int(stat.parent.name))
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def _peak_rss_mb(pids: list[int]) -> list[float]:
    """Each process's peak RSS (VmHWM): the kernel keeps it, so no polling is needed."""
    peaks = []
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            peaks.append(int(match.group(1)) / 1024)
    return peaks


@contextmanager
def smtp_sink(folder: Path) -> Iterator[Sink]:
    port = free_port()
    log = folder / "smtp-sink.log"
    # -c: running counters (one short line per message), how we confirm every message arrived.
    # As root it must drop privileges (-u).
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["/usr/sbin/smtp-sink", "-c", *user, f"127.0.0.1:{port}", "1000"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: accepts(port), 10, "smtp-sink")
        yield Sink(port, process.pid, log)
    finally:
        stop(process)


def baseline_source(sink: Sink) -> float:
    """(b) Postfix's own client: 8 sessions, 20,000-byte messages, messages per second."""
    start = time.perf_counter()
    subprocess.run(
        [
            "/usr/sbin/smtp-source",
            "-d",
            "-s",
            "8",
            "-l",
            "20000",
            "-m",
            str(SOURCE_MESSAGES),
            f"127.0.0.1:{sink.port}",
        ],
        check=True,
        timeout=600,
    )
    return SOURCE_MESSAGES / (time.perf_counter() - start)


def baseline_loop(sink: Sink, message: bytes, count: int = LOOP_MESSAGES) -> float:
    """(a) One process, 16 aiosmtplib connections, one prebuilt message: messages per second."""
    left = count

    async def connection() -> None:
        nonlocal left
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port)
        await smtp.connect()
        while left > 0:
            left -= 1
            await smtp.sendmail("news@example.com", ["reader@example.com"], message)
        await smtp.quit()

    async def run() -> None:
        await asyncio.gather(*(connection() for _ in range(LOOP_CONNECTIONS)))

    start = time.perf_counter()
    asyncio.run(run())
    return count / (time.perf_counter() - start)


def load_subscribers(engine: Engine, first: int, count: int) -> None:
    """``count`` active readers numbered from ``first``, by COPY, mixed tiers and names."""
    rng = random.Random(first)
    tiers, weights = list(TIERS), list(TIERS.values())
    now = dt.datetime.now(dt.UTC)
    columns = "email, email_key, domain, name, tier, status, created_at, updated_at"
    with engine.connect() as connection:
        raw = cast(psycopg.Connection[Any], connection.connection.driver_connection)  # for COPY
        with (
            raw.cursor() as cursor,
            cursor.copy(f"COPY subscribers ({columns}) FROM STDIN") as copy,
        ):
            for i, tier in zip(
                range(first, first + count), rng.choices(tiers, weights, k=count), strict=True
            ):
                domain = DOMAINS[i % len(DOMAINS)]
                email = f"reader{i}@{domain}"
                copy.write_row(
                    (email, email, domain, NAMES[i % len(NAMES)], tier, "active", now, now)
                )
        raw.commit()
        connection.execute(text("ANALYZE subscribers"))
        connection.commit()


def bench_post(publication: Publication) -> tuple[Post, Composition]:
    """A paid post whose paid variant's HTML is about 20 KB, with links and a paywall."""
    rng = random.Random(4)
    paragraphs: list[str] = []
    while True:
        n = len(paragraphs)
        words = " ".join(rng.choices(WORDS, k=60)).capitalize()
        # A link in every other paragraph: about a dozen, each signed per reader.
        link = f" ([source {n}](https://example.org/notes/{n}?ref=mail))" if n % 2 else ""
        paragraphs.append(f"{words}{link}.")
        middle = len(paragraphs) // 2 or 1
        markdown = "\n\n".join([*paragraphs[:middle], "<!-- paywall -->", *paragraphs[middle:]])
        source = f"---\ntitle: Delivery Bench\nslug: {SLUG}\naudience: paid\n---\n\n{markdown}\n"
        post = parse_post_text(source, "delivery-bench.md")
        composition = compose(post, publication)
        if len(composition.paid.html.encode()) >= HTML_BYTES:
            return post, composition


def mailer_env(
    url: str, broker: str, sink: Sink, concurrency: int, batch_size: int
) -> dict[str, str]:
    return dev_env(
        MAILER_DATABASE_URL=url,
        MAILER_BROKER_URL=broker,
        MAILER_SMTP_URL=f"smtp://127.0.0.1:{sink.port}",
        MAILER_SMTP_CONCURRENCY=str(concurrency),
        MAILER_BATCH_SIZE=str(batch_size),
    )


@contextmanager
def celery_workers(env: dict[str, str], folder: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``WORKERS`` workers of ``PROCESSES`` prefork processes each, started and answering."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for n in range(WORKERS):
            with (folder / f"worker{n}.log").open("ab") as out:
                started.append(
                    subprocess.Popen(
                        [
                            str(BIN / "celery"),
                            "-A",
                            "worker.app",
                            "worker",
                            "-E",
                            "-c",
                            str(PROCESSES),
                            "--without-gossip",
                            "--without-mingle",
                            "-n",
                            f"bench{n}-{os.getpid()}@%h",
                        ],
                        env=env,
                        cwd=folder,  # away from the checkout's .env
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own group: stopping it stops its pool too
                    )
                )
        with Celery(broker=env["MAILER_BROKER_URL"]) as app:
            wait_for(lambda: len(app.control.ping(timeout=0.5)) >= WORKERS, 60, "workers")
        yield started
    finally:
        for worker in started:
            stop(worker)


def _wait_for_sink(sink: Sink, done: Callable[[], bool]) -> None:
    """Poll until ``done``, watching the sink (not the database, which is busy enough)."""
    last, moved = -1, time.monotonic()
    while not done():
        received = sink.received()
        if received != last:
            last, moved = received, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            raise TimeoutError(f"the sink got nothing for {STALL_S:g}s, at {received}")
        time.sleep(0.25)


def whole_send(engine: Engine, env: dict[str, str], folder: Path, sink: Sink) -> SendResult:
    """``mailer send`` to every reader, with workers already running: time to the last 250."""
    with celery_workers(env, folder) as workers:
        groups = [_pids_in_group(w.pid) for w in workers]
        cpu_before = _cpu_seconds([p for g in groups for p in g]), _cpu_seconds([sink.pid])
        received_before = sink.received()
        wall_start = dt.datetime.now(dt.UTC)
        start = time.perf_counter()
        cli = subprocess.run(
            [str(BIN / "mailer"), "send", SLUG, "--segment", "all", "--yes"],
            env=env,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
        cli_s = time.perf_counter() - start
        if cli.returncode:
            raise RuntimeError(f"mailer send failed: {cli.stderr}")
        send_id = int(cli.stdout)

        def finished() -> bool:
            with db.session(engine) as session:
                return sends.status(session, send_id) == "done"

        _wait_for_sink(sink, finished)
        worker_cpu = _cpu_seconds([p for g in groups for p in g]) - cpu_before[0]
        sink_cpu = _cpu_seconds([sink.pid]) - cpu_before[1]
        peaks = [_peak_rss_mb(g) for g in groups]
    with db.session(engine) as session:
        counts = sends.show(session, send_id).counts
        first, last = session.execute(
            select(func.min(DeliveryRow.sent_at), func.max(DeliveryRow.sent_at)).where(
                DeliveryRow.send_id == send_id
            )
        ).one()
    received = sink.received() - received_before
    if counts["sent"] != RECIPIENTS or received != RECIPIENTS or first is None or last is None:
        raise RuntimeError(f"send {send_id}: {counts}, the sink got {received}")
    # sent_at is stamped when the ledger records the 250: at or just after it.
    elapsed = (last - wall_start).total_seconds()
    return SendResult(
        rate=RECIPIENTS / elapsed,
        elapsed=elapsed,
        first=(first - wall_start).total_seconds(),
        cli=cli_s,
        worker_us=worker_cpu / RECIPIENTS * 1e6,
        sink_us=sink_cpu / RECIPIENTS * 1e6,
        rss=max(max(p) for p in peaks),
        rss_worker=max(sum(p) for p in peaks),
    )


def plan_and_run(
    engine: Engine, env: dict[str, str], folder: Path, draft: sends.Draft, sink: Sink
) -> tuple[float, float]:
    """Plan a send to every reader (seconds), then the workers' peak RSS over a few batches."""
    start = time.perf_counter()
    with db.session(engine) as session:
        planned = sends.plan(session, draft, batch_size=int(env["MAILER_BATCH_SIZE"]))
    plan_s = time.perf_counter() - start
    send_id = planned.send_id
    with celery_workers(env, folder) as workers, Celery(broker=env["MAILER_BROKER_URL"]) as app:
        received_before = sink.received()
        for batch_no in planned.batches:
            app.send_task("mailer.deliver_batch", (send_id, batch_no))
        # Two batches per process: each has made its runtime and run whole batches.
        enough = 2 * int(env["MAILER_BATCH_SIZE"]) * WORKERS * PROCESSES
        _wait_for_sink(sink, lambda: sink.received() - received_before >= enough)
        rss = max(max(_peak_rss_mb(_pids_in_group(w.pid))) for w in workers)
        with db.session(engine) as session:
            sends.cancel(session, send_id)
    return plan_s, rss


def _versus(rate: float, baseline: float, name: str, target: float) -> str:
    # Three digits, so that 0.249 never shows as a met 0.25.
    ratio = rate / baseline
    return f"{ratio:.3g}x ({name}), target >= {target}: {'met' if ratio >= target else 'missed'}"


BENCH_READER = Recipient(1, "reader1@gmail.com", "Ana Lima")


def paid_personaliser(
    composition: Composition, settings: Settings, dkim: DkimSigner | None = None
) -> Personaliser:
    """The paid variant's personaliser, made as a worker makes it (signing with ``dkim``)."""
    return Personaliser(
        composition.paid,
        send_id=1,
        signer=Signer(settings.secret_keys),
        tracker_url=settings.tracker_url,
        dkim=dkim,
    )


def paid_message(composition: Composition, settings: Settings) -> bytes:
    """The pipeline's own paid message for one reader, personalised as a worker does."""
    return paid_personaliser(composition, settings).personalise(BENCH_READER)


def main() -> list[Row]:
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="delivery_bench_")))
        sink = stack.enter_context(smtp_sink(folder))
        url = stack.enter_context(postgres_database())
        broker = stack.enter_context(redis_server(folder))
        envs = [mailer_env(url, broker, sink, c, b) for c, b in SENDS]
        settings = load_settings(envs[0], env_file=None)
        post, composition = bench_post(Publication.from_settings(settings))
        # Baseline (a) sends the very bytes the pipeline sends: the paid variant, personalised.
        message = paid_message(composition, settings)

        source_rate = baseline_source(sink)
        loop_rate = baseline_loop(sink, message)

        db.upgrade(url)
        engine = db.connect(url)
        stack.callback(engine.dispose)
        with db.session(engine) as session:
            save_post(session, post, "delivery-bench.md")
        load_subscribers(engine, 1, RECIPIENTS)
        results = [whole_send(engine, env, folder, sink) for env in envs]

        start = time.perf_counter()
        load_subscribers(engine, RECIPIENTS + 1, PLANNED - RECIPIENTS)
        load_s = time.perf_counter() - start
        with db.session(engine) as session:
            draft = sends.draft(session, post, "all", Publication.from_settings(settings))
        plan_s, planned_rss = plan_and_run(engine, envs[0], folder, draft, sink)

    html = len(composition.paid.html.encode())
    rows: list[Row] = [
        (
            "baseline (b): smtp-source -d -s 8 -l 20000 (msg/s)",
            source_rate,
            f"{SOURCE_MESSAGES:,} messages to smtp-sink",
        ),
        (
            f"baseline (a): bare aiosmtplib loop, {LOOP_CONNECTIONS} connections (msg/s)",
            loop_rate,
            f"{LOOP_MESSAGES:,} x the pipeline's own {len(message):,}-byte message "
            f"({html:,} bytes of HTML)",
        ),
    ]
    for (concurrency, batch_size), r in zip(SENDS, results, strict=True):
        setup = (
            f"{WORKERS}x{PROCESSES} processes, {concurrency} connections, batches of {batch_size}"
        )
        rows += [
            (
                f"issue 4 method, to the last 250: whole send, {RECIPIENTS:,} readers, {setup} "
                "(msg/s)",
                r.rate,
                f"{_versus(r.rate, loop_rate, 'a', 1.0)}, "
                f"{_versus(r.rate, source_rate, 'b', 0.25)}; {r.elapsed:.1f} s to the last 250, "
                f"{r.first:.1f} s to the first; `mailer send` took {r.cli:.1f} s",
            ),
            (
                f"  worker CPU per message, {setup} (us)",
                r.worker_us,
                f"all worker processes, user + system; smtp-sink {r.sink_us:.0f} us",
            ),
            (
                f"  worker peak RSS, {setup} (MB)",
                r.rss,
                f"target <= 250 per process; {r.rss_worker:.0f} MB for the whole worker",
            ),
        ]
    return [
        *rows,
        (
            f"plan {PLANNED:,} readers: sends.plan (s)",
            plan_s,
            f"target <= 20; batches of {SENDS[0][1]}; {PLANNED - RECIPIENTS:,} more readers "
            f"loaded by COPY in {load_s:.0f} s",
        ),
        (
            f"worker peak RSS with {PLANNED:,} planned (MB)",
            planned_rss,
            f"target <= 250, as with {RECIPIENTS:,}; after 2 batches per process, then cancelled",
        ),
    ]


if __name__ == "__main__":
    for name, value, note in main():
        print(f"| {name} | {value:.1f} | {note} |")
