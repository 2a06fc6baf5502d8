"""Database access: engines, sessions and migrations (SQLite in WAL mode, or PostgreSQL).

``connect`` builds an engine, ``upgrade`` migrates a database to the newest schema, and
``check`` refuses a database that is unreachable or not migrated, with one clear line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    column,
    create_engine,
    event,
    inspect,
    make_url,
    select,
    table,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from mailer.config import masked
from mailer.db.models import utcnow
from mailer.errors import DatabaseError

# Alembic is imported inside the functions that need it: importing it costs ~0.3 s, which
# every command would pay at start for nothing (``check`` does not need it on the happy path).
if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "check",
    "connect",
    "driver_cursor",
    "head",
    "revision",
    "session",
    "shown",
    "upgrade",
    "utcnow",
]

MIGRATIONS = Path(__file__).parent / "migrations"
UPGRADE_LOCK = 0x6D61696C  # "mail": the advisory lock key `upgrade` holds on PostgreSQL


def head() -> str:
    """The newest schema revision, read from the migration files' names (NNNN_what.py).

    Migrations are numbered in one line, so the largest number is the head; a test checks
    that Alembic agrees.
    """
    return max(p.name[:4] for p in (MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


def shown(url: str | URL) -> str:
    """The URL as it may appear in messages and logs: password masked."""
    return masked(url.render_as_string(hide_password=False) if isinstance(url, URL) else url)


def driver_cursor(conn: Connection) -> Any:
    """The driver's own cursor under ``conn`` (psycopg on PostgreSQL), in its transaction:
    for what SQLAlchemy cannot do as fast, such as COPY or a parameter that is an array."""
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def connect(url: str) -> Engine:
    """An engine for ``url``; connecting is lazy, so call ``check`` to fail early."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed)
    # Fail fast on an unreachable server instead of hanging on the OS default.
    return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 5})


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        _owner_only(Path(database))
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets readers (stats, tracker) run beside one writer; busy_timeout makes a
        # second writer wait for the lock rather than fail at once.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()

    return engine


def _owner_only(path: Path) -> None:
    """Create the database file readable by its owner only, and make an existing one so: it
    holds every reader's address. SQLite gives its -wal, -shm and -journal files the
    database's own mode; those left by an earlier version are tightened too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for name in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        with contextlib.suppress(OSError):  # absent, or someone else's: SQLite will say
            mode = name.stat().st_mode
            if mode & 0o077:
                name.chmod(mode & 0o700)


@contextmanager
def session(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block ends normally and rolls back otherwise."""
    # Rows read in a block stay usable after its commit, to be converted to dataclasses.
    with Session(engine, expire_on_commit=False) as s, s.begin():
        yield s


def _config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(url: str) -> None:
    """Migrate the database at ``url`` to the newest schema; a no-op when it is there already."""
    from alembic import command

    engine = connect(url)
    try:
        with _connection(engine) as connection:
            sqlite = connection.dialect.name == "sqlite"
            if not sqlite:
                # Two upgrades at once (two containers starting) take turns: the second finds
                # the schema at head. Held until this connection closes.
                connection.exec_driver_sql(f"SELECT pg_advisory_lock({UPGRADE_LOCK})")
                connection.commit()
            if sqlite:
                # Batch migrations rebuild SQLite tables by copy-and-drop; with foreign keys
                # on, the drop would cascade. The pragma only takes effect outside a transaction.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            config = _config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise DatabaseError(f"migration left broken foreign keys: {broken[:3]}")
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
    finally:
        engine.dispose()


def revision(url: str, message: str) -> Path:
    """Write a new migration autogenerated from the models' difference to the database at ``url``.

    For developers working from a checkout; the database must be at head first.
    """
    from alembic import command

    engine = connect(url)
    try:
        check(engine)
        with _connection(engine) as connection:
            config = _config()
            config.attributes["connection"] = connection
            script = command.revision(
                config, message=message, autogenerate=True, rev_id=f"{int(head()) + 1:04d}"
            )
    finally:
        engine.dispose()
    assert script is not None and not isinstance(script, list)
    return Path(script.path)


def check(engine: Engine) -> None:
    """Raise ``DatabaseError`` unless the database answers and its schema is at head."""
    with _connection(engine) as connection:
        current: set[str] = set()
        if inspect(connection).has_table("alembic_version"):
            version = table("alembic_version", column("version_num"))
            current = set(connection.scalars(select(version.c.version_num)))
    if current == {head()}:
        return
    from alembic.script import ScriptDirectory

    known = {rev.revision for rev in ScriptDirectory.from_config(_config()).walk_revisions()}
    unknown = sorted(current - known)
    if unknown:
        raise DatabaseError(
            f"database at {shown(engine.url)} has schema revision {unknown[0]}, "
            "which this version of mailer does not know; upgrade mailer"
        )
    raise DatabaseError(f"database at {shown(engine.url)} is not migrated; run `mailer db upgrade`")


@contextmanager
def _connection(engine: Engine) -> Iterator[Connection]:
    try:
        connection = engine.connect()
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "no answer"
        raise DatabaseError(
            f"cannot connect to database at {shown(engine.url)}: {reason}"
        ) from None
    with connection:
        yield connection
