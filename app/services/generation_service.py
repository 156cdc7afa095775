"""Image-generation jobs in one process: scheduling, state, metrics, durability, events.

Each image is one provider call on a worker thread, taken from a round-robin queue across
jobs. Workers report back to the event loop with `call_soon_threadsafe`; only the loop
thread changes a job. Every state change is written through the journal and published to
subscribers right after its commit, so an event a client has seen survives any crash, and
its id means the same thing after a restart.
"""

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app.core.metrics import Metrics
from app.core.security import ImageUrlSigner
from app.db.repository import Changes, Repository
from app.models.generation import JobPage, JobSnapshot
from app.providers.base import ImageRequest
from app.services.errors import InvalidFieldError
from app.services.event_log import EventLog, JobEvent
from app.services.image_maker import ImageMaker, ImageOutcome
from app.services.job_state import (
    Job,
    ImageState,
    JobRecorder,
    Update,
    decode_cursor,
    encode_cursor,
    job_from_rows,
    new_job,
    stored_events,
)
from app.db.repository import ConflictingWriteError
from app.services.journal import Journal
from app.services.scheduler import FairScheduler

logger = logging.getLogger("myflix.jobs")

ACTIVE_JOBS_RETRY_AFTER_SECONDS = 5


class JobNotFoundError(Exception):
    """No such job for this user (another user's job is not found either)."""


class TooManyImagesError(InvalidFieldError):
    location = ("body", "num_images")

    def __init__(self, limit: int) -> None:
        super().__init__(f"num_images must be between 1 and {limit}")


class TooManyActiveJobsError(Exception):
    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(
            f"You already have {limit} jobs in progress; wait for one to finish or cancel one."
        )
        self.retry_after = retry_after


class JobAlreadyFinishedError(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(f"The job has already finished ({status}); there is nothing to cancel.")


class IdempotencyConflictError(Exception):
    def __init__(self) -> None:
        super().__init__("This Idempotency-Key was used with a different request body.")


class ServiceUnavailableError(Exception):
    def __init__(self, message: str = "The service is shutting down; retry in a moment.") -> None:
        super().__init__(message)


@dataclass
class _ImageTask:
    job: Job
    image: ImageState


class GenerationService:
    def __init__(
        self,
        image_maker: ImageMaker,
        repository: Repository,
        journal: Journal,
        url_signer: ImageUrlSigner,
        metrics: Metrics,
        max_workers: int,
        max_images_per_job: int,
        max_active_jobs_per_user: int,
        image_timeout_seconds: float,
        shutdown_grace_seconds: float,
    ) -> None:
        self._maker = image_maker
        self._repository = repository
        self._journal = journal
        self._max_images_per_job = max_images_per_job
        self._max_active_jobs_per_user = max_active_jobs_per_user
        self._image_timeout_seconds = image_timeout_seconds
        self._shutdown_grace_seconds = shutdown_grace_seconds
        self._workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="image")
        self._scheduler: FairScheduler[_ImageTask] = FairScheduler(
            max_workers,
            self._start_image,
            defer=lambda dispatch: self._loop.call_soon(dispatch),
            call_later=lambda delay, dispatch: self._loop.call_later(delay, dispatch),
        )
        provider = image_maker.provider
        self._recorder = JobRecorder(
            provider.name, provider.model, url_signer, metrics,
            queue_position=lambda job, image: self._scheduler.position(job.id, _ImageTask(job, image)),
        )
        self._metrics = metrics
        metrics.watch_workers(lambda: self._scheduler.busy, lambda: self._scheduler.waiting)
        self._live: dict[str, Job] = {}  # unfinished jobs, and no others
        self._pending_keys: dict[tuple[str, str], Job] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # Lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker thread, then pick up the jobs a previous process left unfinished."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._start_workers)
        for stored in await self._repository.unfinished_jobs():
            events = await stored_events(self._repository, stored.job.id)
            job = job_from_rows(stored, events)
            job.events = EventLog.replay(events, closed=False)
            self._live[job.id] = job
            try:
                self._resume(job)
            except Exception:
                logger.exception("could not resume job", extra={"job_id": job.id})
                self._record(job, self._recorder.failed(job, "The job could not be resumed after a restart."))

    def _start_workers(self) -> None:
        # The pool makes its threads on demand; a first burst of images would pay for that.
        everyone_started = threading.Barrier(self._workers + 1)
        for _ in range(self._workers):
            self._executor.submit(everyone_started.wait)
        everyone_started.wait()

    async def shutdown(self) -> None:
        """Take no new work, let running images finish for the grace period, then leave the
        rest recorded for the next start (Replicate predictions stay running there)."""
        if not self._accepting:
            return  # already shut down, or shutting down
        self._accepting = False
        self._scheduler.pause()
        try:
            await asyncio.wait_for(self._idle.wait(), self._shutdown_grace_seconds)
        except TimeoutError:
            logger.warning("shutdown grace period over; %d images left for the next start", self._scheduler.busy)
        self._stopping = True
        for job in self._live.values():
            for image in job.images:
                if image.request is not None:
                    image.request.stop.interrupt()
        await self._journal.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._maker.close()

    # Commands ----------------------------------------------------------------------------

    async def create_job(
        self,
        owner: str,
        prompt: str,
        num_images: int,
        seed: int | None,
        image_base_url: str,
        idempotency_key: str | None = None,
    ) -> tuple[Job, bool]:
        """The new job, or with an Idempotency-Key seen before the earlier job; and whether it
        was an earlier one."""
        if not self._accepting:
            raise ServiceUnavailableError()
        check_num_images(num_images, self._max_images_per_job)
        job = new_job(owner, prompt, num_images, seed, image_base_url, idempotency_key)
        if idempotency_key is not None:
            earlier = await self._find_idempotent(owner, idempotency_key)
            if earlier is not None:
                return check_replay(earlier, job), True
        active = sum(job.owner == owner and not job.finished for job in self._live.values())
        check_active_jobs(active, self._max_active_jobs_per_user)

        self._live[job.id] = job
        if idempotency_key is not None:
            self._pending_keys[(owner, idempotency_key)] = job
        update = self._recorder.accepted(job, self._scheduler.positions_for_new_job(num_images))

        def publish() -> None:
            for event in update.events:
                job.events.append(event)
            self._scheduler.push(job.id, [_ImageTask(job, image) for image in job.images])

        try:
            await self._journal.write(update.changes, publish)
        except ConflictingWriteError:
            # Another process stored this Idempotency-Key first.
            del self._live[job.id]
            earlier = await self._find_idempotent(owner, idempotency_key) if idempotency_key else None
            if earlier is None:
                raise
            return check_replay(earlier, job), True
        finally:
            if idempotency_key is not None:
                self._pending_keys.pop((owner, idempotency_key), None)
        return job, False

    async def cancel_job(self, job_id: str, owner: str) -> Job:
        job = await self.get_job(job_id, owner)
        check_cancelable(job)
        self._scheduler.remove_job(job.id)
        for image in job.unfinished_images():
            if image.request is not None:
                image.request.stop.cancel()
        self._record(job, self._recorder.canceled(job, time.monotonic()))
        return job

    # Queries -----------------------------------------------------------------------------

    async def get_job(self, job_id: str, owner: str) -> Job:
        job = self._live.get(job_id)
        if job is None:
            stored = await self._repository.get_job(job_id)
            job = None if stored is None else job_from_rows(stored)
        return check_owner(job, job_id, owner)

    async def list_jobs(self, owner: str, limit: int, cursor: str | None, image_base_url: str) -> JobPage:
        return await list_jobs_page(
            self._repository, self._recorder, owner, limit, cursor, image_base_url, live=self._live
        )

    def snapshot(self, job: Job, image_base_url: str) -> JobSnapshot:
        return self._recorder.snapshot(job, image_base_url)

    async def follow(self, job: Job, after_id: int, keepalive_seconds: float) -> AsyncIterator[JobEvent | None]:
        """The job's events after `after_id`, live until the job ends; None means keepalive."""
        if job.id not in self._live:
            # Finished (possibly before a restart): replay what was stored.
            job.events = EventLog.replay(await stored_events(self._repository, job.id))
        self._metrics.open_streams.inc()
        try:
            async for event in job.events.follow(after_id, keepalive_seconds):
                yield event
        finally:
            self._metrics.open_streams.dec()

    # Images on worker threads ----------------------------------------------------------------

    def _start_image(self, task: _ImageTask) -> None:
        """Called by the scheduler, on the loop, when a worker is free for this image."""
        job, image = task.job, task.image
        self._idle.clear()
        image.request = ImageRequest(
            job_id=job.id,
            index=image.index,
            prompt=job.prompt,
            seed=None if job.seed is None else job.seed + image.index,
            resume_prediction_id=image.prediction_id,
            on_prediction=lambda prediction_id: self._report(self._record_prediction, job, image, prediction_id),
            on_retry=lambda attempt, delay, reason: self._report(self._retrying, job, image, attempt, delay, reason),
        )
        image.started_at = image.request.dispatched_at
        # The worker first, the bookkeeping after: the image's time is running already.
        self._executor.submit(self._run_image, job, image, image.request)
        image.deadline = self._loop.call_later(self._image_timeout_seconds, self._time_out, job, image, image.request)
        if image.status == "queued":
            self._record(job, self._recorder.image_changed(job, image, "running", image.started_at))

    def _run_image(self, job: Job, image: ImageState, request: ImageRequest) -> None:
        self._report(self._finish_image, job, image, request, self._maker.make(request))

    def _report(self, callback: Callable, *args: object) -> None:
        assert self._loop is not None, "GenerationService.start() was not awaited"
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: this process is gone, the next start resumes
            pass

    # Event-loop thread only ------------------------------------------------------------

    def _time_out(self, job: Job, image: ImageState, request: ImageRequest) -> None:
        if image.request is not request or self._stopping:
            return
        # The worker thread ends when the provider notices; the image does not wait for it.
        request.stop.cancel()
        self._record(job, self._recorder.image_changed(
            job, image, "failed", time.monotonic(), error=timeout_message(self._image_timeout_seconds)
        ))

    def _finish_image(self, job: Job, image: ImageState, request: ImageRequest, outcome: ImageOutcome | None) -> None:
        if image.request is request:
            image.request = None
            if image.deadline is not None:
                image.deadline.cancel()
        self._scheduler.release()
        if self._scheduler.busy == 0:
            self._idle.set()
        if outcome is None or self._stopping:
            return
        self._record(job, self._recorder.image_changed(
            job, image, outcome.status, outcome.at, key=outcome.key, error=outcome.error
        ))

    def _record_prediction(self, job: Job, image: ImageState, prediction_id: str) -> None:
        image.prediction_id = prediction_id
        self._journal.write(Changes(image_states=[self._recorder.image_state(job, image)]))

    def _retrying(self, job: Job, image: ImageState, attempt: int, delay: float, reason: str) -> None:
        self._record(job, self._recorder.retrying(job, image, attempt, delay, reason))

    def _record(self, job: Job, update: Update | None) -> None:
        """Write the update; once committed, send its events (and end a finished job)."""
        if update is None:
            return

        def publish() -> None:
            for event in update.events:
                job.events.append(event)
            if update.closes:
                job.events.close()
                self._live.pop(job.id, None)

        self._journal.write(update.changes, publish)

    # Persistence -------------------------------------------------------------------------

    async def _find_idempotent(self, owner: str, key: str) -> Job | None:
        pending = self._pending_keys.get((owner, key))
        if pending is not None:
            return pending
        row = await self._repository.find_by_idempotency_key(owner, key)
        if row is None:
            return None
        return self._live.get(row.id) or await self.get_job(row.id, owner)

    def _resume(self, job: Job) -> None:
        logger.info("job resumed after restart", extra={"job_id": job.id})
        unfinished = job.unfinished_images()
        if job.cancel_requested:
            self._record(job, self._recorder.canceled(job, time.monotonic()))
            return
        if not unfinished:  # every image finished but the process stopped before `done`
            self._record(job, self._recorder.finished(job, time.monotonic()))
            return
        running = [_ImageTask(job, image) for image in unfinished if image.status == "running"]
        queued = [_ImageTask(job, image) for image in unfinished if image.status == "queued"]
        # Work that had started goes first: it may only need re-attaching.
        self._scheduler.push(job.id, running, front=True)
        self._scheduler.push(job.id, queued)


# Rules both the single-process and the scaled-out service apply ---------------------------


def check_num_images(num_images: int, limit: int) -> None:
    if not 1 <= num_images <= limit:
        raise TooManyImagesError(limit)


def check_replay(earlier: Job, new: Job) -> Job:
    """The earlier job of this Idempotency-Key, if it was asked for with the same body."""
    if earlier.request_fingerprint != new.request_fingerprint:
        raise IdempotencyConflictError()
    return earlier


def check_active_jobs(active: int, limit: int) -> None:
    if active >= limit:
        raise TooManyActiveJobsError(limit, ACTIVE_JOBS_RETRY_AFTER_SECONDS)


def check_owner(job: Job | None, job_id: str, owner: str) -> Job:
    if job is None or job.owner != owner:
        raise JobNotFoundError(job_id)
    return job


def check_cancelable(job: Job) -> None:
    if job.finished or job.cancel_requested:
        raise JobAlreadyFinishedError(job.status)


def timeout_message(seconds: float) -> str:
    return f"The provider did not finish the image within {seconds:g} s."


async def list_jobs_page(
    repository: Repository,
    recorder: JobRecorder,
    owner: str,
    limit: int,
    cursor: str | None,
    image_base_url: str,
    live: dict[str, Job],
) -> JobPage:
    """A page of the owner's jobs, newest first; `live` has the jobs this process holds."""
    before = decode_cursor(cursor) if cursor else None
    stored = await repository.list_jobs(owner, limit + 1, before)
    page = [live.get(s.job.id) or job_from_rows(s) for s in stored[:limit]]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(stored) > limit else None
    return JobPage(jobs=[recorder.snapshot(job, image_base_url) for job in page], next_cursor=next_cursor)
