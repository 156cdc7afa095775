"""The Redis event bus at scale: one reader per process, however many jobs it follows. On the
Redis of TEST_REDIS_URL (skipped without it, failed under CI)."""

import asyncio
import uuid

import pytest
import redis

from app.core.redis_link import RedisLink
from app.services.jobs.domain import JobEvent
from app.services.jobs.events_redis import RedisEventBus
from tests.conftest import redis_url

FOLLOWED_JOBS = 2000

pytestmark = pytest.mark.slow  # 2,000 followers and 4,000 publications: seconds


async def _nothing_stored(job_id: str, after_id: int) -> list[JobEvent]:
    return []


def test_two_thousand_jobs_followed_in_one_process_hold_at_most_ten_redis_connections():
    url = redis_url()
    prefix = f"bus-{uuid.uuid4().hex[:8]}"

    def connections() -> int:
        clients = redis.Redis.from_url(url).client_list()
        return sum(1 for client in clients if client["name"] == prefix)

    async def scenario() -> None:
        link = RedisLink(url, prefix)
        bus = RedisEventBus(link, 60, _nothing_stored)
        await bus.start()
        received: dict[str, list[JobEvent]] = {}

        async def follow(job_id: str) -> None:
            async for batch in bus.follow(job_id, 0, keepalive_seconds=30):
                if batch:
                    received.setdefault(job_id, []).extend(batch)

        jobs = [f"job_{n:024x}" for n in range(FOLLOWED_JOBS)]
        followers = [asyncio.create_task(follow(job_id)) for job_id in jobs]
        try:
            # Every follower has begun by the time the first publication is out.
            await bus.publish(jobs[0], [JobEvent(1, "done", "{}")])
            await asyncio.wait_for(followers[0], 10)
            held = await asyncio.to_thread(connections)
            assert 1 <= held <= 10, f"{held} Redis connections for {FOLLOWED_JOBS} followed jobs"
            for job_id in jobs[1:]:
                await bus.publish(job_id, [JobEvent(1, "progress", "{}"), JobEvent(2, "done", "{}")])
            await asyncio.wait_for(asyncio.gather(*followers), 30)
            assert all([e.id for e in received[job_id]] == [1, 2] for job_id in jobs[1:])
            assert await asyncio.to_thread(connections) <= 10
        finally:
            for follower in followers:
                follower.cancel()
            await bus.close()
            keys = [key async for key in link.client.scan_iter(f"{prefix}:*")]
            if keys:
                await link.client.delete(*keys)
            await link.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
