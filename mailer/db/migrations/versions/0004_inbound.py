"""Inbound mail: the messages handled (once each), and the bounces and complaints they carried.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 02:44:12
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NOW = sa.text("(CURRENT_TIMESTAMP)")


def upgrade() -> None:
    op.create_table(
        "inbound_messages",
        sa.Column("key", sa.String(length=32), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.CheckConstraint(
            "outcome IN ('hard', 'soft', 'complaint', 'unsubscribe', 'auto_reply', 'unmatched')",
            name=op.f("ck_inbound_messages_outcome"),
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_inbound_messages")),
    )
    op.create_table(
        "bounce_events",
        sa.Column("id", ID, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("subscriber_id", ID, nullable=False),
        sa.Column("send_id", ID, nullable=True),
        sa.Column("message_key", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=64), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.CheckConstraint(
            "kind IN ('hard', 'soft', 'complaint')", name=op.f("ck_bounce_events_kind")
        ),
        sa.ForeignKeyConstraint(
            ["send_id"],
            ["sends.id"],
            name=op.f("fk_bounce_events_send_id_sends"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_bounce_events_subscriber_id_subscribers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bounce_events")),
    )
    op.create_index(op.f("ix_bounce_events_send_id_kind"), "bounce_events", ["send_id", "kind"])
    op.create_index(
        op.f("ix_bounce_events_subscriber_id_kind_at"),
        "bounce_events",
        ["subscriber_id", "kind", "at"],
    )


def downgrade() -> None:
    op.drop_table("bounce_events")  # its indexes go with it
    op.drop_table("inbound_messages")
