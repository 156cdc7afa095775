"""One contract for both implementations of each interface of the job engine: the in-process
ones (SQLite and memory) and the scaled ones (PostgreSQL and Redis). Each test runs on both;
the scaled ones need TEST_DATABASE_URL and TEST_REDIS_URL (skipped without, failed under CI)."""

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.core.redis_link import RedisLink
from app.db.accounts import AccountRepository
from app.db.engine import PostgresLimits, create_engine, create_sessionmaker
from app.db.migrate import upgrade_database
from app.db.repository import ConflictingWriteError, Repository
from app.services.auth_service import seed_demo_users
from app.services.jobs import domain, rows
from app.services.jobs.domain import Job
from app.services.jobs.event_log import EventStreamInterrupted
from app.services.jobs.events_inprocess import InProcessEventBus
from app.services.jobs.events_redis import RedisEventBus
from app.services.jobs.interfaces import (
    ActiveJobLimitError,
    DailyQuotaError,
    EventBus,
    JobStore,
    OwnerLimits,
    WorkQueue,
)
from app.services.jobs.queue_inprocess import InProcessWorkQueue
from app.services.jobs.queue_postgres import PostgresWorkQueue
from app.services.jobs.store_inprocess import InProcessJobStore
from app.services.jobs.store_scaled import ScaledJobStore
from tests.conftest import postgres_url, redis_url

OWNER = "alice@myflix.dev"


@dataclass
class Engine:
    store: JobStore
    events: EventBus
    queue: WorkQueue


@asynccontextmanager
async def _engine(database_url: str, redis_at: str | None) -> AsyncIterator[Engine]:
    database = create_engine(database_url)
    await upgrade_database(database)
    repository = Repository(database)
    await seed_demo_users(AccountRepository(create_sessionmaker(database)))
    link = None
    if redis_at is None:
        in_process = InProcessJobStore(repository, database)
        parts = Engine(in_process, InProcessEventBus(in_process.events), InProcessWorkQueue(workers=2))
    else:
        link = RedisLink(redis_at, f"contract-{uuid.uuid4().hex[:8]}")
        scaled = ScaledJobStore(repository, database)
        queue = PostgresWorkQueue(database_url, PostgresLimits(), claim_timeout_seconds=3.0)
        parts = Engine(scaled, RedisEventBus(link, 60, scaled.events), queue)
    await parts.store.start()
    await parts.events.start()
    await parts.queue.start()
    try:
        yield parts
    finally:
        await parts.queue.close()
        await parts.events.close()
        await parts.store.close(1)
        if link is not None:
            keys = [key async for key in link.client.scan_iter(f"{link.prefix}:*")]
            if keys:
                await link.client.delete(*keys)
            await link.close()
        await database.dispose()


@pytest.fixture(params=["in-process", "scaled"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Any]:
    """`async with engine() as parts:` the store, event bus and work queue of one kind."""
    if request.param == "in-process":
        return lambda: _engine(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}", None)
    database_url, redis_at = postgres_url(), redis_url()
    return lambda: _engine(database_url, redis_at)


def _run(scenario: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, 30))  # type: ignore[arg-type]


async def _new_job(parts: Engine, num_images: int = 2, key: str | None = None, max_unfinished: int = 100) -> Job:
    job = domain.new_job(OWNER, "a contract", num_images, 7, "local", "model", key)
    update = domain.accepted(job, parts.queue.positions_for_new_job(num_images))
    await parts.store.create(job, update, OwnerLimits(max_unfinished, None))
    await parts.events.publish(job.id, update.events)
    return job


async def _record(parts: Engine, job_id: str, transition: Callable[[Job], Any]) -> domain.Update:
    applied = await parts.store.apply(job_id, transition)
    assert applied is not None
    await parts.events.publish(job_id, applied.update.events)
    return applied.update


async def _finish(parts: Engine, job: Job) -> None:
    for image in job.images:
        await _record(parts, job.id, lambda j, i=image.index: domain.claimed(j, i, j.accepted_at, max_attempts=3))
        await _record(
            parts,
            job.id,
            lambda j, i=image.index: domain.image_changed(j, i, "succeeded", j.accepted_at + 1, f"k{i}.png"),
        )


async def _all_events(parts: Engine, job_id: str, after_id: int = 0) -> list[domain.JobEvent]:
    return [event async for batch in parts.events.follow(job_id, after_id, 5) if batch for event in batch]


# JobStore ---------------------------------------------------------------------------------------


def test_a_new_job_beyond_its_owner_limit_of_unfinished_jobs_is_not_stored_even_when_admitted_together(engine):
    async def scenario() -> None:
        async with engine() as parts:
            jobs = [domain.new_job(OWNER, f"burst {n}", 1, None, "local", "model", None) for n in range(8)]
            outcomes = await asyncio.gather(
                *(parts.store.create(job, domain.accepted(job, [None]), OwnerLimits(3, None)) for job in jobs),
                return_exceptions=True,
            )
            admitted = [job for job, outcome in zip(jobs, outcomes, strict=True) if outcome is None]
            assert len(admitted) == 3, outcomes
            assert all(isinstance(o, ActiveJobLimitError) for o in outcomes if o is not None), outcomes
            assert sorted(j.id for j in await parts.store.unfinished()) == sorted(j.id for j in admitted)
            refused = [job for job in jobs if job not in admitted]
            assert [await parts.store.get(job.id) for job in refused] == [None] * len(refused)
            # A finished job no longer counts.
            await _finish(parts, admitted[0])
            await _new_job(parts, num_images=1, max_unfinished=3)

    _run(scenario())


def test_a_new_job_beyond_its_owner_daily_quota_is_not_stored_nor_counted_and_says_what_is_left(engine):
    async def scenario() -> None:
        async with engine() as parts:

            async def create(num_images: int) -> Job:
                job = domain.new_job(OWNER, "quota", num_images, None, "local", "model", None)
                await parts.store.create(job, domain.accepted(job, [None] * num_images), OwnerLimits(100, 5))
                return job

            today = rows.usage_day(datetime.now(UTC))
            await create(3)
            with pytest.raises(DailyQuotaError) as refused:
                await create(4)
            assert refused.value.images_left == 2
            assert len(await parts.store.page(OWNER, 10, None)) == 1  # the refused job's rows rolled back
            assert await parts.store.images_used(OWNER, today) == 3  # and its images not charged
            await create(2)
            assert await parts.store.images_used(OWNER, today) == 5

    _run(scenario())


def test_times_are_taken_from_one_clock_whatever_the_clocks_of_the_processes(engine, monkeypatch):
    class ClockBehind(datetime):
        """The wall clock of a worker 30 s behind the others'."""

        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) - timedelta(seconds=30)

    monkeypatch.setattr(rows, "datetime", ClockBehind)

    async def scenario() -> None:
        async with engine() as parts:
            job = domain.new_job(OWNER, "skewed", 1, None, "local", "model", None)
            job.created_at += timedelta(seconds=30)  # the accepting machine's clock, 30 s ahead
            await parts.store.create(job, domain.accepted(job, [None]), OwnerLimits(10, None))
            await _record(parts, job.id, lambda j: domain.claimed(j, 0, time.monotonic(), max_attempts=3))
            await _record(parts, job.id, lambda j: domain.image_changed(j, 0, "succeeded", time.monotonic(), "k.png"))
            finished = await parts.store.get(job.id)
            assert finished is not None and finished.ttfi_ms is not None
            assert 0 <= finished.ttfi_ms < 10_000, finished.ttfi_ms
            assert 0 <= finished.total_ms < 10_000, finished.total_ms

    _run(scenario())


def test_a_stored_job_is_found_listed_counted_and_keeps_every_event_in_order(engine):
    async def scenario() -> None:
        async with engine() as parts:
            job = await _new_job(parts, key="key-1")
            assert (await parts.store.get(job.id)).prompt == "a contract"
            assert [j.id for j in await parts.store.page(OWNER, 10, None)] == [job.id]
            assert [j.id for j in await parts.store.unfinished()] == [job.id]
            assert (await parts.store.find_idempotent(OWNER, "key-1")).id == job.id
            await _finish(parts, job)
            stored = await parts.store.events(job.id)
            assert [e.id for e in stored] == list(range(1, len(stored) + 1))
            assert stored[-1].name == "done"
            assert (await parts.store.get(job.id)).status == "succeeded"
            assert await parts.store.unfinished() == []
            assert await parts.store.apply("job_nothing", lambda j: None) is None

    _run(scenario())


def test_an_unfinished_job_read_back_after_a_restart_goes_on_from_its_last_event_and_keeps_its_ttfi(engine):
    async def scenario() -> None:
        async with engine() as parts:
            job = await _new_job(parts)
            await _record(parts, job.id, lambda j: domain.claimed(j, 0, j.accepted_at, max_attempts=3))
            await _record(parts, job.id, lambda j: domain.image_changed(j, 0, "succeeded", j.accepted_at + 1, "k0.png"))
            before = await parts.store.events(job.id)
        async with engine() as parts:  # the next start, on the same database
            (again,) = await parts.store.unfinished()
            assert again.last_event_id == before[-1].id
            assert again.ttfi_ms == json.loads(before[-1].data)["elapsed_ms"]
            update = await _record(parts, job.id, lambda j: domain.claimed(j, 1, j.accepted_at, max_attempts=3))
            assert [e.id for e in update.events] == [before[-1].id + 1]

    _run(scenario())


def test_a_stored_job_no_longer_held_by_its_creator_numbers_its_next_events_after_the_stored_ones(engine):
    async def scenario() -> None:
        async with engine() as parts:
            job = await _new_job(parts)
            await parts.store.withdraw(job.id)  # given up after its commit: read back as stored
            update = await _record(
                parts, job.id, lambda j: domain.image_changed(j, 0, "failed", j.accepted_at + 1, error="given up")
            )
            assert [e.id for e in update.events] == [job.num_images + 1]
            stored = await parts.store.events(job.id)
            assert [e.id for e in stored] == list(range(1, job.num_images + 2))

    _run(scenario())


def test_transitions_of_one_job_applied_at_once_number_their_events_in_turn(engine):
    async def scenario() -> None:
        async with engine() as parts:
            job = await _new_job(parts, num_images=8)
            await asyncio.gather(
                *(
                    parts.store.apply(job.id, lambda j, i=i: domain.claimed(j, i, j.accepted_at, max_attempts=3))
                    for i in range(8)
                )
            )
            stored = await parts.store.events(job.id)
            assert [e.id for e in stored] == list(range(1, 17))
            running = [json.loads(e.data) for e in stored[8:]]
            assert sorted(data["index"] for data in running) == list(range(8))
            assert {data["status"] for data in running} == {"running"}

    _run(scenario())


def test_a_transition_that_refuses_stores_nothing_and_an_idempotency_key_is_taken_once(engine):
    async def scenario() -> None:
        async with engine() as parts:
            job = await _new_job(parts, key="only-once")

            def refuse(_: Job) -> None:
                raise LookupError("not now")

            with pytest.raises(LookupError):
                await parts.store.apply(job.id, refuse)
            assert len(await parts.store.events(job.id)) == 2
            twin = domain.new_job(OWNER, "a twin", 1, None, "local", "model", "only-once")
            with pytest.raises(ConflictingWriteError):
                await parts.store.create(twin, domain.accepted(twin, [None]), OwnerLimits(100, None))

    _run(scenario())


# EventBus ---------------------------------------------------------------------------------------


def test_followers_get_every_event_once_in_order_from_where_they_start(engine):
    async def scenario() -> None:
        async with engine() as parts:
            job = await _new_job(parts)
            early = parts.events.follow(job.id, 0, 5)
            assert [e.id for e in await anext(early)] == [1, 2]  # following before the rest comes
            await _finish(parts, job)
            everything = [e for batch in [b async for b in early] if batch for e in batch]
            assert [e.id for e in everything] == list(range(3, 8))
            assert everything[-1].name == "done"
            assert [e.id for e in await _all_events(parts, job.id, after_id=5)] == [6, 7]

    _run(scenario())


def test_interrupted_followers_are_told_to_come_back(engine):
    async def scenario() -> None:
        async with engine() as parts:
            job = await _new_job(parts)
            batches = parts.events.follow(job.id, 0, 5)
            assert [e.id for e in await anext(batches)] == [1, 2]
            waiting = asyncio.ensure_future(anext(batches))
            parts.events.interrupt_all()
            with pytest.raises(EventStreamInterrupted):
                await waiting

    _run(scenario())


# WorkQueue --------------------------------------------------------------------------------------


def test_first_images_are_taken_before_later_ones_and_done_work_leaves_the_queue(engine):
    async def scenario() -> None:
        async with engine() as parts:
            a, b = await _new_job(parts, 3), await _new_job(parts, 2)
            await parts.queue.push(a, [0, 1, 2])
            await parts.queue.push(b, [0, 1])
            first = [await parts.queue.take(), await parts.queue.take()]
            assert {(item.job_id, item.index) for item in first} == {(a.id, 0), (b.id, 0)}
            # What a queue holds, waiting or taken, is not queued twice.
            assert await parts.queue.push(a, [0, 1]) == []
            for item in first:
                await parts.queue.done(item)
            assert await parts.queue.push(a, [0, 1]) == [0]
            assert await parts.queue.push(b, [0]) == [0]

    _run(scenario())


def test_a_cancel_reaches_every_follower_of_cancels_and_its_waiting_work_never_starts(engine):
    async def scenario() -> None:
        async with engine() as parts:
            canceled: list[str] = []
            told = asyncio.Event()
            parts.queue.on_cancel(lambda job_id: (canceled.append(job_id), told.set()))
            job, other = await _new_job(parts, 2), await _new_job(parts, 1)
            await parts.queue.push(job, [0, 1])
            taken = await parts.queue.take()
            # A cancel may go out before every process listens (NOTIFY): say it again.
            deadline = asyncio.get_running_loop().time() + 5
            while not told.is_set():
                assert asyncio.get_running_loop().time() < deadline, "the cancel never arrived"
                await parts.queue.cancel(job)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(told.wait(), 0.2)
            assert set(canceled) == {job.id}
            await parts.queue.done(taken)
            await parts.queue.push(other, [0])
            remaining = await asyncio.wait_for(parts.queue.take(), 5)
            if remaining.job_id == job.id:  # the queue kept the item: the runner finds it canceled
                await parts.queue.done(remaining)
                remaining = await asyncio.wait_for(parts.queue.take(), 5)
            assert (remaining.job_id, remaining.index) == (other.id, 0)

    _run(scenario())
