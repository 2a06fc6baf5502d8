"""Deliveries: whether a failure was a hard bounce, as delivery decided it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 05:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "deliveries",
        sa.Column("bounced", sa.Boolean(), server_default=sa.text("(false)"), nullable=False),
    )
    # Failures recorded before this column: delivery wrote a bounce's reply as "5xx ..." (but
    # "5xx sender ... refused: ..." when our sender was refused) or "invalid recipient: ...".
    op.execute(
        "UPDATE deliveries SET bounced = true WHERE state = 'failed' AND ("
        "(last_reply LIKE '5%' AND last_reply NOT LIKE '5__ sender % refused:%')"
        " OR last_reply LIKE 'invalid recipient:%')"
    )


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("bounced")
