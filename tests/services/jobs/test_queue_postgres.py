"""The scaled work queue's own promises, beyond the contract both queues keep: its order
across jobs, takeover of a quiet worker's items ahead of a backlog, malformed items, and the
chore leases. On the PostgreSQL of TEST_DATABASE_URL (skipped without it, failed under CI)."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from app.core.config import async_database_url
from app.db.engine import PostgresLimits, create_engine
from app.db.migrate import upgrade_database
from app.services.jobs import domain
from app.services.jobs.domain import Job
from app.services.jobs.interfaces import QueueUnavailableError
from app.services.jobs.queue_postgres import PostgresWorkQueue
from tests.conftest import enqueue_work, postgres_url, query_database
from tests.faults import PgSandbox

CLAIM_TIMEOUT_SECONDS = 1.5


async def _migrate(url: str) -> None:
    engine = create_engine(url)
    await upgrade_database(engine)
    await engine.dispose()


@pytest.fixture
def database_url() -> str:
    url = postgres_url()
    asyncio.run(_migrate(url))
    return url


@asynccontextmanager
async def _queue(url: str) -> AsyncIterator[PostgresWorkQueue]:
    queue = PostgresWorkQueue(url, PostgresLimits(), CLAIM_TIMEOUT_SECONDS)
    await queue.start()
    try:
        yield queue
    finally:
        await queue.close()


def _job(num_images: int) -> Job:
    return domain.new_job("alice@myflix.dev", "queued", num_images, None, "local", "m", None)


def _run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario, 30))


def test_first_images_go_first_then_round_robin_across_jobs_oldest_first(database_url):
    async def scenario() -> None:
        async with _queue(database_url) as queue:
            a, b = _job(3), _job(3)
            await queue.push(a, [0, 1, 2])
            await queue.push(b, [0, 1, 2])
            order = []
            for _ in range(6):
                item = await queue.take()
                order.append((item.job_id, item.index))
                await queue.done(item)
            assert order == [(a.id, 0), (b.id, 0), (a.id, 1), (b.id, 1), (a.id, 2), (b.id, 2)]
            assert await queue.depth() == 0

    _run(scenario())


def test_a_quiet_workers_item_is_taken_over_within_the_claim_timeout_ahead_of_a_backlog(database_url):
    async def scenario() -> None:
        async with _queue(database_url) as quiet, _queue(database_url) as busy:
            held = _job(4)
            await quiet.push(held, [0, 1, 2, 3])
            for _ in range(3):
                await quiet.done(await quiet.take())
            last = await quiet.take()  # a later image: rank 3
            assert last.index == 3
            backlog = [_job(1) for _ in range(40)]
            for job in backlog:  # newer first images, ranked above it
                await busy.push(job, [0])
            quiet.give_up(last)  # its heartbeat stops, as a dead worker's would
            given_up_at = asyncio.get_running_loop().time()
            # The other worker is busy with the backlog, a tenth of a second an image: 4 s of it.
            before_it = 0
            while (taken := await asyncio.wait_for(busy.take(), 5)).job_id != held.id:
                before_it += 1
                await asyncio.sleep(0.1)  # making the image
                await busy.done(taken)
            taken_after = asyncio.get_running_loop().time() - given_up_at
            assert taken.index == 3
            assert taken_after < CLAIM_TIMEOUT_SECONDS + 0.3, f"taken over after {taken_after:.2f} s"
            assert before_it < len(backlog) / 2, "it waited behind the backlog"
            assert await busy.depth() == len(backlog) - before_it

    _run(scenario())


def test_a_malformed_item_is_dropped_and_the_intake_goes_on(database_url):
    async def scenario() -> None:
        async with _queue(database_url) as queue:
            await asyncio.to_thread(enqueue_work, database_url, b"not json", 5)
            await asyncio.to_thread(enqueue_work, database_url, {"job": "job_x"}, 5)
            job = _job(1)
            await queue.push(job, [0])
            item = await asyncio.wait_for(queue.take(), 5)
            assert (item.job_id, item.index) == (job.id, 0)
            await queue.done(item)
            left = await asyncio.to_thread(query_database, database_url, "SELECT count(*) FROM pgqueuer")
            assert left == [(0,)]
            assert queue.unavailable is None
        # A queue whose loops have stopped says so (and readiness with it).
        assert "work-consume" in (queue.unavailable or "")

    _run(scenario())


def test_a_chore_is_leased_to_one_process_at_a_time_until_its_lease_runs_out(database_url):
    async def scenario() -> None:
        async with _queue(database_url) as one, _queue(database_url) as other:
            assert await one.lock("sweep", 0.5) is True
            assert await other.lock("sweep", 0.5) is False
            assert await other.lock("retention", 0.5) is True
            leased_at = asyncio.get_running_loop().time()
            while not await other.lock("sweep", 0.5):
                assert asyncio.get_running_loop().time() - leased_at < 2, "the lease never ran out"
                await asyncio.sleep(0.05)
            assert asyncio.get_running_loop().time() - leased_at >= 0.45

    _run(scenario())


def test_the_queues_log_is_emptied_once_a_claim_timeout(database_url):
    async def scenario() -> None:
        async with _queue(database_url) as queue:
            job = _job(2)
            await queue.push(job, [0, 1])
            for _ in range(2):
                await queue.done(await queue.take())
            logged = "SELECT count(*) FROM pgqueuer_log"
            assert (await asyncio.to_thread(query_database, database_url, logged))[0][0] >= 4
            deadline = asyncio.get_running_loop().time() + 3 * CLAIM_TIMEOUT_SECONDS
            while (await asyncio.to_thread(query_database, database_url, logged))[0][0]:
                assert asyncio.get_running_loop().time() < deadline, "the log was never emptied"
                await asyncio.sleep(0.1)

    _run(scenario())


def test_a_database_that_refuses_the_queue_makes_it_unavailable_and_it_recovers_by_itself():
    sandbox = PgSandbox(postgres_url(), "myflix_queue_faults").create()
    try:
        asyncio.run(_migrate(async_database_url(sandbox.service_url)))

        async def scenario() -> None:
            async with _queue(sandbox.service_url) as queue:
                await queue.push(_job(1), [0])
                await asyncio.to_thread(sandbox.login, False)
                await asyncio.to_thread(sandbox.terminate_sessions)
                with pytest.raises(QueueUnavailableError):
                    await queue.push(_job(1), [0])
                assert queue.unavailable is not None
                await asyncio.to_thread(sandbox.login, True)
                # Nothing asks the queue for work here (an API replica's): it finds out itself.
                deadline = asyncio.get_running_loop().time() + 10
                while queue.unavailable is not None:
                    assert asyncio.get_running_loop().time() < deadline, queue.unavailable
                    await asyncio.sleep(0.1)
                assert await queue.push(_job(1), [0]) == [0]

        _run(scenario())
    finally:
        sandbox.drop()
