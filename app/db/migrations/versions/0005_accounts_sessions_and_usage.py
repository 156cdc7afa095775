"""Accounts: users' role, disabled flag, own quota; sign-in sessions and their refresh tokens;
images used per user and UTC day

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as users:
        users.add_column(sa.Column("role", sa.String(16), nullable=False, server_default="user"))
        users.add_column(sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()))
        users.add_column(sa.Column("daily_image_quota", sa.Integer(), nullable=True))
        users.add_column(sa.Column("created_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "auth_sessions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("user_email", sa.String(254), sa.ForeignKey("users.email", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_reason", sa.String(40), nullable=True),
    )
    op.create_index("ix_auth_sessions_user", "auth_sessions", ["user_email"])
    op.create_table(
        "refresh_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("session_id", sa.String(40), sa.ForeignKey("auth_sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_refresh_tokens_session", "refresh_tokens", ["session_id"])
    op.create_table(
        "daily_usage",
        sa.Column("user_email", sa.String(254), sa.ForeignKey("users.email", ondelete="CASCADE"), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("images", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("daily_usage")
    op.drop_index("ix_refresh_tokens_session", "refresh_tokens")
    op.drop_table("refresh_tokens")
    op.drop_index("ix_auth_sessions_user", "auth_sessions")
    op.drop_table("auth_sessions")
    with op.batch_alter_table("users") as users:
        users.drop_column("created_at")
        users.drop_column("daily_image_quota")
        users.drop_column("disabled")
        users.drop_column("role")
