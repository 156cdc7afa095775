"""Image work across processes on PgQueuer: a PostgreSQL table of work items, taken with
`FOR UPDATE SKIP LOCKED`, with workers woken by LISTEN/NOTIFY instead of polling.

- One item per image, keyed `job:index` (PgQueuer's dedupe key): an image is queued at most
  once, however many admissions and sweeps push it.
- An item's priority is its image's rank in its job: every job's first image goes before any
  job's second, and so on, the oldest job first within a rank. That is first images first,
  then round-robin across jobs. An image that had started before (a restart) goes first.
- A process takes only as many items as it has workers asking. An item stays in the table
  until its image is recorded (at-least-once). The holder's heartbeat renews it every third of
  the claim timeout. The next take anywhere (a worker asking; while the queue is empty, each
  process's look every sixth of the timeout) takes over an item left without a heartbeat for
  two thirds of it, ahead of newer items of its rank. The image's attempt count
  (`domain.claimed`) fences off the worker it was taken from, and caps the attempts.
- Cancels reach every process by NOTIFY. A process that misses one finds the image canceled
  when it records it.
- The periodic chores (sweep, retention) are leased in the `chore_leases` table.

The job store holds everything a job needs, so Redis carries only events: losing its data
strands no work.
"""

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
from pgqueuer.models import Job as QueueRow
from pgqueuer.queries import EntrypointExecutionParameter, Queries
from pgqueuer.types import JobId, QueueEntrypoint, QueueManagerId

from app.core.loops import keep_running
from app.db.engine import CONNECT_TIMEOUT_SECONDS, PostgresLimits, plain_postgres_url
from app.services.jobs.create_budget import CreateBudget
from app.services.jobs.domain import Job
from app.services.jobs.interfaces import OnTaken, QueueUnavailableError, Takers, WorkItem

logger = logging.getLogger("myflix.queue")

ENTRYPOINT = QueueEntrypoint("image")
CANCEL_CHANNEL = "myflix_cancel"
# Connections of the queue's own pool (the listener has one more).
POOL_SIZE = 4
# How often the queue's database is tried again while it fails.
RECHECK_SECONDS = 1.0
# How long closing waits for the pool's connections to be given back.
CLOSE_SECONDS = 2.0
# Above every rank: an image that had started before a restart may only need re-attaching.
RESUMED_PRIORITY = 1

# What the queue's database, or a connection to it that a fault left unusable, fails with.
_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class PostgresWorkQueue:
    def __init__(
        self,
        database_url: str,
        limits: PostgresLimits,
        claim_timeout_seconds: float,
        create_budget: CreateBudget | None = None,
    ) -> None:
        self._dsn = plain_postgres_url(database_url)
        self._limits = limits
        self._claim_timeout = claim_timeout_seconds
        self._budget = create_budget
        self._manager_id = QueueManagerId(uuid.uuid4())
        self._holder = f"{socket.gethostname()}-{os.getpid()}"
        self._pool: asyncpg.Pool | None = None
        self._queries: Queries | None = None
        self._takers = Takers()
        self._wake = asyncio.Event()  # a worker asks, or work was queued
        # Work queued since (as told by NOTIFY), against the count when a take last found the
        # queue empty: until more is queued, a worker who asks need not look again before
        # the periodic look for work whose worker went quiet.
        self._queued_news = 0
        self._empty_at_news: int | None = None
        self._look_again_at = 0.0
        self._ready: list[WorkItem] = []  # taken, not handed out yet
        self._held: dict[WorkItem, QueueRow] = {}  # taken and not done: renewed while held
        self._failure: str | None = None
        self._cancel_callbacks: list[Callable[[str], None]] = []
        self._loops: list[asyncio.Task[None]] = []

    @property
    def unavailable(self) -> str | None:
        stopped = [loop.get_name() for loop in self._loops if loop.done()]
        if stopped:
            return f"the work queue's loops stopped: {', '.join(stopped)}"
        return self._failure

    @property
    def waiting_count(self) -> int:
        return len(self._ready)

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=1,
            max_size=POOL_SIZE,
            timeout=CONNECT_TIMEOUT_SECONDS,
            server_settings=self._limits.server_settings(),
            reset=_keep_session,
        )
        self._queries = Queries.from_asyncpg_pool(self._pool)
        await self._install()
        self._loops = [
            asyncio.create_task(keep_running("work intake", self._consume, self._failed), name="work-consume"),
            asyncio.create_task(keep_running("work leases", self._keep_leases, self._failed), name="work-leases"),
            asyncio.create_task(keep_running("work wake-ups", self._listen, self._failed), name="work-listen"),
        ]

    async def _install(self) -> None:
        """PgQueuer's tables, made by the first process to start and upgraded with the library,
        under its lock (which holds on one connection only)."""
        connection = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_SECONDS)
        try:
            queries = Queries.from_asyncpg_connection(connection)
            async with queries.schema_lock():
                if not await queries.schema_is_installed():
                    await queries.install()
                    return
            await queries.upgrade()
        finally:
            await connection.close()

    async def close(self) -> None:
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), CLOSE_SECONDS)
            except Exception:  # a connection that hangs, or that a failed query left unusable
                self._pool.terminate()

    def positions_for_new_job(self, count: int) -> list[int | None]:
        return [None] * count

    def position(self, job_id: str, index: int) -> int | None:
        return None

    async def push(self, job: Job, indexes: list[int], stored: Awaitable[None] | None = None) -> list[int]:
        if stored is not None:
            await stored  # a worker must find the job when it takes the work
        if not indexes:
            return []
        priorities = [RESUMED_PRIORITY if job.images[index].status == "running" else -index for index in indexes]
        try:
            ids = await self._ready_queries().enqueue(
                [ENTRYPOINT] * len(indexes),
                [json.dumps({"job": job.id, "index": index}).encode() for index in indexes],
                priorities,
                None,
                [_key(job.id, index) for index in indexes],
                on_conflict="skip",
            )
        except _FAILURES as exc:
            self._lost(exc)
            raise QueueUnavailableError(self._failure) from exc
        self._failure = None
        return [index for index, queued in zip(indexes, ids, strict=True) if queued is not None]

    async def take(self, on_taken: OnTaken | None = None) -> WorkItem:
        if self._ready:
            item = self._ready.pop(0)
            if on_taken is not None:
                on_taken(item)
            return item
        taker = self._takers.wait(on_taken)
        self._wake.set()
        return await taker

    async def done(self, item: WorkItem) -> None:
        row = self._held.pop(item, None)
        if row is not None:
            await self._ready_queries().log_jobs([(row, "successful", None)])

    def give_up(self, item: WorkItem) -> None:
        # No longer renewed: the next worker to ask takes it over once its heartbeat is old.
        self._held.pop(item, None)

    async def cancel(self, job: Job) -> None:
        try:
            await self._ready_pool().execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, job.id)
        except _FAILURES as exc:
            self._lost(exc)
            raise QueueUnavailableError(self._failure) from exc

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        self._cancel_callbacks.append(callback)

    def on_reset(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Never called: the queue is kept in the database, with the jobs."""

    async def lock(self, name: str, seconds: float) -> bool:
        claimed = await self._ready_pool().fetchval(
            """
            INSERT INTO chore_leases (name, holder, expires_at)
            VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
            ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
            WHERE chore_leases.expires_at <= clock_timestamp()
            RETURNING name
            """,
            name,
            self._holder,
            seconds,
        )
        return claimed is not None

    async def depth(self) -> int:
        statistics = await self._ready_queries().queue_size()
        return sum(row.count for row in statistics if row.status == "queued")

    # Inside --------------------------------------------------------------------------------

    def _ready_pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "PostgresWorkQueue.start() was not awaited"
        return self._pool

    def _ready_queries(self) -> Queries:
        assert self._queries is not None, "PostgresWorkQueue.start() was not awaited"
        return self._queries

    def _lost(self, exc: BaseException) -> None:
        if self._failure is None:
            logger.error("the work queue is unavailable: %s", exc)
        self._failure = f"the work queue's database: {type(exc).__name__}: {exc}"[:300]

    def _failed(self, name: str, exc: BaseException | None) -> None:
        if isinstance(exc, _FAILURES):
            self._lost(exc)
        else:
            logger.error("%s failed; starting it again", name, exc_info=exc)

    async def _consume(self) -> None:
        queries = self._ready_queries()
        loop = asyncio.get_running_loop()
        while True:
            asking = len(self._takers)
            if not asking:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._wake.clear()
            if self._empty_at_news == self._queued_news and loop.time() < self._look_again_at:
                # New work wakes this loop by NOTIFY; work whose worker went quiet wakes
                # nobody, so it is looked for again every sixth of the claim timeout.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._look_again_at - loop.time())
                continue
            if self._budget is not None:
                # Only images with a create granted leave the queue: the others stay queued,
                # and the next grant goes to the first in the queue's order then.
                grant = await self._budget.grant(asking)
                if not grant.granted:
                    await asyncio.sleep(grant.retry_in)
                    continue
                asking = grant.granted
            news = self._queued_news
            rows = await queries.dequeue(
                batch_size=asking,
                entrypoints={ENTRYPOINT: EntrypointExecutionParameter(concurrency_limit=0)},
                queue_manager_id=self._manager_id,
                global_concurrency_limit=None,
                heartbeat_timeout=timedelta(seconds=self._claim_timeout * 2 / 3),
            )
            self._failure = None
            if self._budget is not None and len(rows) < asking:
                await self._budget.give_back(asking - len(rows))
            if len(rows) < asking:
                self._empty_at_news, self._look_again_at = news, loop.time() + self._claim_timeout / 6
            else:
                self._empty_at_news = None
            for row in rows:
                await self._hand_over(row)

    async def _hand_over(self, row: QueueRow) -> None:
        if any(held.id == row.id for held in self._held.values()):
            return  # its heartbeat was late, but it is still running here
        item = _item(row)
        if item is None:
            logger.error("dropped a malformed work item", extra={"item_id": row.id, "payload": repr(row.payload)[:200]})
            await self._ready_queries().log_jobs([(row, "exception", None)])
            return
        self._held[item] = row
        if not self._takers.hand(item):
            self._ready.append(item)

    async def _keep_leases(self) -> None:
        """Every sixth of the claim timeout: renew the heartbeat of what this process holds,
        and move the work of workers gone quiet ahead of all waiting work, so that the next
        worker to ask anywhere takes it over even under a backlog. Once a claim timeout, one
        process of the deployment also empties PgQueuer's log, a row per take and per done
        that this service never reads (PgQueuer's own worker would fold it into statistics).
        While the queue's database fails, every second: a round that goes through says it
        answers again (a replica that takes no work has no other way to find out)."""
        queries = self._ready_queries()
        for tick in itertools.count(1):
            await asyncio.sleep(RECHECK_SECONDS if self._failure else self._claim_timeout / 6)
            if self._held:
                await queries.update_heartbeat([row.id for row in self._held.values()])
            stale = await queries.stale_jobs(timedelta(seconds=self._claim_timeout * 2 / 3))
            for quiet in stale:
                if quiet.priority < RESUMED_PRIORITY:
                    await self._move_ahead(quiet.id)
            if tick % 6 == 0 and await self.lock("queue-log", self._claim_timeout * 0.9):
                await queries.clear_queue_log(ENTRYPOINT)
            if self._failure is not None:
                logger.info("the work queue's database answers again")
                self._failure = None

    async def _move_ahead(self, row_id: JobId) -> None:
        queries = self._ready_queries()
        row = await queries.queue_job_by_id(row_id)
        item = None if row is None else _item(row)
        if row is None or item is None:
            return  # done meanwhile, or malformed (the next worker to take it drops it)
        # The item's own key: the enqueue meets the item itself and raises its priority.
        await queries.enqueue(
            ENTRYPOINT,
            row.payload,
            RESUMED_PRIORITY,
            dedupe_key=_key(item.job_id, item.index),
            on_conflict="update_priority",
        )

    async def _listen(self) -> None:
        connection: Any = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_SECONDS)
        closed = asyncio.Event()
        connection.add_termination_listener(lambda _: closed.set())
        try:
            await connection.add_listener(self._ready_queries().qbe.settings.channel, self._on_queue_change)
            await connection.add_listener(CANCEL_CHANNEL, self._on_cancel)
            self._queued_news += 1  # what was queued while nobody here listened
            self._wake.set()
            await closed.wait()
            raise ConnectionError("the work queue's listening connection closed")
        finally:
            if not connection.is_closed():
                await connection.close(timeout=CONNECT_TIMEOUT_SECONDS)

    def _on_queue_change(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        # Every change of the table is told (heartbeats too); only new work is news here.
        with contextlib.suppress(ValueError):
            if json.loads(payload).get("operation") != "insert":
                return
        self._queued_news += 1
        self._wake.set()

    def _on_cancel(self, _connection: Any, _pid: int, _channel: str, job_id: str) -> None:
        for callback in self._cancel_callbacks:
            callback(job_id)


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is, without asyncpg's reset query (a round
    trip on every statement's way out): the queue's statements leave no session state behind
    (no LISTEN, advisory lock or setting on these connections), and asyncpg still rolls back
    any transaction left open."""


def _item(row: QueueRow) -> WorkItem | None:
    """The image an item names; None when it is malformed."""
    try:
        fields = json.loads(row.payload or b"")
        return WorkItem(str(fields["job"]), int(fields["index"]))
    except (ValueError, TypeError, KeyError):
        return None


def _key(job_id: str, index: int) -> str:
    return f"{job_id}:{index}"
