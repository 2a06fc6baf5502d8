"""Shared fixtures: a fresh database on each backend, migrated or not.

PostgreSQL tests create a database of their own on the server at ``TEST_POSTGRES_URL``
(default postgresql+psycopg://postgres@127.0.0.1:5432/test, used only as the admin
connection) and drop it afterwards. Deselect them with ``-m "not postgres"``.
Redis tests use numbered databases of the server at ``TEST_REDIS_SERVER`` (default
127.0.0.1:6379; point it at a server of your own to run two suites side by side).

The tests run in development mode (``MAILER_ENV=dev``: the built-in signing key is allowed);
helpers that run a command with a clean environment set it again (``dev_env``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, create_engine, make_url, text

from mailer import db

ADMIN_URL = make_url(
    os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
).set(drivername="postgresql+psycopg")


DEV = {"MAILER_ENV": "dev"}
os.environ.update(DEV)


def dev_env(**env: str) -> dict[str, str]:
    """This process's environment without its ``MAILER_*`` settings, in development mode,
    with ``env`` added: what a command run by a test sees."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return {**clean, **DEV, **env}


REDIS_HOST, _, _port = os.environ.get("TEST_REDIS_SERVER", "127.0.0.1:6379").rpartition(":")
REDIS_PORT = int(_port)


def redis_url(database: int) -> str:
    """The URL of one of the test server's databases (never 0: others use it)."""
    assert database != 0
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{database}"


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    # CREATE/DROP DATABASE cannot run inside a transaction.
    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty database (nothing created in it yet)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'var' / 'mailer.db'}"
        return
    admin: Engine = request.getfixturevalue("pg_admin")
    name = f"mailer_t_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield ADMIN_URL.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            # FORCE: a connection the test leaked must not keep the database alive.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A migrated database, on each backend."""
    db.upgrade(db_url)
    migrated = db.connect(db_url)
    yield migrated
    migrated.dispose()


@contextmanager
def own_redis(url: str) -> Iterator[redis.Redis]:
    """A suite's own Redis database (never 0: others use it), flushed before and after."""
    client = redis.Redis.from_url(url)
    assert client.connection_pool.connection_kwargs.get("db", 0) != 0, url
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()
