"""Shared fixtures: a fresh database on each backend, migrated or not, and a Redis database.

Markers say what a test needs, so a run can leave out what it lacks or what is slow:

- ``postgres``: the PostgreSQL server. Such tests create a database of their own on the server
  at ``TEST_POSTGRES_URL`` (default postgresql+psycopg://postgres@127.0.0.1:5432/test, used
  only as the admin connection) and drop it afterwards. Given by ``db_url``'s second param.
- ``redis``: the Redis server at ``TEST_REDIS_SERVER`` (default 127.0.0.1:6379; point it at a
  server of your own to run two suites side by side). Given to every test using ``redis_db``:
  one database of that server (``REDIS_URL``, never 0), flushed before and after the test.
- ``subprocess``: starts processes (the ``mailer`` command, Celery, redis-server, Postfix,
  Chromium...). Set by hand; a test without it that starts one fails, so ``make test-fast``
  (``-m "not subprocess and not outage"``) stays in-process.
- ``outage``: a send through real worker processes with a fault injected (slow).

The tests run in development mode (``MAILER_ENV=dev``: the built-in signing key is allowed);
helpers that run a command with a clean environment set it again (``dev_env``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import DEV
from sqlalchemy import Engine, create_engine, make_url, text

from mailer import db
from mailer.db.models import Base

ADMIN_URL = make_url(
    os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
).set(drivername="postgresql+psycopg")


os.environ.update(DEV)


REDIS_HOST, _, _port = os.environ.get("TEST_REDIS_SERVER", "127.0.0.1:6379").rpartition(":")
REDIS_PORT = int(_port)


# The suite's own database of the test server, never 0 (others use it); one per xdist worker
# (gw0 uses 9, gw1 10, ...), as each flushes its own.
REDIS_DB = 9 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    """The suite's Redis database (``REDIS_URL``), flushed before and after the test."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "redis_db" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.redis)


# Set while a test without the ``subprocess`` marker runs: starting a process then fails it.
_in_process: list[str] = []


def _no_process(event: str, args: tuple[Any, ...]) -> None:
    if _in_process and event in ("subprocess.Popen", "os.system", "os.posix_spawn", "os.exec"):
        raise RuntimeError(f"{_in_process[0]} starts a process: mark it @pytest.mark.subprocess")


sys.addaudithook(_no_process)


@pytest.fixture(autouse=True)
def _markers_are_honest(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("subprocess") is not None:
        yield
        return
    _in_process.append(request.node.nodeid)
    try:
        yield
    finally:
        _in_process.clear()


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    # CREATE/DROP DATABASE cannot run inside a transaction.
    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def _pg_url(name: str) -> str:
    return ADMIN_URL.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated once per run, for each test's ``engine`` to copy."""
    path = tmp_path_factory.mktemp("migrated") / "mailer.db"
    db.upgrade(f"sqlite:///{path}")  # disposed after: the WAL is checkpointed into the file
    return path


@pytest.fixture(scope="session")
def migrated_postgres(pg_admin: Engine) -> Iterator[str]:
    """The run's one migrated PostgreSQL database, which each ``engine`` test gets emptied."""
    name = f"mailer_m_{secrets.token_hex(6)}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        db.upgrade(_pg_url(name))
        yield name
    finally:
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _emptied(admin: Engine, name: str) -> None:
    """Every row of the migrated database gone, its ids starting again at 1: as new."""
    with admin.connect() as conn:
        # A connection the last test leaked must not hold a lock the DELETEs wait for.
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
    engine = create_engine(_pg_url(name), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            sequences = conn.scalars(
                text(
                    "SELECT format('%I', sequencename) FROM pg_sequences "
                    "WHERE schemaname = 'public'"
                )
            ).all()
            # DELETE, not TRUNCATE: on a test's few rows ~20 ms, where TRUNCATE takes ~135 ms
            # (new files for every table and index). Referencing tables first.
            conn.exec_driver_sql(
                "; ".join(
                    [
                        *(f'DELETE FROM "{t.name}"' for t in reversed(Base.metadata.sorted_tables)),
                        *(f"ALTER SEQUENCE {sequence} RESTART" for sequence in sequences),
                    ]
                )
            )
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh database: empty, or migrated if the test asks for ``engine`` too.

    Creating and migrating a database is most of a test's set-up, so a migrated one is a copy
    of one migrated once per run (SQLite), or the run's one migrated database emptied
    (PostgreSQL); test_db proves the migrations themselves, on empty databases."""
    migrated = "engine" in request.fixturenames
    if request.param == "sqlite":
        path = tmp_path / "var" / "mailer.db"
        if migrated:
            path.parent.mkdir()
            shutil.copy(request.getfixturevalue("migrated_sqlite"), path)  # its mode 0600 too
        yield f"sqlite:///{path}"
        return
    admin: Engine = request.getfixturevalue("pg_admin")
    if migrated:
        name = request.getfixturevalue("migrated_postgres")
        _emptied(admin, name)
        yield _pg_url(name)
        return
    name = f"mailer_t_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield _pg_url(name)
    finally:
        with admin.connect() as conn:
            # FORCE: a connection the test leaked must not keep the database alive.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# For a test whose backend is incidental (what a command prints, how it fails): SQLite alone.
# The library's work with each backend is proven in process, on both.
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A migrated database, on each backend (see ``db_url``)."""
    migrated = db.connect(db_url)
    yield migrated
    migrated.dispose()
