"""Command start (issue 14): ``mailer --help`` and ``mailer segments count``, start to exit.

Targets: each under 0.5 s. The count runs on a SQLite database of ``BENCH_CLI_READERS``
(default 10,000) readers imported through the CLI, with an expression that reads the tags
table; ``--help`` anywhere. Baseline in the same run, alternated with the command run for run:
``python -c 'import sqlalchemy.orm'``, the least any command that reads the database must load
(a machine's speed drifts; the ratio to it does not). Medians of ``RUNS`` runs each.
"""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.processes import dev_env
from bench.send_bench import Row, print_row

READERS = int(os.environ.get("BENCH_CLI_READERS", "10000"))
RUNS = 21
TARGET_S = 0.5
EXPR = "tier:paid AND NOT tag:politics"
BIN = Path(sys.executable).parent
FLOOR = [sys.executable, "-c", "import sqlalchemy.orm"]


def _wall(command: Sequence[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def _medians(command: Sequence[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """The command's median wall time and the floor's, run in turn."""
    ours, floor = [], []
    for _ in range(RUNS):
        ours.append(_wall(command, env, cwd))
        floor.append(_wall(FLOOR, env, cwd))
    return statistics.median(ours), statistics.median(floor)


def main(report: Callable[[Row], None] = lambda row: None) -> list[Row]:
    out: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cli_bench_") as name:
        folder = Path(name)
        env = dev_env(MAILER_DATABASE_URL=f"sqlite:///{folder / 'mailer.db'}")
        with (folder / "readers.csv").open("w", newline="", encoding="utf-8") as f:
            rows = csv.writer(f)
            rows.writerow(["email", "name", "tier", "tags"])
            for i in range(READERS):
                rows.writerow(
                    [
                        f"r{i}@example.org",
                        "",
                        ("free", "paid")[i % 2],
                        "politics" if i % 3 == 0 else "",
                    ]
                )
        mailer = str(BIN / "mailer")
        subprocess.run(
            [mailer, "db", "upgrade"], env=env, cwd=folder, check=True, capture_output=True
        )
        subprocess.run(
            [mailer, "subscribers", "import", "readers.csv"],
            env=env,
            cwd=folder,
            check=True,
            capture_output=True,
        )
        for label, args in (
            ("`mailer --help`", ["--help"]),
            (f"`mailer segments count '{EXPR}'`, {READERS:,} readers", ["segments", "count", EXPR]),
        ):
            median, floor = _medians([mailer, *args], env, folder)
            verdict = "met" if median <= TARGET_S else "missed"
            row = (
                f"{label}, start to exit (ms)",
                median * 1000,
                f"`import sqlalchemy.orm` {floor * 1000:.0f} ms in turn ({median / floor:.2f}x); "
                f"target <= {TARGET_S * 1000:.0f} ms: {verdict}",
            )
            report(row)
            out.append(row)
    return out


if __name__ == "__main__":
    main(print_row)
