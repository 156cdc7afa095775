"""Image-generation jobs across processes: API replicas and workers over Redis and PostgreSQL.

PostgreSQL holds every job, image and event; a change is made under the job's row lock, so
workers finishing images of one job at once take turns, and an image is recorded once
however often its work is delivered. Redis carries what must reach other processes quickly:
the events (to every replica's subscribers) and the image work (to every worker).
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone

from redis.exceptions import RedisError

from app.core.metrics import Metrics
from app.db.repository import Repository
from app.providers.base import ImageRequest
from app.services.event_log import JobEvent
from app.services.image_maker import ImageMaker, ImageOutcome
from app.services.job_service import (
    JobService,
    ServiceUnavailableError,
    check_active_jobs,
    check_cancelable,
    timeout_message,
)
from app.services.job_state import Job, JobRecorder, Update, job_from_rows, stored_events
from app.services.journal import Journal
from app.services.redis_streams import (
    RedisEventStreams,
    RedisLink,
    RedisWorkQueue,
    WorkItem,
    with_stream_ids,
)
from app.services.scheduler import BurstReserve

logger = logging.getLogger("myflix.jobs")

REDIS_DOWN = "The job queue (Redis) is unavailable; retry in a moment."
# A sweep leaves alone jobs younger than this: their enqueue may be on its way.
SWEEP_GRACE_SECONDS = 5.0
RETRY_DELAYS_SECONDS = (0.2, 0.5, 1.0, 2.0)


class ScaledJobs:
    """What API replicas and workers both do to jobs: change one under its lock and publish,
    queue images, and sweep for images that no queue holds."""

    def __init__(
        self,
        repository: Repository,
        recorder: JobRecorder,
        link: RedisLink,
        claim_timeout_seconds: float,
        events_retention_seconds: int,
    ) -> None:
        self.repository = repository
        self.recorder = recorder
        self.link = link
        self.events = RedisEventStreams(link, events_retention_seconds, stored_events=self.stored_events)
        self.queue = RedisWorkQueue(link)
        self._claim_timeout = claim_timeout_seconds
        self._maintenance: asyncio.Task | None = None
        self._waiting: dict[str, list] = {}  # job id -> transitions for its next transaction

    async def start(self) -> None:
        self.link.start()
        self.link.on_recovered(self._recover)
        try:
            await self._recover()
        except (RedisError, OSError) as exc:
            self.link.lost(exc)  # the watch recovers when Redis answers
        self._maintenance = asyncio.create_task(self._maintain(), name="sweep")

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
        await self.events.close()
        await self.link.close()

    async def stored_events(self, job_id: str, after_id: int = 0) -> list[JobEvent]:
        return await stored_events(self.repository, job_id, after_id)

    async def update(self, job_id: str, transition: Callable[[Job], Update | None]) -> Job | None:
        """Apply `transition` to the job as stored, under its lock; commit, then publish.
        Transitions of one job that come while its transaction runs here (sixteen images
        finishing together) share the next transaction, in the order they came."""
        done = asyncio.get_running_loop().create_future()
        waiting = self._waiting.get(job_id)
        if waiting is not None:
            waiting.append((transition, done))
            return await done
        self._waiting[job_id] = waiting = [(transition, done)]
        batch: list = []
        try:
            while waiting:
                batch = waiting[:]
                del waiting[:]
                await self._apply(job_id, batch)
        finally:
            del self._waiting[job_id]
            for _, future in batch + waiting:  # when this task was canceled mid-way
                if not future.done():
                    future.cancel()
        return await done

    async def _apply(self, job_id: str, batch: list[tuple[Callable[[Job], Update | None], asyncio.Future]]) -> None:
        failures: dict[int, Exception] = {}

        def change(stored, event_rows):
            job = job_from_rows(stored, [JobEvent(row.id, row.name, row.data) for row in event_rows])
            update = Update()
            for n, (transition, _) in enumerate(batch):
                try:
                    update.add(transition(job))
                except Exception as exc:  # that caller's error (say, a cancel too late); not the others'
                    failures[n] = exc
            return (job, update), update.changes

        try:
            result = await self.repository.update_job(job_id, change)
            if result is not None:
                await self.events.publish(job_id, result[1].events)
        except Exception as exc:
            for _, future in batch:
                future.set_exception(exc)
            return
        for n, (_, future) in enumerate(batch):
            if n in failures:
                future.set_exception(failures[n])
            else:
                future.set_result(None if result is None else result[0])

    async def enqueue(self, job: Job, indexes: list[int]) -> None:
        # A job none of whose images has succeeded yet sends its lowest one ahead.
        first = None if any(image.status == "succeeded" for image in job.images) else min(indexes, default=None)
        await self.queue.enqueue(job.id, indexes, first)

    async def _recover(self) -> None:
        await self.queue.ensure_group()
        if await self.queue.first_since_reset():
            logger.info("Redis started empty: putting every unfinished image back in the queue")
            await self.sweep(grace_seconds=0)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self._claim_timeout)
            try:
                if self.link.available and await self.queue.lock("sweep", self._claim_timeout * 0.9):
                    await self.sweep(SWEEP_GRACE_SECONDS)
            except (RedisError, OSError) as exc:
                self.link.lost(exc)
            except Exception:
                logger.exception("sweep failed")

    async def sweep(self, grace_seconds: float) -> None:
        """Bring every unfinished job to where it can finish: queue the images no queue holds,
        end a canceled job's images, and send `done` for a job whose images have all ended."""
        now, young = time.monotonic(), datetime.now(timezone.utc) - timedelta(seconds=grace_seconds)
        for stored in await self.repository.unfinished_jobs():
            job = job_from_rows(stored)
            if job.created_at > young:
                continue
            if job.cancel_requested or not job.unfinished_images():
                await self.update(job.id, lambda j: _conclude(self.recorder, j, now))
                continue
            missing = await self.queue.untracked([(job.id, image.index) for image in job.unfinished_images()])
            if missing:
                logger.info("requeueing images no queue held", extra={"job_id": job.id, "images": len(missing)})
                await self.enqueue(job, [index for _, index in missing])


def _conclude(recorder: JobRecorder, job: Job, now: float) -> Update | None:
    if job.finished:
        return None
    if job.cancel_requested:
        return recorder.canceled(job, now)
    return None if job.unfinished_images() else recorder.finished(job, now)


class ScaledGenerationService(JobService):
    """The API's side: the same operations as the single-process GenerationService."""

    def __init__(
        self,
        jobs: ScaledJobs,
        journal: Journal,
        metrics: Metrics,
        worker: "ImageWorker | None",
        max_images_per_job: int,
        max_active_jobs_per_user: int,
    ) -> None:
        super().__init__(jobs.repository, jobs.recorder, metrics, max_images_per_job, max_active_jobs_per_user)
        self._jobs = jobs
        self._link = jobs.link
        self._journal = journal  # new jobs: a burst of them commits in one transaction
        self._worker = worker

    async def start(self) -> None:
        await self._jobs.start()
        if self._worker is not None:
            self._worker.start()

    async def shutdown(self) -> None:
        if not self._accepting:
            return
        self._accepting = False
        if self._worker is not None:
            await self._worker.stop()
        await self._jobs.close()
        await self._journal.close()

    async def _admit(self, job: Job) -> None:
        if not self._link.available:
            raise ServiceUnavailableError(REDIS_DOWN)
        check_active_jobs(await self._repository.count_unfinished(job.owner), self._max_active_jobs_per_user)
        update = self._recorder.accepted(job, [None] * job.num_images)
        await self._journal.write(update.changes)
        try:
            await self._jobs.enqueue(job, [image.index for image in job.images])
        except (RedisError, OSError) as exc:
            self._link.lost(exc)
            await self._jobs.update(job.id, lambda j: self._recorder.failed(j, REDIS_DOWN))
            raise ServiceUnavailableError(REDIS_DOWN) from None
        await self._jobs.events.publish(job.id, update.events)

    async def cancel_job(self, job_id: str, owner: str) -> Job:
        check_cancelable(await self.get_job(job_id, owner))

        def cancel(job: Job) -> Update:
            check_cancelable(job)  # again, under the lock: a worker may have just finished it
            return self._recorder.canceled(job, time.monotonic())

        job = await self._jobs.update(job_id, cancel)
        try:
            await self._jobs.queue.announce_cancel(job_id)
            await self._jobs.queue.untrack(job_id, [image.index for image in job.images])
        except (RedisError, OSError) as exc:
            self._link.lost(exc)  # workers find the images canceled when they record them
        return job

    def _follow_live(self, job: Job, after_id: int, keepalive_seconds: float) -> AsyncIterator[list[JobEvent] | None]:
        return self._jobs.events.follow(job.id, after_id, keepalive_seconds)

    def _as_sent(self, events: list[JobEvent]) -> list[JobEvent]:
        return with_stream_ids(events)


class ImageWorker:
    """Takes image work from Redis and makes the images, `max_workers` at a time; runs in
    `python -m app.worker`, and in API replicas unless RUN_WORK_IN_API is false."""

    def __init__(
        self,
        jobs: ScaledJobs,
        image_maker: ImageMaker,
        metrics: Metrics,
        max_workers: int,
        claim_timeout_seconds: float,
        image_timeout_seconds: float,
        shutdown_grace_seconds: float,
    ) -> None:
        self._jobs = jobs
        self._queue = jobs.queue
        self._maker = image_maker
        self._executor = image_maker.new_executor(max_workers)
        self._free = asyncio.Semaphore(max_workers)
        self._slots = max_workers
        # The single process's rule: during a burst of new jobs, half the threads wait for
        # first images rather than take later ones.
        self._burst = BurstReserve(max_workers)
        self._claim_timeout = claim_timeout_seconds
        self._image_timeout = image_timeout_seconds
        self._grace = shutdown_grace_seconds
        self._ready: list[WorkItem] = []  # taken from Redis, not started yet
        self._running: dict[WorkItem, ImageRequest] = {}
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        metrics.watch_workers(lambda: len(self._running), lambda: len(self._ready))

    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._consume(), name="work-consume"),
            asyncio.create_task(self._keep_claims(), name="work-claims"),
            asyncio.create_task(self._follow_cancels(), name="work-cancels"),
        ]

    async def stop(self) -> None:
        """Take no more work; give running images the grace period, then leave them pending
        for another worker (a Replicate prediction is re-attached there)."""
        for loop in self._loops:
            loop.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._grace)
        for request in self._running.values():
            request.stop.interrupt()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._maker.close()

    async def _consume(self) -> None:
        failures = 0
        while True:
            await self._free.acquire()
            try:
                if not self._ready:
                    free = max(1, self._slots - len(self._tasks))
                    held = self._burst.holds(free)
                    if held:
                        taken = await self._queue.read(free, later=0, wait_seconds=held)
                    else:
                        # Above the reserve, later images may take only what is above it.
                        reserve = self._burst.reserve
                        taken = await self._queue.read(free, later=free - reserve if free > reserve else free)
                    for item in taken:
                        if item.stream == self._queue.first:
                            self._burst.arrived()
                    self._ready += taken
                failures = 0
            except (RedisError, OSError) as exc:
                self._jobs.link.lost(exc)
                await asyncio.sleep(RETRY_DELAYS_SECONDS[min(failures, len(RETRY_DELAYS_SECONDS) - 1)])
                failures += 1
            if not self._ready:
                self._free.release()
                continue
            task = asyncio.create_task(self._run(self._ready.pop(0)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _keep_claims(self) -> None:
        """Renew the claims on held work every third of the claim timeout, and take over work
        left unrenewed for two thirds of it (looked for every sixth): a live worker's claims
        are never that old, and a dead worker's work moves on within the timeout."""
        renewed_at = 0.0
        while True:
            await asyncio.sleep(self._claim_timeout / 6)
            try:
                if time.monotonic() - renewed_at >= self._claim_timeout / 3:
                    await self._queue.keep([*self._running, *self._ready])
                    renewed_at = time.monotonic()
                room = self._slots - len(self._tasks) - len(self._ready)
                if room > 0:
                    taken = await self._queue.reclaim(self._claim_timeout * 2 / 3, room)
                    if taken:
                        logger.info("took over %d images from a worker that went quiet", len(taken))
                    self._ready += taken
            except (RedisError, OSError) as exc:
                self._jobs.link.lost(exc)

    async def _follow_cancels(self) -> None:
        failures = 0
        while True:
            try:
                async for job_id in self._queue.cancels():
                    failures = 0
                    for item, request in list(self._running.items()):
                        if item.job_id == job_id:
                            request.stop.cancel()
            except (RedisError, OSError) as exc:
                self._jobs.link.lost(exc)
            await asyncio.sleep(RETRY_DELAYS_SECONDS[min(failures, len(RETRY_DELAYS_SECONDS) - 1)])
            failures += 1

    async def _run(self, item: WorkItem) -> None:
        try:
            await self._make(item)
        except (RedisError, OSError) as exc:
            self._jobs.link.lost(exc)  # the item stays pending, or the sweep queues it again
        except Exception:
            logger.exception("image work failed", extra={"job_id": item.job_id, "index": item.index})
        finally:
            self._running.pop(item, None)
            self._free.release()

    async def _make(self, item: WorkItem) -> None:
        recorder, loop = self._jobs.recorder, asyncio.get_running_loop()
        stored = await self._jobs.repository.get_job(item.job_id)
        job = None if stored is None else job_from_rows(stored)
        if job is None or job.images[item.index].finished or job.cancel_requested:
            await self._queue.done(item)  # recorded already (a redelivery), or canceled
            return
        image = job.images[item.index]
        started = time.monotonic()

        def begin(job: Job) -> Update | None:
            image = job.images[item.index]
            if image.status != "queued" or job.cancel_requested:
                return None
            return recorder.image_changed(job, image, "running", started)

        def report(coroutine_function, *args) -> None:
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(coroutine_function(*args)))

        request = ImageRequest(
            job_id=job.id,
            index=image.index,
            prompt=job.prompt,
            seed=None if job.seed is None else job.seed + image.index,
            resume_prediction_id=image.prediction_id,
            on_prediction=lambda prediction_id: report(
                self._jobs.repository.set_prediction_id, job.id, image.index, prediction_id
            ),
            on_retry=lambda attempt, delay, reason: report(
                self._jobs.update, job.id,
                lambda j: recorder.retrying(j, j.images[item.index], attempt, delay, reason),
            ),
        )
        self._running[item] = request
        # The image first, the bookkeeping after: its time is running already.
        made = loop.run_in_executor(self._executor, self._maker.make, request)
        if image.status == "queued":
            await self._jobs.update(item.job_id, begin)
        try:
            outcome = await asyncio.wait_for(asyncio.shield(made), self._image_timeout)
        except TimeoutError:
            request.stop.cancel()
            outcome = ImageOutcome("failed", time.monotonic(), error=timeout_message(self._image_timeout))
        if outcome is None:
            if request.stop.cancels_at_provider:
                await self._queue.done(item)  # canceled: the cancel recorded it
            return  # interrupted: stays pending, for another worker to take over

        def finish(job: Job) -> Update | None:
            image = job.images[item.index]
            image.started_at = started
            return recorder.image_changed(job, image, outcome.status, outcome.at, key=outcome.key, error=outcome.error)

        await self._jobs.update(item.job_id, finish)
        await self._queue.done(item)
