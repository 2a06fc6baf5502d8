"""Billing: remember which reader a billing provider's customer id belongs to.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 03:25:52.329607
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "billing_customers",
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column(
            "subscriber_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_billing_customers_subscriber_id_subscribers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("provider", "customer_id", name=op.f("pk_billing_customers")),
    )
    op.create_index(
        op.f("ix_billing_customers_subscriber_id"),
        "billing_customers",
        ["subscriber_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_table("billing_customers")  # its index goes with it
