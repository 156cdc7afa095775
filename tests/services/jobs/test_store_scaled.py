"""The scaled-out job store where it differs from the in-process one: several processes write
one job, each through a store of its own (needs TEST_DATABASE_URL; skipped without, failed
under CI)."""

import asyncio
import json

from app.db.accounts import AccountRepository
from app.db.engine import create_engine, create_sessionmaker
from app.db.migrate import upgrade_database
from app.db.repository import Repository
from app.services.auth_service import seed_demo_users
from app.services.jobs import domain
from app.services.jobs.interfaces import OwnerLimits
from app.services.jobs.store_scaled import ScaledJobStore
from tests.conftest import postgres_url

OWNER = "alice@myflix.dev"
PROCESSES = 4
IMAGES_EACH = 4


def test_writers_of_one_job_in_several_processes_wait_for_each_other_and_number_their_events_after_theirs():
    """Each store batches its own transitions of a job into one transaction; the stores of
    other processes take the job's row lock in turn, and each must see the events the one
    before it committed while it waited (not those of the moment its statement began)."""

    url = postgres_url()

    async def scenario() -> None:
        engines = [create_engine(url) for _ in range(PROCESSES)]
        try:
            await upgrade_database(engines[0])
            await seed_demo_users(AccountRepository(create_sessionmaker(engines[0])))
            stores = [ScaledJobStore(Repository(engine), engine) for engine in engines]
            job = domain.new_job(OWNER, "one job, many writers", PROCESSES * IMAGES_EACH, 7, "local", "model", None)
            await stores[0].create(job, domain.accepted(job, [None] * job.num_images), OwnerLimits(100, None))
            await asyncio.gather(
                *(
                    stores[n].apply(job.id, lambda j, i=i: domain.claimed(j, i, j.accepted_at, max_attempts=3))
                    for n in range(PROCESSES)
                    for i in range(n * IMAGES_EACH, (n + 1) * IMAGES_EACH)
                )
            )
            stored = await stores[0].events(job.id)
            assert [e.id for e in stored] == list(range(1, 2 * job.num_images + 1))
            running = [json.loads(e.data) for e in stored[job.num_images :]]
            assert sorted(data["index"] for data in running) == list(range(job.num_images))
            assert (await stores[1].get(job.id)).images[0].attempts == 1
        finally:
            for engine in engines:
                await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), 30))
