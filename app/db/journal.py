"""Writes committed in batches, in order, by one task: the write path of jobs run in one process.

A write is data (`Changes`: rows to insert, row states to set), not code, so everything
submitted while the previous commit ran is merged into one statement per kind: under load a
hundred state changes cost a handful of statements in one commit, and SQLite never sees two
writers. A write that fails for a passing cause is retried (app/db/faults.py) and never
skipped: later writes wait behind it, so they cannot overtake it. A write whose waiter gave up
can be withdrawn while it is not being attempted; then it is never stored.
"""

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import create_blocking_sqlite_engine
from app.db.faults import DatabaseUnavailableError, WriteHealth, write_retrying
from app.db.repository import Changes, ConflictingWriteError, Repository

logger = logging.getLogger("myflix.journal")

WITHDRAWN = "the write was withdrawn while the database refused writes"


def _new_future() -> "asyncio.Future[None]":
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Write:
    job_id: str | None
    changes: Changes
    done: "asyncio.Future[None]" = field(default_factory=_new_future)
    withdrawn: bool = False

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def succeed(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _any_stored(writes: "list[asyncio.Future[None]]") -> bool:
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    return any(outcome is None for outcome in outcomes)


class Journal:
    def __init__(self, engine: AsyncEngine, health: WriteHealth) -> None:
        self._engine = engine
        self._blocking_engine: Engine | None = create_blocking_sqlite_engine(engine)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._waiting: deque[_Write] = deque()
        self._batch: list[_Write] = []  # being committed
        self._attempt_under_way = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._health = health

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="journal")

    def write(self, changes: Changes, job_id: str | None = None) -> "asyncio.Future[None]":
        """Queue a write; the future resolves once it is committed. `job_id`: the job it
        belongs to, so that it can be withdrawn."""
        item = _Write(job_id, changes)
        self._waiting.append(item)
        self._wake.set()
        return item.done

    def withdraw(self, job_id: str) -> "asyncio.Future[bool]":
        """Never store the job's writes that are not committed yet: those not being attempted
        fail now with DatabaseUnavailableError; those being attempted are stored if that attempt
        succeeds, and fail otherwise. Resolves to whether any of them was stored after all."""
        items = [item for item in [*self._batch, *self._waiting] if item.job_id == job_id]
        for item in items:
            item.withdrawn = True
            if not (self._attempt_under_way and item in self._batch):
                item.fail(DatabaseUnavailableError(WITHDRAWN))
        self._waiting = deque(item for item in self._waiting if not item.withdrawn)
        return asyncio.ensure_future(_any_stored([item.done for item in items]))

    async def flush(self) -> None:
        await self.write(Changes())

    async def close(self, timeout: float) -> None:
        """Commit what is queued, for `timeout` seconds at most: what is left then is not
        stored, and the next start finds its jobs unfinished and resumes them."""
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except (TimeoutError, DatabaseUnavailableError):
            logger.error("the database took no writes for %g s at shutdown; the next start resumes the jobs", timeout)
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
        if self._blocking_engine is not None:
            self._blocking_engine.dispose()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                self._batch = list(self._waiting)
                self._waiting.clear()
                await self._commit(self._batch)
                self._batch = []

    async def _commit(self, batch: list[_Write]) -> None:
        live: list[_Write] = []
        try:
            async for attempt in write_retrying(self._failed):
                with attempt:
                    # Withdrawn before this attempt: never stored.
                    for item in batch:
                        if item.withdrawn:
                            item.fail(DatabaseUnavailableError(WITHDRAWN))
                    live = [item for item in batch if not item.withdrawn]
                    if not live:
                        return
                    self._attempt_under_way = True
                    try:
                        await self._write([item.changes for item in live])
                    finally:
                        self._attempt_under_way = False
        except Exception as exc:  # refused for what it is, not for a passing cause
            if len(batch) > 1:
                # One write is at fault (say, a racing Idempotency-Key): commit the others
                # alone and fail only that one.
                for item in batch:
                    await self._commit([item])
                return
            batch[0].fail(ConflictingWriteError(str(exc)) if isinstance(exc, IntegrityError) else exc)
            return
        self._health.recovered()
        for item in live:
            item.succeed()  # a write withdrawn during its successful attempt is stored too

    def _failed(self, exc: BaseException) -> None:
        fault = self._health.failed(exc)
        if fault is not None and fault.reopen_connections and self._blocking_engine is not None:
            # A connection opened while the file was read-only stays read-only.
            self._blocking_engine.dispose()

    async def _write(self, batch: list[Changes]) -> None:
        if self._blocking_engine is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._write_blocking, batch)
        else:
            async with self._engine.begin() as connection:
                await connection.run_sync(Repository.apply, batch)

    def _write_blocking(self, batch: list[Changes]) -> None:
        assert self._blocking_engine is not None
        with self._blocking_engine.begin() as connection:
            Repository.apply(connection, batch)
