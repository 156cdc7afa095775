"""Every durable write goes through one journal task, which commits them in batches, in order.

Whatever was submitted while the previous commit ran goes into the next one, so under load
many state changes share one commit, and SQLite never sees two writers. A write's `then`
runs on the event loop right after its commit: that is where events are published, so a
subscriber never sees an event that a crash could take back.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

logger = logging.getLogger("myflix.journal")

Apply = Callable[[AsyncSession], Awaitable[None]]

RETRY_DELAYS_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)  # then every 5 s until it succeeds


@dataclass
class _Write:
    apply: Apply
    then: Callable[[], None] | None
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Journal:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker
        self._queue: asyncio.Queue[_Write] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.healthy = True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="journal")

    def write(self, apply: Apply, then: Callable[[], None] | None = None) -> asyncio.Future:
        """Queue a write; the future resolves once it is committed (and `then` has run)."""
        item = _Write(apply, then)
        self._queue.put_nowait(item)
        return item.done

    async def flush(self) -> None:
        await self.write(_nothing)

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()

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
                async with self._sessionmaker.begin() as session:
                    for item in batch:
                        await item.apply(session)
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


def _is_transient(exc: Exception) -> bool:
    """A lost connection or a locked database passes; a broken constraint does not."""
    if isinstance(exc, OSError):
        return True
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError)


class ConflictingWriteError(Exception):
    """The write broke a constraint; nothing of it was stored."""


async def _nothing(session: AsyncSession) -> None:
    return None
