"""Segment count benchmark (issue 3).

Target: ``count(session, 'tier:free AND tag:politics')`` over 1,000,000 subscribers in at most
500 ms, on SQLite and on PostgreSQL. Each backend gets a throwaway database, loaded with the
same generated population (Core executemany on SQLite, COPY on PostgreSQL) and ANALYZEd.
Baseline in the same run: a plain ``SELECT count(*) FROM subscribers`` on each.
"""

from __future__ import annotations

import datetime as dt
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, insert, text

from bench.compose_bench import best_of
from bench.databases import postgres_database
from mailer import db, segments
from mailer.db.models import SubscriberRow, SubscriberTagRow

N = 1_000_000
CHUNK = 50_000
EXPR = "tier:free AND tag:politics"

TIERS = {"free": 0.40, "paid": 0.35, "trial": 0.15, "comped": 0.10}
STATUSES = {"active": 0.90, "unsubscribed": 0.06, "bounced": 0.03, "complained": 0.01}
# Independent chances per reader, so readers have zero to several tags (about 1.2 on average).
TAGS = {
    "weekly-digest": 0.30,
    "culture": 0.25,
    "tech": 0.20,
    "politics": 0.15,
    "sport": 0.10,
    "local": 0.05,
    "vip": 0.01,
}
# A few big mailbox providers, then a long tail of small domains.
DOMAINS = {"gmail.com": 0.35, "yahoo.com": 0.10, "outlook.com": 0.10, "icloud.com": 0.05}
TAIL = [f"company{i}.example" for i in range(5_000)]
START = dt.datetime(2023, 1, 1, tzinfo=dt.UTC)
SPAN_S = 3 * 365 * 86_400

Row = tuple[int, str, str, str, str, dt.datetime]  # id, email, domain, tier, status, created_at
Chunk = tuple[list[Row], list[tuple[int, str]]]


def population(seed: int = 3) -> Iterator[Chunk]:
    """The same N readers for every backend, in chunks of subscribers and their tags."""
    rng = random.Random(seed)
    tiers, tier_weights = list(TIERS), list(TIERS.values())
    statuses, status_weights = list(STATUSES), list(STATUSES.values())
    big, big_weights = list(DOMAINS), list(DOMAINS.values())
    tail_share = 1 - sum(big_weights)
    for first in range(1, N + 1, CHUNK):
        ids = range(first, min(first + CHUNK, N + 1))
        rows: list[Row] = []
        tags: list[tuple[int, str]] = []
        for i, tier, status in zip(
            ids,
            rng.choices(tiers, tier_weights, k=len(ids)),
            rng.choices(statuses, status_weights, k=len(ids)),
            strict=True,
        ):
            domain = (
                rng.choice(TAIL) if rng.random() < tail_share else rng.choices(big, big_weights)[0]
            )
            created = START + dt.timedelta(seconds=rng.randrange(SPAN_S))
            rows.append((i, f"reader{i}@{domain}", domain, tier, status, created))
            tags.extend((i, tag) for tag, p in TAGS.items() if rng.random() < p)
        yield rows, tags


def load_sqlite(connection: Connection) -> None:
    for rows, tags in population():
        connection.execute(
            insert(SubscriberRow),
            [
                {
                    "id": i,
                    "email": email,
                    "email_key": email,
                    "domain": domain,
                    "tier": tier,
                    "status": status,
                    "created_at": created,
                    "updated_at": created,
                }
                for i, email, domain, tier, status, created in rows
            ],
        )
        connection.execute(
            insert(SubscriberTagRow), [{"subscriber_id": i, "tag": tag} for i, tag in tags]
        )
    connection.commit()


def load_postgres(connection: Connection) -> None:
    columns = "id, email, email_key, domain, tier, status, created_at, updated_at"
    raw = connection.connection  # COPY is psycopg's own API
    cursor = raw.cursor()
    for rows, tags in population():
        with cursor.copy(f"COPY subscribers ({columns}) FROM STDIN") as copy:
            for i, email, domain, tier, status, created in rows:
                copy.write_row((i, email, email, domain, tier, status, created, created))
        with cursor.copy("COPY subscriber_tags (subscriber_id, tag) FROM STDIN") as copy:
            for row in tags:
                copy.write_row(row)
    raw.commit()


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="mailer_bench_") as folder:
        yield f"sqlite:///{Path(folder) / 'bench.db'}"


def measure(
    label: str,
    database: Callable[[], AbstractContextManager[str]],
    load: Callable[[Connection], None],
) -> list[tuple[str, float, str]]:
    with database() as url:
        db.upgrade(url)
        engine: Engine = db.connect(url)
        try:
            with engine.connect() as connection:
                start = time.perf_counter()
                load(connection)
                load_s = time.perf_counter() - start
                connection.execute(text("ANALYZE"))
                connection.commit()
            with db.session(engine) as session:
                matches = segments.count(session, EXPR)
                count_s = best_of(7, lambda: segments.count(session, EXPR))
                baseline_s = best_of(
                    7,
                    lambda: session.execute(text("SELECT count(*) FROM subscribers")).scalar_one(),
                )
        finally:
            engine.dispose()
    return [
        (
            f"{label}: count '{EXPR}' (ms)",
            count_s * 1e3,
            f"target <= 500; {matches:,} of {N:,}; loaded in {load_s:.0f} s",
        ),
        (f"{label}: baseline SELECT count(*) FROM subscribers (ms)", baseline_s * 1e3, "same run"),
    ]


def main() -> list[tuple[str, float, str]]:
    return measure("SQLite", sqlite_database, load_sqlite) + measure(
        "PostgreSQL", postgres_database, load_postgres
    )
