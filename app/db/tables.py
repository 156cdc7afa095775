"""Storage models (SQLAlchemy). The API's schemas live apart, in app/models."""

from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "users"

    email: Mapped[str] = mapped_column(String(254), primary_key=True)  # normalised: trimmed, lower case
    full_name: Mapped[str] = mapped_column(String(200))
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16), default="user", server_default="user")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The user's own images per UTC day (0: unlimited); None: DAILY_IMAGE_QUOTA.
    daily_image_quota: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SessionRow(Base):
    """A sign-in, alive until it is logged out, revoked or its refresh token expires."""

    __tablename__ = "auth_sessions"
    __table_args__ = (Index("ix_auth_sessions_user", "user_email"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_email: Mapped[str] = mapped_column(ForeignKey("users.email", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_reason: Mapped[str | None] = mapped_column(String(40))


class RefreshTokenRow(Base):
    """Every refresh token a session was given, by its hash only: a rotated one that comes
    back gives its session away as stolen."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (Index("ix_refresh_tokens_session", "session_id"),)

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("auth_sessions.id", ondelete="CASCADE"))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DailyUsageRow(Base):
    """Images a user's jobs asked for on a UTC day, less those that failed or were canceled."""

    __tablename__ = "daily_usage"

    user_email: Mapped[str] = mapped_column(ForeignKey("users.email", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    images: Mapped[int] = mapped_column(Integer, default=0)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_email", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_created", "owner_email", "created_at", "id"),
        Index("ix_jobs_status", "status"),
        # Retention finds the jobs that finished longest ago.
        Index("ix_jobs_finished_at", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_email: Mapped[str] = mapped_column(ForeignKey("users.email"))
    prompt: Mapped[str] = mapped_column(Text)
    num_images: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    provider: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ttfi_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))


class ImageRow(Base):
    __tablename__ = "images"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    image_key: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    # Replicate's prediction id, stored as soon as it is known, to re-attach after a restart.
    prediction_id: Mapped[str | None] = mapped_column(String(100))
    # Times a worker took the image; the latest taker's lease (see domain.claimed).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ChoreLeaseRow(Base):
    """Who may do a periodic chore (a sweep, retention) across processes, and until when."""

    __tablename__ = "chore_leases"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    holder: Mapped[str] = mapped_column(String(100))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class EventRow(Base):
    """The job's SSE events exactly as sent, so ids keep their meaning across restarts."""

    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(16))
    data: Mapped[str] = mapped_column(Text)
