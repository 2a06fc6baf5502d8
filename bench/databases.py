"""Throwaway databases for a benchmark: PostgreSQL created and dropped, a private Redis."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

from bench.processes import accepts, free_port, stop, wait_for

# The admin connection only creates and drops the benchmark's own database.
ADMIN_URL = make_url(
    os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
).set(drivername="postgresql+psycopg")


@contextmanager
def postgres_database() -> Iterator[str]:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"mailer_bench_{secrets.token_hex(4)}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield ADMIN_URL.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A private ``redis-server`` on a free port, no persistence: the URL of its database 0.

    Its own server rather than a database of the shared one, which other jobs use and flush.
    """
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: accepts(port), 10, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process)
