"""Image-generation jobs in one process: scheduling, state, metrics, durability, events.

Each image is one provider call on a worker thread, taken in the scheduler's order (first
images first, then round-robin across jobs). Workers report back to the event loop with
`call_soon_threadsafe`; only the loop thread changes a job. Every state change is written through the journal and published to
subscribers right after its commit, so an event a client has seen survives any crash, and
its id means the same thing after a restart.
"""

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from app.core.metrics import Metrics
from app.core.security import ImageUrlSigner
from app.db.repository import Changes, ConflictingWriteError, Repository
from app.providers.base import ImageRequest
from app.services.event_log import EventLog, JobEvent
from app.services.image_maker import ImageMaker, ImageOutcome
from app.services.job_service import JobService, check_active_jobs, check_cancelable, timeout_message
from app.services.job_state import ImageState, Job, JobRecorder, Update, job_from_rows, stored_events
from app.services.journal import Journal
from app.services.scheduler import FairScheduler

logger = logging.getLogger("myflix.jobs")


@dataclass
class _ImageTask:
    job: Job
    image: ImageState


class GenerationService(JobService):
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
        self._journal = journal
        self._image_timeout_seconds = image_timeout_seconds
        self._shutdown_grace_seconds = shutdown_grace_seconds
        self._workers = max_workers
        self._executor = image_maker.new_executor(max_workers)
        self._scheduler: FairScheduler[_ImageTask] = FairScheduler(
            max_workers,
            self._start_image,
            defer=lambda dispatch: self._loop.call_soon(dispatch),
            call_later=lambda delay, dispatch: self._loop.call_later(delay, dispatch),
        )
        provider = image_maker.provider
        recorder = JobRecorder(
            provider.name, provider.model, url_signer, metrics,
            queue_position=lambda job, image: self._scheduler.position(job.id, _ImageTask(job, image)),
        )
        super().__init__(repository, recorder, metrics, max_images_per_job, max_active_jobs_per_user)
        metrics.watch_workers(lambda: self._scheduler.busy, lambda: self._scheduler.waiting)
        self._pending_keys: dict[tuple[str, str], Job] = {}
        # Kept with _live, so that a new job's limit check does not walk every live job.
        self._unfinished_per_owner: Counter[str] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()
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
            self._hold(job)
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

    async def _admit(self, job: Job) -> None:
        check_active_jobs(self._unfinished_per_owner[job.owner], self._max_active_jobs_per_user)
        self._hold(job)
        key = (job.owner, job.idempotency_key)
        if job.idempotency_key is not None:
            self._pending_keys[key] = job
        update = self._recorder.accepted(job, self._scheduler.positions_for_new_job(job.num_images))
        tasks = [_ImageTask(job, image) for image in job.images]
        # Only an Idempotency-Key can make the insert fail (the journal retries anything else
        # until it commits), so a job without one starts its images now, while its insert
        # commits: under a burst of POSTs the first ones' images need not wait for the last.
        # Its events, like every event, are still sent only once stored.
        starts_now = job.idempotency_key is None

        def publish() -> None:
            for event in update.events:
                job.events.append(event)
            if not starts_now:
                self._scheduler.push(job.id, tasks)

        stored = self._journal.write(update.changes, publish)  # queued before any image's own writes
        if starts_now:
            self._scheduler.push(job.id, tasks)
        try:
            await stored
        except ConflictingWriteError:
            self._scheduler.remove_job(job.id)
            for image in job.images:
                if image.request is not None:
                    image.request.stop.cancel()
            del self._live[job.id]
            self._unfinished_per_owner[job.owner] -= 1
            raise
        finally:
            self._pending_keys.pop(key, None)

    async def cancel_job(self, job_id: str, owner: str) -> Job:
        job = await self.get_job(job_id, owner)
        check_cancelable(job)
        self._scheduler.remove_job(job.id)
        for image in job.unfinished_images():
            if image.request is not None:
                image.request.stop.cancel()
        self._record(job, self._recorder.canceled(job, time.monotonic()))
        return job

    def _follow_live(self, job: Job, after_id: int, keepalive_seconds: float) -> AsyncIterator[list[JobEvent] | None]:
        return self._live[job.id].events.follow(after_id, keepalive_seconds)

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
        self._report(self._finish_image, job, image, request, self._maker.make(request, job.first_image))

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
        # A job no longer held was refused by the database after its images had started.
        if outcome is None or self._stopping or job.id not in self._live:
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
        if update.closes:  # finished now, though its last events are still being written
            self._unfinished_per_owner[job.owner] -= 1

        # Updates are published in the order they were recorded: once one recorded after an
        # image finished is out, so is that image's event.
        after_a_finished_image = job.completed > 0

        def publish() -> None:
            for event in update.events:
                job.events.append(event)
            if after_a_finished_image:
                job.first_image.published()
            if update.closes:
                job.events.close()
                self._live.pop(job.id, None)

        self._journal.write(update.changes, publish)

    def _hold(self, job: Job) -> None:
        self._live[job.id] = job
        self._unfinished_per_owner[job.owner] += 1

    # Persistence -------------------------------------------------------------------------

    async def _find_idempotent(self, owner: str, key: str) -> Job | None:
        # A job whose insert is on its way is found before it is stored.
        return self._pending_keys.get((owner, key)) or await super()._find_idempotent(owner, key)

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
