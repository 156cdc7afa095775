"""images.attempts, and the chore_leases table

An image counts the times a worker took it: past IMAGE_MAX_ATTEMPTS it fails, and the count is
the latest taker's lease. Scaled out, the periodic chores (sweep, retention) are leased to one
process at a time through chore_leases.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "chore_leases",
        sa.Column("name", sa.String(40), primary_key=True),
        sa.Column("holder", sa.String(100), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("chore_leases")
    op.drop_column("images", "attempts")
