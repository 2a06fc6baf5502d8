"""Subscribers: an id is never given twice, even after its reader was erased.

SQLite gives a new row the largest id plus one, so the reader added after the newest one was
erased got their id, and with it their anonymous tracking events and attribution. AUTOINCREMENT
makes SQLite remember the largest id ever given (in sqlite_sequence), which needs the table
rebuilt. The erased readers' ids that tracking events still carry are marked as given too.
PostgreSQL's identity sequence never goes back: nothing to do there.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 03:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "subscribers", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass
    # The copy set the sequence to the largest id left; an erased reader's may be larger.
    op.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'subscribers', 0"
        " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'subscribers')"
    )
    op.execute(
        "UPDATE sqlite_sequence SET seq = max(seq,"
        " (SELECT coalesce(max(subscriber_id), 0) FROM tracking_events))"
        " WHERE name = 'subscribers'"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "subscribers", recreate="always", table_kwargs={"sqlite_autoincrement": False}
    ):
        pass
