"""Subscriber import benchmark (issue 3).

Target: 1,000,000 generated rows imported on SQLite in at most 60 s with peak RSS at most
300 MB; then the same on PostgreSQL (a throwaway database, dropped afterwards). Each import
runs in a child process, which reports its own time and peak RSS, so the generator and this
process do not count. A second import of the same file measures the nothing-to-change path.
"""

from __future__ import annotations

import csv
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.databases import postgres_database
from mailer import db
from mailer.subscribers import import_csv

ROWS = 1_000_000
DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "proton.me", "fastmail.com", "example.org"]
TAGS = ["politics", "culture", "science", "sport", "local", "weekly"]
CITIES = ["Paris", "Zürich", "Lisbon", "Oslo", "Kraków", "Porto", ""]


def generate(path: Path, rows: int, seed: int = 3) -> None:
    """``rows`` data rows: all tiers, tags, an attribute; 0.1% bad rows, 0.1% duplicates."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["email", "name", "tier", "tags", "trial_ends_at", "city"])
        for i in range(rows):
            n = rng.randrange(i) if i and rng.random() < 0.001 else i  # an earlier reader again
            tier = rng.choices(["free", "trial", "paid", "comped"], [70, 10, 15, 5])[0]
            writer.writerow(
                [
                    f"Reader.{n}@{DOMAINS[n % len(DOMAINS)]}"
                    if rng.random() >= 0.001
                    else f"reader{n}-at-nowhere",
                    f"Reader {n}",
                    tier,
                    ";".join(rng.sample(TAGS, rng.randrange(3))),
                    "2026-06-01" if tier == "trial" else "",
                    rng.choice(CITIES),
                ]
            )


def child(url: str, path: str) -> None:
    """Run in a fresh process: import ``path`` and print time, counts and peak RSS as JSON."""
    engine = db.connect(url)
    start = time.perf_counter()
    result = import_csv(engine, Path(path))
    elapsed = time.perf_counter() - start
    engine.dispose()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": elapsed, "rss_mb": rss_mb, **result.as_dict()}))


def measure(url: str, path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.import_bench", url, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return dict(json.loads(out.stdout))


def rows_for(backend: str, url: str, path: Path) -> list[tuple[str, float, str]]:
    db.upgrade(url)
    first, again = measure(url, path), measure(url, path)
    counts = (
        f"{first['created']:,} created, {first['rejected']:,} rejected, "
        f"{first['duplicates']:,} duplicates"
    )
    return [
        (f"import {ROWS:,} rows, {backend} (s)", first["seconds"], f"target <= 60; {counts}"),
        (f"  peak RSS, {backend} (MB)", first["rss_mb"], "target <= 300; child process"),
        (
            f"re-import the same file, {backend} (s)",
            again["seconds"],
            f"{again['unchanged']:,} unchanged; peak RSS {again['rss_mb']:.0f} MB",
        ),
    ]


def main() -> list[tuple[str, float, str]]:
    with tempfile.TemporaryDirectory(prefix="mailer-bench-") as tmp:
        path = Path(tmp) / "readers.csv"
        generate(path, ROWS)
        results = rows_for("SQLite", f"sqlite:///{tmp}/bench.db", path)
        with postgres_database() as url:
            results += rows_for("PostgreSQL", url, path)
    return results


if __name__ == "__main__":
    child(*sys.argv[1:])
