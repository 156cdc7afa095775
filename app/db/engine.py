"""Engines, with SQLite tuned for one writer and many readers."""

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from app.db.faults import transient_fault


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets readers go on while the journal writes; NORMAL still survives a process
        # crash (only a power cut can lose the last commits).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


# How long SQLite waits for a lock before it reports the database busy; the write is then
# retried, and a request waiting on it gives up at DB_WRITE_TIMEOUT_SECONDS.
SQLITE_BUSY_TIMEOUT_SECONDS = 2.0
# Connecting to PostgreSQL: a server that does not answer is unreachable, not slow.
CONNECT_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class PostgresLimits:
    """Session limits, so that no lock, statement or forgotten transaction holds others up."""

    pool_size: int = 10
    lock_timeout_seconds: float = 5.0
    statement_timeout_seconds: float = 30.0
    idle_in_transaction_timeout_seconds: float = 10.0

    def server_settings(self) -> dict[str, str]:
        return {
            "lock_timeout": _milliseconds(self.lock_timeout_seconds),
            "statement_timeout": _milliseconds(self.statement_timeout_seconds),
            "idle_in_transaction_session_timeout": _milliseconds(self.idle_in_transaction_timeout_seconds),
        }


def _milliseconds(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def plain_postgres_url(url: str) -> str:
    """The database URL as libpq and asyncpg itself take it (no SQLAlchemy driver name)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(url: str, limits: PostgresLimits = PostgresLimits()) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
        _tune_sqlite(engine.sync_engine)
        return engine
    return create_async_engine(
        url,
        pool_size=limits.pool_size,
        max_overflow=limits.pool_size,
        pool_pre_ping=True,
        # A connection that outlived a database restart or a terminated session is replaced.
        pool_recycle=300,
        connect_args={"server_settings": limits.server_settings(), "timeout": CONNECT_TIMEOUT_SECONDS},
    )


def create_blocking_sqlite_engine(async_engine: AsyncEngine) -> Engine | None:
    """For SQLite, a plain (blocking) engine on the same file, for the journal's own thread: a
    whole commit then costs one hop between threads instead of one per statement. None for
    other databases, whose async drivers need no threads at all."""
    if async_engine.dialect.name != "sqlite":
        return None
    url = async_engine.url.set(drivername="sqlite")
    engine = create_sync_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False})
    _tune_sqlite(engine)
    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def probe_writes(engine: AsyncEngine) -> None:
    """A write that changes nothing: whether the database takes writes now. Connections a
    fault left unable to write (SQLite opened read-only) are dropped, so the next try opens
    new ones."""
    try:
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE alembic_version SET version_num = version_num"))
    except Exception as exc:
        fault = transient_fault(exc)
        if fault is not None and fault.reopen_connections:
            await engine.dispose()
        raise
