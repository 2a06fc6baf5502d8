"""Migrations, the migration check, posts persistence and SQLite's settings, on both backends."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, bindparam, column, inspect, select, table, update
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError

from mailer import db
from mailer.db.models import Base, SubscriberRow
from mailer.db.prepared import Prepared
from mailer.errors import DatabaseError, NotFoundError
from mailer.posts import Post
from mailer.posts.store import get_post, list_posts, save_post

PAID = Post(
    slug="the-harbour",
    title="The Harbour",
    subtitle="Boats, mostly",
    author="Ada Writer",
    date=dt.date(2026, 3, 1),
    audience="paid",
    preheader="A quiet morning",
    body="Above the fold.\n\nBelow the fold.",
    free_body="Above the fold.",
)
FREE = Post(
    slug="notes",
    title="Notes",
    subtitle=None,
    author=None,
    date=None,
    audience="everyone",
    preheader=None,
    body="Just notes.",
    free_body=None,
)


def test_upgrade_creates_every_table_and_is_idempotent(db_url: str) -> None:
    db.upgrade(db_url)
    db.upgrade(db_url)
    engine = db.connect(db_url)
    try:
        db.check(engine)
        assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
    finally:
        engine.dispose()


def test_head_is_the_newest_migration_in_one_line() -> None:
    script = ScriptDirectory(str(db.MIGRATIONS))
    assert script.get_heads() == [db.head()], "migrations must form one numbered line"


def test_migrations_match_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
            },
        )
        assert compare_metadata(context, Base.metadata) == []


def test_unmigrated_database_is_refused(db_url: str) -> None:
    engine = db.connect(db_url)
    try:
        with pytest.raises(DatabaseError, match=r"is not migrated; run `mailer db upgrade`"):
            db.check(engine)
    finally:
        engine.dispose()


def test_unreachable_server_is_one_clear_line_without_the_password() -> None:
    engine = db.connect("postgresql+psycopg://mailer:s3cret@127.0.0.1:1/mailer")
    with pytest.raises(DatabaseError) as caught:
        db.check(engine)
    message = str(caught.value)
    assert message.startswith("cannot connect to database at postgresql+psycopg://mailer:***@")
    assert "s3cret" not in message
    assert "\n" not in message


def test_save_get_list_and_upsert(engine: Engine) -> None:
    with db.session(engine) as s:
        assert save_post(s, PAID, source="posts/harbour.md") is True
        assert save_post(s, FREE, source="posts/notes.md") is True
    with db.session(engine) as s:
        assert get_post(s, "the-harbour") == PAID
        assert list_posts(s) == [PAID, FREE]  # dated first, newest first

    changed = dataclasses.replace(PAID, title="The Harbour, Revised", free_body=None)
    with db.session(engine) as s:
        assert save_post(s, changed, source="posts/harbour.md") is False
    with db.session(engine) as s:
        assert get_post(s, "the-harbour") == changed
        assert len(list_posts(s)) == 2


def test_missing_post_names_the_slug(engine: Engine) -> None:
    with db.session(engine) as s, pytest.raises(NotFoundError, match="'nope'"):
        get_post(s, "nope")


def test_a_failed_block_stores_nothing(engine: Engine) -> None:
    with pytest.raises(RuntimeError), db.session(engine) as s:
        save_post(s, FREE, source="notes.md")
        raise RuntimeError("boom")
    with db.session(engine) as s:
        assert list_posts(s) == []


def test_timestamps_come_back_as_utc(engine: Engine) -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    with db.session(engine) as s:
        s.add(
            _subscriber("ada@example.com", trial_ends_at=dt.datetime(2026, 5, 1, 13, tzinfo=paris))
        )
    with db.session(engine) as s:
        row = s.scalars(select(SubscriberRow)).one()
        assert row.trial_ends_at == dt.datetime(2026, 5, 1, 12, tzinfo=dt.UTC)
        assert row.trial_ends_at.tzinfo == dt.UTC
        assert row.created_at.tzinfo == dt.UTC
        assert row.tier == "free" and row.status == "active"


def test_naive_timestamps_are_refused(engine: Engine) -> None:
    with pytest.raises(StatementError, match="naive datetime"), db.session(engine) as s:
        s.add(_subscriber("ada@example.com", trial_ends_at=dt.datetime(2026, 5, 1)))


def test_email_key_is_unique(engine: Engine) -> None:
    with db.session(engine) as s:
        s.add(_subscriber("Ada@Example.com"))
    with pytest.raises(IntegrityError), db.session(engine) as s:
        s.add(_subscriber("ada@example.COM"))


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "mailer.db"
    engine = db.connect(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
        assert path.is_file()
    finally:
        engine.dispose()


def _subscriber(email: str, trial_ends_at: dt.datetime | None = None) -> SubscriberRow:
    key = email.lower()
    return SubscriberRow(
        email=email, email_key=key, domain=key.rpartition("@")[2], trial_ends_at=trial_ends_at
    )


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_concurrent_upgrades_of_a_fresh_postgresql_database_both_succeed(db_url: str) -> None:
    env = {**os.environ, "MAILER_DATABASE_URL": db_url}
    upgrades = [
        subprocess.Popen(
            [str(Path(sys.executable).parent / "mailer"), "db", "upgrade"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for upgrade in upgrades:
        _, err = upgrade.communicate(timeout=120)
        assert upgrade.returncode == 0, err
    engine = db.connect(db_url)
    db.check(engine)
    engine.dispose()


def test_a_prepared_statement_runs_the_sql_sqlalchemy_compiles_with_typed_values(
    engine: Engine,
) -> None:
    with db.session(engine) as s:
        s.add_all([_subscriber("ada@example.com"), _subscriber("bob@example.com")])
    paris = dt.timezone(dt.timedelta(hours=1))
    statement = (
        update(SubscriberRow)
        .where(SubscriberRow.email == bindparam("address"), SubscriberRow.tier == "free")
        .values(
            trial_ends_at=bindparam("ends"),
            tier="trial",
            updated_at=bindparam("ends"),
        )
        .returning(SubscriberRow.email)
    )
    prepared = Prepared.of(statement, engine.dialect)
    assert prepared.sql == str(statement.compile(dialect=engine.dialect))
    ends = dt.datetime(2026, 5, 1, 13, tzinfo=paris)
    with engine.begin() as conn:
        found = prepared.run(conn, {"address": "ada@example.com", "ends": ends}).scalars().all()
        assert found == ["ada@example.com"]
        # Run again, it finds the row no longer free: the literal "free" went in as a value.
        assert prepared.run(conn, {"address": "ada@example.com", "ends": ends}).all() == []
        prepared.run_many(conn, [{"address": "bob@example.com"}], shared={"ends": ends})
    with db.session(engine) as s:
        rows = s.scalars(select(SubscriberRow).order_by(SubscriberRow.email)).all()
        # Through the column's type: converted to UTC on the way in, as SQLAlchemy would.
        assert [(r.tier, r.trial_ends_at) for r in rows] == [
            ("trial", dt.datetime(2026, 5, 1, 12, tzinfo=dt.UTC)),
            ("trial", dt.datetime(2026, 5, 1, 12, tzinfo=dt.UTC)),
        ]
    with pytest.raises(ValueError, match="naive datetime"), engine.begin() as conn:
        prepared.run(conn, {"address": "ada@example.com", "ends": dt.datetime(2026, 5, 1)})


def test_a_prepared_statement_fails_as_sqlalchemy_would(engine: Engine) -> None:
    """As SQLAlchemy's own exception, which the ledger tells faults by."""
    prepared = Prepared.of(select(column("x")).select_from(table("nowhere")), engine.dialect)
    with pytest.raises(DBAPIError, match="nowhere"), engine.begin() as conn:
        prepared.run(conn, {})


def test_what_cannot_be_prepared_is_refused(engine: Engine) -> None:
    lists = select(SubscriberRow.id).where(SubscriberRow.id.in_(bindparam("ids", expanding=True)))
    with pytest.raises(ValueError, match="ids is an expanding parameter"):
        Prepared.of(lists, engine.dialect)
    # updated_at's onupdate would be computed per execution, which a prepared statement skips.
    with pytest.raises(ValueError, match="Python-side default"):
        Prepared.of(update(SubscriberRow).values(tier="paid"), engine.dialect)
