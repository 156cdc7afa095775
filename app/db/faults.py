"""What a database failure means, read from what the database said, and the one retry policy
for writes that failed for a passing cause.

A write is retried when the database could not take it for a while (connections refused,
reset or exhausted, a role that may not log in now, a database restarting or recreated, a
lock or statement timeout, a read-only or full SQLite file); a write the database refused
for what it is (a broken constraint, say) is not. The cause is told by PostgreSQL's SQLSTATE
and SQLite's error code, never by the exception's class alone.
"""

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from tenacity import AsyncRetrying, retry_if_exception, stop_never, wait_exponential_jitter

logger = logging.getLogger("myflix.db")

# SQLSTATE classes and codes of a database that cannot take work now but will again.
_TRANSIENT_SQLSTATE_CLASSES = {
    "08": "the connection to the database failed",
    "53": "the database is out of resources",
    "57": "the database is shutting down or restarting",
    "58": "the database had an I/O error",
}
_TRANSIENT_SQLSTATES = {
    "53300": "the database has too many connections",
    "53100": "the database's disk is full",
    "28000": "the database refuses this role's login",
    "28P01": "the database refuses this role's password",
    "3D000": "the database does not exist (yet)",
    "55P03": "a lock was not granted in time",
    "57014": "a statement was canceled (timeout)",
    "25P03": "an idle transaction was ended (timeout)",
    "25006": "the database is read-only (a standby, or failing over)",
    "40001": "the transaction was rolled back (serialization)",
    "40P01": "the transaction was rolled back (deadlock)",
}
# Of the classes above, what a retry cannot mend: the client and server no longer agree.
_PERMANENT_SQLSTATES = frozenset({"08P01"})
_TRANSIENT_SQLITE_ERRORS = {
    "SQLITE_BUSY": "the SQLite database is locked",
    "SQLITE_LOCKED": "the SQLite database is locked",
    "SQLITE_READONLY": "the SQLite database is read-only",
    "SQLITE_FULL": "the disk of the SQLite database is full",
    "SQLITE_IOERR": "the SQLite database had an I/O error",
    "SQLITE_CANTOPEN": "the SQLite database cannot be opened",
    "SQLITE_PROTOCOL": "the SQLite database is locked",
}
# SQLite error names come with extended codes: SQLITE_READONLY_DBMOVED, SQLITE_IOERR_WRITE…
_SQLITE_REOPEN = ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR")

# Waits between attempts: doubling from a tenth of a second (plus up to a second of jitter),
# five seconds at most.
RETRY_INITIAL_SECONDS = 0.1
RETRY_MAX_SECONDS = 5.0


class DatabaseUnavailableError(Exception):
    """The database does not take writes (or reads) right now; try again in a moment."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"The database is unavailable right now ({cause}); retry in a moment.")
        self.cause = cause


@dataclass(frozen=True)
class TransientFault:
    cause: str
    # A SQLite connection opened read-only (or broken) stays so: open new ones.
    reopen_connections: bool = False


def transient_fault(exc: BaseException) -> TransientFault | None:
    """The passing cause of `exc`, or None when the database refused the write itself."""
    if isinstance(exc, DatabaseUnavailableError):
        return TransientFault(exc.cause)
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return TransientFault("the database cannot be reached")
    if isinstance(exc, PoolTimeoutError):
        return TransientFault("every connection to the database is busy")
    if not isinstance(exc, DBAPIError):
        return None
    original: Any = exc.orig
    if isinstance(original, sqlite3.Error):
        name = getattr(original, "sqlite_errorname", "") or ""
        base = next((known for known in _TRANSIENT_SQLITE_ERRORS if name.startswith(known)), None)
        if base is None:
            return None
        return TransientFault(_TRANSIENT_SQLITE_ERRORS[base], reopen_connections=name.startswith(_SQLITE_REOPEN))
    sqlstate = getattr(original, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        if sqlstate in _TRANSIENT_SQLSTATES:
            return TransientFault(_TRANSIENT_SQLSTATES[sqlstate])
        if sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES and sqlstate not in _PERMANENT_SQLSTATES:
            return TransientFault(_TRANSIENT_SQLSTATE_CLASSES[sqlstate[:2]])
        return None
    # No SQLSTATE: the driver lost the connection before the server said anything.
    if exc.connection_invalidated or isinstance(exc.orig, (OSError, ConnectionError)):
        return TransientFault("the connection to the database was lost")
    return None


class WriteHealth:
    """Whether writes go through, told to whoever listens when it changes. While they fail,
    `probe` (a write that changes nothing) is tried with backoff, so that recovery is noticed
    even when no write is left waiting (the one that failed was withdrawn)."""

    def __init__(self, probe: Callable[[], Awaitable[None]] | None = None) -> None:
        self.failure: str | None = None  # why writes fail now; None while they go through
        self._listeners: list[Callable[[str | None], None]] = []
        self._probe = probe
        self._probing: asyncio.Task[None] | None = None

    def listen(self, callback: Callable[[str | None], None]) -> None:
        self._listeners.append(callback)

    def failed(self, exc: BaseException) -> TransientFault | None:
        """A write failed for a passing cause (only those are retried)."""
        fault = transient_fault(exc)
        cause = fault.cause if fault is not None else "the database refused a write"
        if self.failure is None:
            logger.error("database writes fail (%s); retrying until they go through: %s", cause, exc)
            self._tell(cause)
            if self._probe is not None and self._probing is None:
                self._probing = asyncio.get_running_loop().create_task(self._probe_until_recovered())
        return fault

    def recovered(self) -> None:
        if self.failure is not None:
            logger.info("database writes go through again")
            self._tell(None)

    async def _probe_until_recovered(self) -> None:
        assert self._probe is not None
        try:
            async for attempt in write_retrying(lambda exc: None):
                with attempt:
                    if self.failure is None:
                        return  # a real write went through meanwhile
                    await self._probe()
            self.recovered()
        except Exception:
            logger.exception("the database write probe failed for good")
        finally:
            self._probing = None

    def _tell(self, failure: str | None) -> None:
        self.failure = failure
        for listener in self._listeners:
            listener(failure)


def is_transient(exc: BaseException) -> bool:
    return transient_fault(exc) is not None


def write_retrying(on_failure: Callable[[BaseException], None]) -> AsyncRetrying:
    """Attempts of one write: while the fault is transient, again after a growing pause, until
    it goes through; `on_failure(exc)` after each failed attempt."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential_jitter(multiplier=RETRY_INITIAL_SECONDS, max=RETRY_MAX_SECONDS),
        stop=stop_never,
        before_sleep=lambda state: on_failure(_exception_of(state.outcome)),
        reraise=True,
    )


def _exception_of(outcome: Any) -> BaseException:
    exc = outcome.exception() if outcome is not None else None
    return exc if exc is not None else RuntimeError("unknown failure")
