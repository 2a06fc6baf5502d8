"""Sends: drop ``is_test``, which nothing ever set.

A test send (``mailer send --test-to``) goes to one address outside the ledger by design, so
no send row was ever a test; the column only made ``stats`` filter on a constant.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sends") as batch:
        batch.drop_column("is_test")


def downgrade() -> None:
    with op.batch_alter_table("sends") as batch:
        batch.add_column(
            sa.Column("is_test", sa.Boolean(), server_default=sa.text("(false)"), nullable=False)
        )
