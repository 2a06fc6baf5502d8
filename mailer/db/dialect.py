"""Where SQLite and PostgreSQL differ, each difference under a name that says what it does.

mailer runs on both; through SQLAlchemy most of its SQL is the same on either, and the rest is
here, so the other modules never compare dialect names. Where a module takes PostgreSQL's
faster road through its driver (arrays as one parameter, COPY), it asks ``is_postgresql``
and keeps both roads beside each other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Connection,
    Engine,
    Integer,
    SQLColumnExpression,
    Table,
    cast,
    create_engine,
    event,
    exists,
    func,
    select,
    text,
)
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from mailer.errors import DatabaseError

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite

Bind = Engine | Connection | Session
UPGRADE_LOCK = 0x6D61696C  # "mail": the advisory lock key `migrating` holds on PostgreSQL


def is_postgresql(bind: Bind) -> bool:
    """True on PostgreSQL, False on SQLite."""
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    return engine.dialect.name == "postgresql"


def engine(url: URL) -> Engine:
    """An engine for ``url``; connecting is lazy."""
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    # Fail fast on an unreachable server instead of hanging on the OS default.
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})


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
def migrating(connection: Connection) -> Iterator[None]:
    """Around a migration on ``connection``, which commits its own work."""
    if is_postgresql(connection):
        # Two upgrades at once (two containers starting) take turns: the second finds the
        # schema at head. Held until this connection closes.
        connection.exec_driver_sql(f"SELECT pg_advisory_lock({UPGRADE_LOCK})")
        connection.commit()
        yield
        return
    # Batch migrations rebuild SQLite tables by copy-and-drop; with foreign keys on, the drop
    # would cascade. The pragma only takes effect outside a transaction.
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    connection.commit()
    yield
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise DatabaseError(f"migration left broken foreign keys: {broken[:3]}")
    connection.exec_driver_sql("PRAGMA foreign_keys=ON")


def driver_cursor(conn: Connection) -> Any:
    """The driver's own cursor under ``conn`` (psycopg on PostgreSQL), in its transaction:
    for what SQLAlchemy cannot do as fast, such as COPY or a parameter that is an array."""
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def insert(bind: Bind, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into ``table`` (a Table or a mapped class) that can take ON CONFLICT."""
    # SQLAlchemy has ON CONFLICT only per dialect; both of ours speak it the same way. Each
    # dialect is imported where it is used: PostgreSQL's costs a SQLite command ~30 ms.
    if is_postgresql(bind):
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)


def lock_for_writing(conn: Connection, table: Table) -> None:
    """Hold, until the transaction ends, the right to write ``table``; reads go on."""
    if is_postgresql(conn):
        conn.execute(text(f"LOCK TABLE {table.name} IN EXCLUSIVE MODE"))
    else:  # the whole database's write lock, taken now rather than at the first write
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def analyze(conn: Connection, tables: Sequence[Table]) -> None:
    """Bring the planner's statistics of ``tables`` up to date (SQLite plans without them)."""
    if is_postgresql(conn):
        conn.execute(text(f"ANALYZE {', '.join(t.name for t in tables)}"))


def append(conn: Connection, table: Table, rows: Sequence[tuple[Any, ...]]) -> None:
    """Append rows (values of the table's first columns, in order) at driver speed."""
    if not rows:
        return
    names = [c.name for c in table.columns][: len(rows[0])]
    if is_postgresql(conn):
        with driver_cursor(conn).copy(f"COPY {table.name} ({', '.join(names)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    marks = ", ".join("?" for _ in names)
    conn.exec_driver_sql(f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({marks})", rows)


def epoch(bind: Bind, at: SQLColumnExpression[Any]) -> ColumnElement[int]:
    """The Unix time, in whole seconds, of the timestamp column ``at``."""
    if is_postgresql(bind):
        return cast(func.extract("epoch", at), BigInteger)
    return cast(func.strftime("%s", at), Integer)  # SQLite stores UTC text that strftime reads


def merge_json(
    bind: Bind, old: ColumnElement[Any], new: ColumnElement[Any]
) -> tuple[ColumnElement[Any], ColumnElement[bool]]:
    """``old`` with ``new``'s keys set, and whether that changes ``old``."""
    if is_postgresql(bind):
        return old.op("||")(new), ~old.op("@>", return_type=Boolean)(new)
    # Both sides come out of json_patch minified, so equal objects compare equal as text.
    merged = func.json_patch(old, new)
    return merged, merged != func.json_patch(old, "{}")


def has_any(
    bind: Bind,
    id_: SQLColumnExpression[int],
    ref: SQLColumnExpression[int],
    where: ColumnElement[bool],
) -> ColumnElement[bool]:
    """Whether some row of ``ref``'s table meeting ``where`` has ``ref`` equal to ``id_``."""
    # Measured over 1M readers: SQLite runs ``id IN (SELECT ...)`` once into a temporary
    # index, faster than EXISTS under AND, OR and NOT alike. PostgreSQL plans both alike
    # under AND, but cannot hash a large IN list under NOT or OR and falls back to a
    # quadratic plan; EXISTS becomes an anti-join there, or one index probe per reader.
    if is_postgresql(bind):
        return exists().where(ref == id_, where)
    return id_.in_(select(ref).where(where))
