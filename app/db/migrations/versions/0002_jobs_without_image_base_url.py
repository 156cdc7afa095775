"""jobs no longer keep the base URL of the request that made them

Image links are signed when they are sent, for PUBLIC_BASE_URL or the URL of the request they
are sent on, so a Host header stored with a job is never used again.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("image_base_url")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("image_base_url", sa.String(length=500), nullable=False, server_default=""))
