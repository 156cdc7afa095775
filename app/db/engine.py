"""Engines, with SQLite tuned for one writer and many readers."""

from sqlalchemy import Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
        cursor = dbapi_connection.cursor()
        # WAL lets readers go on while the journal writes; NORMAL still survives a process
        # crash (only a power cut can lose the last commits).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def create_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _tune_sqlite(engine.sync_engine)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def create_blocking_sqlite_engine(async_engine: AsyncEngine) -> Engine | None:
    """For SQLite, a plain (blocking) engine on the same file, for the journal's own thread: a
    whole commit then costs one hop between threads instead of one per statement. None for
    other databases, whose async drivers need no threads at all."""
    if async_engine.dialect.name != "sqlite":
        return None
    url = async_engine.url.set(drivername="sqlite")
    engine = create_sync_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
    _tune_sqlite(engine)
    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)
