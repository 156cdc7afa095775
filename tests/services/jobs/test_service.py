"""The generation service on its own: no HTTP, a scripted provider, a SQLite file."""

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager

import pytest
from sqlalchemy.exc import IntegrityError

from app.bootstrap import Components, job_service
from app.core.metrics import Metrics
from app.core.security import ImageUrlSigner
from app.db.accounts import AccountRepository
from app.db.engine import create_engine, create_sessionmaker
from app.db.journal import Journal
from app.db.migrate import upgrade_database
from app.db.repository import ConflictingWriteError, Repository
from app.providers.base import GeneratedImage, ImageRequest, ProviderError
from app.providers.local import render_image
from app.services.auth_service import seed_demo_users
from app.services.image_store import LocalImageStore
from app.services.jobs import domain, queue_inprocess
from app.services.jobs import service as service_module
from app.services.jobs.events_inprocess import InProcessEventBus
from app.services.jobs.image_maker import ImageMaker
from app.services.jobs.queue_inprocess import FirstImage
from app.services.jobs.scheduler import FairScheduler
from app.services.jobs.service import (
    JobNotFoundError,
    ServiceUnavailableError,
    TooManyActiveJobsError,
    TooManyImagesError,
)
from app.services.jobs.views import ImageLinks
from tests.conftest import make_settings

OWNER = "alice@myflix.dev"


class ScriptedProvider:
    """Fails the images whose index is in `failing`; `crashing` raises a non-provider error;
    with `gate`, every image waits for it to open, its picture ready."""

    name = "scripted"
    limits_creates = False
    model = "scripted-1"

    def __init__(self, failing=(), crashing=(), gate: threading.Event | None = None):
        self.failing, self.crashing, self.gate = set(failing), set(crashing), gate
        self.calls: list[tuple[int, int | None, str]] = []
        self.requests: list[ImageRequest] = []
        self.prepared_threads: list[str] = []
        self.prepared_at_first_image: int | None = None

    def generate(self, request: ImageRequest) -> GeneratedImage:
        if self.prepared_at_first_image is None:
            self.prepared_at_first_image = len(self.prepared_threads)
        self.calls.append((request.index, request.seed, threading.current_thread().name))
        self.requests.append(request)
        content = render_image(request.prompt, request.seed, request.index)
        if self.gate is not None:
            self.gate.wait(10)
        if request.index in self.failing:
            raise ProviderError(f"image {request.index} was refused")
        if request.index in self.crashing:
            raise KeyError("bug")
        return GeneratedImage(content=content)

    def prepare_thread(self):
        self.prepared_threads.append(threading.current_thread().name)

    def close(self):
        pass


@asynccontextmanager
async def running_service(tmp_path, provider, image_store=None, **limits):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
    await upgrade_database(engine)
    repository = Repository(engine)
    accounts = AccountRepository(create_sessionmaker(engine))
    await seed_demo_users(accounts)
    options = dict(
        GENERATION_MAX_WORKERS=4,
        MAX_IMAGES_PER_JOB=8,
        MAX_ACTIVE_JOBS_PER_USER=4,
        IMAGE_TIMEOUT_SECONDS=30,
        SHUTDOWN_GRACE_SECONDS=1,
    )
    options.update(limits)
    settings = make_settings(tmp_path / "data", **options)
    image_store = image_store or LocalImageStore(tmp_path / "images")
    components = Components(
        engine,
        repository,
        accounts,
        image_store,
        ImageUrlSigner(b"k", 60),
        Metrics(),
        ImageMaker(provider, image_store),
        None,
    )
    service = job_service(settings, components, makes_images=True)
    await service.start()
    try:
        yield service
    finally:
        await service.shutdown()
        await engine.dispose()


class SaveRecordingStore(LocalImageStore):
    """Notes, at each save, how many `succeeded` progress events of the job had been published
    by then (`events`). The first save lingers until a second one starts (half a
    second at most), so that an image free to overtake the first would do so."""

    def __init__(self, directory):
        super().__init__(directory)
        self.events: list = []
        self.published_at_save: list[int] = []
        self._second_save = threading.Event()

    def save(self, key, content):
        events = list(self.events)
        self.published_at_save.append(sum('"status":"succeeded"' in e.data for e in events if e.name == "progress"))
        if len(self.published_at_save) == 1:
            self._second_save.wait(0.5)
        else:
            self._second_save.set()
        super().save(key, content)


async def _followed(service, job):
    """Every event of the job, to its end (keepalives left out)."""
    return [event async for batch in service.follow(job, 0, keepalive_seconds=5) if batch for event in batch]


async def _run_job(service, **job):
    created, _ = await service.create_job(owner=OWNER, **job)
    events = await _followed(service, created)
    return await service.get_job(created.id, OWNER), events


def _run_one_job(tmp_path, provider, **job):
    async def scenario():
        async with running_service(tmp_path, provider) as service:
            return await _run_job(service, **job)

    return asyncio.run(scenario())


def test_one_image_failing_does_not_stop_the_others(tmp_path):
    job, events = _run_one_job(
        tmp_path, ScriptedProvider(failing={1}, crashing={2}), prompt="p", num_images=4, seed=None
    )
    assert events[-1].name == "done"
    assert '"status":"partial"' in events[-1].data
    assert job.status == "partial"
    statuses = {image.index: (image.status, image.error) for image in job.images}
    assert statuses[0][0] == statuses[3][0] == "succeeded"
    assert statuses[1] == ("failed", "image 1 was refused")
    assert statuses[2] == ("failed", "Internal error: KeyError")


def test_a_result_that_comes_after_its_image_was_taken_over_is_dropped(tmp_path, caplog):
    gate = threading.Event()

    async def scenario():
        async with running_service(tmp_path, ScriptedProvider(gate=gate)) as service:
            created, _ = await service.create_job(owner=OWNER, prompt="p", num_images=1, seed=None)
            deadline = time.monotonic() + 10
            while (await service.get_job(created.id, OWNER)).images[0].attempts != 1:
                assert time.monotonic() < deadline, "the image was never claimed"
                await asyncio.sleep(0.01)
            # Another worker takes the image over (this one was paused, say): attempt 2.
            await service._recorder.record(created.id, lambda j: domain.claimed(j, 0, j.accepted_at, max_attempts=3))
            gate.set()  # this worker's result comes now
            while not any("after it was taken over" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the late result was never seen"
                await asyncio.sleep(0.01)
            image = (await service.get_job(created.id, OWNER)).images[0]
            assert (image.status, image.image_key) == ("running", None), "the overtaken worker recorded its result"
            # The successor's result is the one recorded.
            await service._recorder.record(
                created.id,
                domain.by_attempt(0, 2, lambda j: domain.image_changed(j, 0, "succeeded", j.accepted_at + 1, "b.png")),
            )
            return await service.get_job(created.id, OWNER)

    with caplog.at_level(logging.WARNING, logger="myflix.jobs"):
        job = asyncio.run(scenario())
    assert job.status == "succeeded" and job.images[0].image_key == "b.png"


def test_every_image_failing_makes_a_failed_job(tmp_path):
    job, _ = _run_one_job(tmp_path, ScriptedProvider(failing={0, 1}), prompt="p", num_images=2, seed=None)
    assert job.status == "failed"
    assert job.ttfi_ms is None and job.total_ms is not None


def test_images_run_on_the_worker_pool_with_seed_plus_index(tmp_path):
    provider = ScriptedProvider()
    _run_one_job(tmp_path, provider, prompt="p", num_images=3, seed=100)
    assert sorted((index, seed) for index, seed, _ in provider.calls) == [(0, 100), (1, 101), (2, 102)]
    assert all(thread.startswith("image") for _, _, thread in provider.calls)


def test_every_worker_thread_is_prepared_at_start_before_any_image(tmp_path):
    provider = ScriptedProvider()
    _run_one_job(tmp_path, provider, prompt="p", num_images=3, seed=None)
    # One thread per slot (max_workers) is started and prepared before any image; spares, for
    # calls being cut short, start (and are prepared) only when one is needed.
    assert provider.prepared_at_first_image is not None and provider.prepared_at_first_image >= 4
    assert len(provider.prepared_threads) == len(set(provider.prepared_threads))
    assert {thread for _, _, thread in provider.calls} <= set(provider.prepared_threads)


def test_images_that_finish_together_wait_until_the_first_ones_event_is_published(tmp_path, monkeypatch):
    monkeypatch.setattr(queue_inprocess, "FIRST_IMAGE_HOLD_SECONDS", 30)
    gate = threading.Event()
    provider = ScriptedProvider(gate=gate)

    store = SaveRecordingStore(tmp_path / "recorded")
    publish = InProcessEventBus.publish

    async def recorded_publish(self, job_id, events):
        store.events.extend(events)
        await publish(self, job_id, events)

    monkeypatch.setattr(InProcessEventBus, "publish", recorded_publish)

    async def scenario():
        async with running_service(tmp_path, provider, image_store=store) as service:
            job, _ = await service.create_job(owner=OWNER, prompt="p", num_images=4, seed=None)
            assert await _poll(lambda: len(provider.calls) == 4, seconds=10)  # all made, then released at once
            gate.set()
            events = await _followed(service, job)
            return store.published_at_save, events

    # Had the first image's event not released them, they would have waited the whole hold.
    published_at_save, events = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert events[-1].name == "done" and '"status":"succeeded"' in events[-1].data
    assert published_at_save[0] == 0  # the first went on alone
    assert len(published_at_save) == 4 and all(count >= 1 for count in published_at_save[1:])


def test_the_images_after_the_first_wait_no_longer_than_the_hold(monkeypatch):
    monkeypatch.setattr(queue_inprocess, "FIRST_IMAGE_HOLD_SECONDS", 0.05)
    first_image = FirstImage()
    first_image.wait_turn()  # the first: at once
    waited = threading.Event()
    started = time.monotonic()
    later = threading.Thread(target=lambda: (first_image.wait_turn(), waited.set()))
    later.start()
    assert waited.wait(10)  # never published: the hold ran out
    assert time.monotonic() - started >= 0.05
    later.join()


def test_limits_and_ownership_are_domain_errors(tmp_path):
    gate = threading.Event()

    async def scenario():
        async with running_service(
            tmp_path, ScriptedProvider(gate=gate), MAX_IMAGES_PER_JOB=2, MAX_ACTIVE_JOBS_PER_USER=1
        ) as service:
            with pytest.raises(TooManyImagesError):
                await service.create_job(owner=OWNER, prompt="p", num_images=3, seed=None)
            job, _ = await service.create_job(owner=OWNER, prompt="p", num_images=1, seed=None)
            with pytest.raises(TooManyActiveJobsError) as too_many:
                await service.create_job(owner=OWNER, prompt="p", num_images=1, seed=None)
            assert too_many.value.retry_after > 0
            with pytest.raises(JobNotFoundError):
                await service.get_job(job.id, owner="bob@myflix.dev")
            assert (await service.get_job(job.id, owner=OWNER)) is job
            gate.set()

    asyncio.run(scenario())


def test_images_are_handed_over_while_the_job_is_stored_but_reach_the_provider_once_it_is(tmp_path, monkeypatch):
    commits_may_finish = asyncio.Event()
    write = Journal._write

    async def held_write(self, batch):
        await commits_may_finish.wait()
        await write(self, batch)

    monkeypatch.setattr(Journal, "_write", held_write)

    async def handed_over_before_stored(idempotency_key):
        provider = ScriptedProvider()
        commits_may_finish.clear()
        directory = tmp_path / (idempotency_key or "plain")
        directory.mkdir()
        async with running_service(directory, provider) as service:
            creating = asyncio.create_task(
                service.create_job(
                    owner=OWNER,
                    prompt="p",
                    num_images=1,
                    seed=None,
                    idempotency_key=idempotency_key,
                )
            )
            # Unless an Idempotency-Key could refuse it, the image goes to a worker at once...
            handed_over = await _poll(lambda: service.images_in_progress > 0, seconds=1)
            assert not provider.calls  # ...which calls the provider only once the job is stored
            assert not creating.done()  # the POST is answered only once the job is stored
            commits_may_finish.set()
            await creating
            assert await _poll(lambda: bool(provider.calls), seconds=5)  # stored: it starts in any case
            return handed_over

    async def scenario():
        assert await handed_over_before_stored(None)
        assert not await handed_over_before_stored("key-1")

    asyncio.run(scenario())


def test_a_job_the_database_refuses_never_reaches_the_provider_and_frees_its_slot(tmp_path, monkeypatch):
    gate = threading.Event()
    provider = ScriptedProvider(gate=gate)
    write = Journal._write
    refusing = True

    async def refusing_write(self, batch):
        if refusing:
            raise IntegrityError("INSERT INTO jobs", {}, Exception("refused"))
        await write(self, batch)

    monkeypatch.setattr(Journal, "_write", refusing_write)

    async def scenario():
        nonlocal refusing
        async with running_service(tmp_path, provider, MAX_ACTIVE_JOBS_PER_USER=1) as service:
            with pytest.raises(ConflictingWriteError):
                await service.create_job(owner=OWNER, prompt="p", num_images=1, seed=None)
            assert await _poll(lambda: service.images_in_progress == 0, seconds=5)
            assert provider.requests == []  # its image was handed over, and dropped unmade
            gate.set()
            refusing = False
            job, _ = await service.create_job(owner=OWNER, prompt="q", num_images=1, seed=None)
            events = await _followed(service, job)
            assert events[-1].name == "done"
            gate.clear()
            try:
                await service.create_job(owner=OWNER, prompt="r", num_images=1, seed=None)
                with pytest.raises(TooManyActiveJobsError):  # the refused job freed its slot once, not twice
                    await service.create_job(owner=OWNER, prompt="s", num_images=1, seed=None)
            finally:
                gate.set()

    asyncio.run(scenario())


async def _poll(condition, seconds: float) -> bool:
    """Whether `condition()` became true within `seconds`, checked every millisecond."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.001)
    return True


def _follow_in_a_second_life(tmp_path, job_id):
    """Start a new service on the same database; follow the job to its end there."""

    async def second_life():
        async with running_service(tmp_path, ScriptedProvider()) as service:
            job = await service.get_job(job_id, OWNER)
            events = await _followed(service, job)
            return (await service.get_job(job_id, OWNER)), events

    return asyncio.run(second_life())


@pytest.mark.slow
def test_a_stopping_service_takes_no_new_jobs_and_the_next_one_resumes_them(tmp_path):
    gate = threading.Event()  # never opened: the images are still running at shutdown

    async def first_life():
        async with running_service(tmp_path, ScriptedProvider(gate=gate), SHUTDOWN_GRACE_SECONDS=0) as service:
            job, _ = await service.create_job(owner=OWNER, prompt="p", num_images=2, seed=None)
            stopping = asyncio.create_task(service.shutdown())
            await asyncio.sleep(0)  # let shutdown begin
            with pytest.raises(ServiceUnavailableError):
                await service.create_job(owner=OWNER, prompt="q", num_images=1, seed=None)
            await stopping
            gate.set()  # free the worker threads the first life left behind
            return job.id

    job, events = _follow_in_a_second_life(tmp_path, asyncio.run(first_life()))
    assert job.status == "succeeded"
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert events[-1].name == "done"


@pytest.mark.slow
def test_a_job_that_cannot_be_resumed_ends_with_an_error_event(tmp_path, monkeypatch):
    gate = threading.Event()

    async def first_life():
        async with running_service(tmp_path, ScriptedProvider(gate=gate), SHUTDOWN_GRACE_SECONDS=0) as service:
            job, _ = await service.create_job(owner=OWNER, prompt="p", num_images=1, seed=None)
        gate.set()
        return job.id

    def broken_push(self, *args, **kwargs):
        raise RuntimeError("scheduler is broken")

    job_id = asyncio.run(first_life())
    monkeypatch.setattr(FairScheduler, "push", broken_push)
    job, events = _follow_in_a_second_life(tmp_path, job_id)
    assert job.status == "failed"
    assert events[-1].name == "error"
    assert "could not be resumed" in events[-1].data


def test_retention_deletes_finished_jobs_in_batches_with_their_images_and_keeps_younger_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(service_module, "RETENTION_BATCH_SIZE", 2)  # five jobs: three batches

    async def scenario():
        async with running_service(tmp_path, ScriptedProvider()) as service:
            jobs = [(await _run_job(service, prompt=f"p{n}", num_images=2, seed=None))[0] for n in range(5)]
            images = tmp_path / "images"
            assert len(list(images.glob("*.png"))) == 10
            assert await service.expire_jobs(retention_seconds=3600) == 0  # all younger than that
            assert await service.expire_jobs(retention_seconds=0) == 5
            for job in jobs:
                with pytest.raises(JobNotFoundError):
                    await service.get_job(job.id, OWNER)
            assert list(images.glob("*.png")) == []
            page = await service.list_jobs(OWNER, 10, None, ImageLinks(ImageUrlSigner(b"k", 60), "http://t"))
            assert page.jobs == []

    asyncio.run(scenario())
