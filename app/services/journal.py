"""Every durable write goes through one journal task, which commits them in batches, in order.

A write is data (`Changes`: rows to insert, row states to set), not code, so everything
submitted while the previous commit ran is merged into one statement per kind: under load a
hundred state changes cost a handful of statements in one commit, and SQLite never sees two
writers. A write's `then` runs on the event loop right after its commit: that is where events
are published, so a subscriber never sees an event that a crash could take back.
"""

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import create_blocking_sqlite_engine
from app.db.repository import Changes, ConflictingWriteError, Repository

logger = logging.getLogger("myflix.journal")

RETRY_DELAYS_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)  # then every 5 s until it succeeds


@dataclass
class _Write:
    changes: Changes
    then: Callable[[], None] | None
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Journal:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._blocking_engine: Engine | None = create_blocking_sqlite_engine(engine)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._queue: asyncio.Queue[_Write] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.healthy = True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="journal")

    def write(self, changes: Changes, then: Callable[[], None] | None = None) -> asyncio.Future:
        """Queue a write; the future resolves once it is committed (and `then` has run)."""
        item = _Write(changes, then)
        self._queue.put_nowait(item)
        return item.done

    async def flush(self) -> None:
        await self.write(Changes())

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=True)
        if self._blocking_engine is not None:
            self._blocking_engine.dispose()

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._commit(batch)

    async def _commit(self, batch: list[_Write]) -> None:
        attempt = 0
        while True:
            try:
                await self._write([item.changes for item in batch])
            except (DBAPIError, OSError) as exc:
                if not _is_transient(exc):
                    # One write is at fault (say, a racing Idempotency-Key): commit the
                    # others alone and fail only that one.
                    if len(batch) > 1:
                        for item in batch:
                            await self._commit([item])
                    else:
                        batch[0].done.set_exception(ConflictingWriteError(str(exc)))
                    return
                self.healthy = False
                # Wait and retry, never drop: later events must not overtake this write.
                logger.error("database write failed (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(RETRY_DELAYS_SECONDS[min(attempt, len(RETRY_DELAYS_SECONDS) - 1)])
                attempt += 1
                continue
            break
        self.healthy = True
        for item in batch:
            if item.then is not None:
                try:
                    item.then()
                except Exception:  # a bug in one callback must not stop the journal
                    logger.exception("journal callback failed")
            item.done.set_result(None)


    async def _write(self, batch: list[Changes]) -> None:
        if self._blocking_engine is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._write_blocking, batch)
        else:
            async with self._engine.begin() as connection:
                await connection.run_sync(Repository.apply, batch)

    def _write_blocking(self, batch: list[Changes]) -> None:
        with self._blocking_engine.begin() as connection:
            Repository.apply(connection, batch)


def _is_transient(exc: Exception) -> bool:
    """A lost connection or a locked database passes; a broken constraint does not."""
    if isinstance(exc, OSError):
        return True
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError)
