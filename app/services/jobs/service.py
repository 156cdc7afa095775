"""The job service: the whole lifecycle of a job — admit, run its images, time out, cancel,
shut down, recover — written once, over a JobStore, an EventBus and a WorkQueue (see
interfaces.py), whether one process does everything or API replicas and workers share the
jobs. Knows nothing of HTTP."""

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from app.core.metrics import Metrics
from app.db.faults import DatabaseUnavailableError, transient_fault
from app.db.repository import ConflictingWriteError
from app.models.generation import JobPage, JobSnapshot
from app.services.errors import InvalidFieldError
from app.services.image_store import ImageStore, ImageStoreError, possible_image_keys
from app.services.jobs import domain
from app.services.jobs.domain import Job, JobEvent
from app.services.jobs.event_log import EventStreamInterrupted
from app.services.jobs.interfaces import (
    ActiveJobLimitError,
    Applied,
    DailyQuotaError,
    EventBus,
    JobStore,
    OwnerLimits,
    QueueUnavailableError,
    WorkQueue,
)
from app.services.jobs.recorder import JobRecorder
from app.services.jobs.rows import usage_day
from app.services.jobs.runner import ImageRunner
from app.services.jobs.views import ImageLinks, decode_cursor, encode_cursor

logger = logging.getLogger("myflix.jobs")
admin_log = logging.getLogger("myflix.admin")

ACTIVE_JOBS_RETRY_AFTER_SECONDS = 5
# A sweep leaves alone jobs younger than this past the write bound: their enqueue may be on
# its way.
SWEEP_GRACE_SECONDS = 5.0
# At shutdown, how long what is still queued for the database may take to be stored.
SHUTDOWN_FLUSH_SECONDS = 3.0
# Retention deletes this many jobs per transaction, so that no lock is held for long.
RETENTION_BATCH_SIZE = 100
NOT_ACCEPTED = "The job was not accepted: the database did not store it in time."
QUEUE_DOWN = "The job queue is unavailable; retry in a moment."


class JobNotFoundError(Exception):
    """No such job for this user (another user's job is not found either)."""


class TooManyImagesError(InvalidFieldError):
    location = ("body", "num_images")

    def __init__(self, limit: int) -> None:
        super().__init__(f"num_images must be between 1 and {limit}")


class TooManyActiveJobsError(Exception):
    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"You already have {limit} jobs in progress; wait for one to finish or cancel one.")
        self.retry_after = retry_after


class DailyQuotaExceededError(Exception):
    def __init__(self, images_left: int, asked: int, resets_at: datetime) -> None:
        left = f"{images_left} image{'' if images_left == 1 else 's'}"
        super().__init__(
            f"Daily image quota reached: you have {left} left today and this job asks for {asked}; "
            f"the quota resets at {resets_at.isoformat().replace('+00:00', 'Z')}."
        )
        self.images_left = images_left
        self.retry_after = max(1, math.ceil((resets_at - datetime.now(UTC)).total_seconds()))


@dataclass(frozen=True)
class Usage:
    """A user's images today; `quota` and `remaining` None: unlimited."""

    images_today: int
    quota: int | None
    remaining: int | None
    resets_at: datetime


def next_reset(now: datetime) -> datetime:
    """The next UTC midnight: when a day's quota starts again."""
    today = now.astimezone(UTC).date()
    return datetime.combine(today + timedelta(days=1), datetime.min.time(), tzinfo=UTC)


class JobAlreadyFinishedError(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(f"The job has already finished ({status}); there is nothing to cancel.")


class IdempotencyConflictError(Exception):
    def __init__(self) -> None:
        super().__init__("This Idempotency-Key was used with a different request body.")


class ServiceUnavailableError(Exception):
    def __init__(self, message: str = "The service is shutting down; retry in a moment.") -> None:
        super().__init__(message)


class JobService:
    def __init__(
        self,
        store: JobStore,
        events: EventBus,
        queue: WorkQueue,
        recorder: JobRecorder,
        metrics: Metrics,
        runner: ImageRunner | None,
        provider: tuple[str, str],
        max_images_per_job: int,
        max_active_jobs_per_user: int,
        write_timeout_seconds: float,
        sweep_interval_seconds: float,
        image_store: ImageStore,
        retention_seconds: float | None,
    ) -> None:
        self._store = store
        self._events = events
        self._queue = queue
        self._metrics = metrics
        self._runner = runner
        self._provider_name, self._provider_model = provider  # (name, model): stored with each job
        self._recorder = recorder
        self._max_images_per_job = max_images_per_job
        self._max_active_jobs_per_user = max_active_jobs_per_user
        self._write_timeout = write_timeout_seconds
        self._sweep_interval = sweep_interval_seconds
        self._image_store = image_store
        self._retention = retention_seconds
        self._accepting = True
        self._background: set[asyncio.Task[None]] = set()
        metrics.watch_workers(lambda: self.images_in_progress, lambda: queue.waiting_count)

    # Lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Pick up what a previous process left unfinished, then take work."""
        self._store.write_health.listen(self._write_health_changed)
        self._queue.on_reset(lambda: self.sweep(grace_seconds=0))
        await self._store.start()
        await self._events.start()
        await self._queue.start()
        if self._runner is not None:
            await self._runner.start()
        self._spawn(self._sweep_periodically())
        if self._retention is not None:
            self._spawn(self._expire_periodically(self._retention))

    async def shutdown(self) -> None:
        """Take no new jobs; let running images finish for the grace period; leave the rest
        recorded for the next start (Replicate predictions stay running there)."""
        if not self._accepting:
            return  # already shut down, or shutting down
        self._accepting = False
        for task in self._background:
            task.cancel()
        if self._runner is not None:
            await self._runner.stop()
        await self._queue.close()
        await self._events.close()
        await self._store.close(SHUTDOWN_FLUSH_SECONDS)

    @property
    def work_queue_failure(self) -> str | None:
        """Why image work cannot be queued or taken now; None while it can."""
        return self._queue.unavailable

    async def queue_depth(self) -> int:
        """Images waiting for a worker, in the whole deployment."""
        return await self._queue.depth()

    @property
    def images_in_progress(self) -> int:
        """Images this process is making now."""
        return 0 if self._runner is None else self._runner.busy

    @property
    def write_failure(self) -> str | None:
        """Why the database takes no writes now; None while it does."""
        return self._store.write_health.failure

    # Commands ------------------------------------------------------------------------------

    async def create_job(
        self,
        owner: str,
        prompt: str,
        num_images: int,
        seed: int | None,
        idempotency_key: str | None = None,
        daily_quota: int | None = None,
    ) -> tuple[Job, bool]:
        """The new job, or with an Idempotency-Key seen before the earlier job; and whether it
        was an earlier one. `daily_quota`: the images the owner may ask for per UTC day (None:
        any number)."""
        if not self._accepting:
            raise ServiceUnavailableError
        if not 1 <= num_images <= self._max_images_per_job:
            raise TooManyImagesError(self._max_images_per_job)
        job = domain.new_job(
            owner, prompt, num_images, seed, self._provider_name, self._provider_model, idempotency_key
        )
        try:
            # Reads count against the bound too: a database that answers nothing is unavailable.
            async with asyncio.timeout(self._write_timeout):
                if idempotency_key is not None:
                    earlier = await self._store.find_idempotent(owner, idempotency_key)
                    if earlier is not None:
                        return _replayed(earlier, job), True
                if self._queue.unavailable:
                    raise ServiceUnavailableError(f"{QUEUE_DOWN} ({self._queue.unavailable})")
        except TimeoutError:
            raise DatabaseUnavailableError(self._store.write_health.failure or "reads are slow") from None
        try:
            await self._admit(job, OwnerLimits(self._max_active_jobs_per_user, daily_quota))
        except ConflictingWriteError:
            # Another request stored this Idempotency-Key first.
            earlier = await self._store.find_idempotent(owner, idempotency_key) if idempotency_key else None
            if earlier is None:
                raise
            return _replayed(earlier, job), True
        return job, False

    async def _admit(self, job: Job, limits: OwnerLimits) -> None:
        update = domain.accepted(job, self._queue.positions_for_new_job(job.num_images))
        stored = asyncio.ensure_future(self._store.create(job, update, limits))
        try:
            async with asyncio.timeout(self._write_timeout):
                await self._queue.push(job, [image.index for image in job.images], asyncio.shield(stored))
                await asyncio.shield(stored)
        except ConflictingWriteError:
            await self._queue.cancel(job)
            raise
        except ActiveJobLimitError:
            await self._queue.cancel(job)
            raise TooManyActiveJobsError(self._max_active_jobs_per_user, ACTIVE_JOBS_RETRY_AFTER_SECONDS) from None
        except DailyQuotaError as exc:
            await self._queue.cancel(job)
            raise DailyQuotaExceededError(exc.images_left, job.num_images, next_reset(job.created_at)) from None
        except (TimeoutError, DatabaseUnavailableError, QueueUnavailableError) as exc:
            self._abandon(job, stored)
            if isinstance(exc, QueueUnavailableError) or (stored.done() and not self._store.write_health.failure):
                raise ServiceUnavailableError(f"{QUEUE_DOWN} ({self._queue.unavailable or exc})") from None
            raise DatabaseUnavailableError(self._store.write_health.failure or "writes are slow") from None
        await self._recorder.publish(job, update)

    def _abandon(self, job: Job, stored: "asyncio.Future[None]") -> None:
        """The job's creator is told it was not accepted: it must never run. One that was stored
        after all (its insert committed as the wait ran out, or it was not queued) is ended with
        a reason; one still being inserted is withdrawn."""
        if stored.done() and not stored.cancelled() and stored.exception() is None:
            stored_after_all: Awaitable[bool] = asyncio.sleep(0, result=True)
        else:
            stored_after_all = self._store.withdraw(job.id)

        async def conclude() -> None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(job)
            if await stored_after_all:
                await self._recorder.record(job.id, lambda j: None if j.finished else domain.failed(j, NOT_ACCEPTED))

        self._spawn(conclude())

    async def cancel_job(self, job_id: str, owner: str) -> Job:
        _check_cancelable(await self.get_job(job_id, owner))

        def cancel(job: Job) -> domain.Update:
            _check_cancelable(job)  # again, as stored: a worker may have just finished it
            return domain.canceled(job, time.monotonic())

        recording = asyncio.ensure_future(self._recorder.record(job_id, cancel))
        try:
            applied = await asyncio.wait_for(asyncio.shield(recording), self._write_timeout)
        except TimeoutError:
            # The cancel stays on its way: once stored, it is sent and its images stopped.
            self._spawn(self._stop_when_recorded(recording))
            raise DatabaseUnavailableError(self._store.write_health.failure or "writes are slow") from None
        if applied is None:
            raise JobNotFoundError(job_id)
        await self._stop_images(applied.job)
        return applied.job

    async def delete_job(self, job_id: str, owner: str) -> None:
        """Cancel the job if it is still running, then remove its images, rows and events."""
        job = await self.get_job(job_id, owner)
        if not job.finished:
            with contextlib.suppress(JobAlreadyFinishedError):  # it finished meanwhile
                job = await self.cancel_job(job_id, owner)
        await self._remove([job], self._write_timeout)

    async def _remove(self, jobs: list[Job], timeout: float | None = None) -> None:
        """The jobs' images, then their rows and events; each step within `timeout` (None:
        as long as it takes)."""
        # The images first: a job left without its images is removed by the next try, an image
        # left without its job would be kept for good.
        keys = [key for job in jobs for key in possible_image_keys(job.id, job.num_images)]
        try:
            async with asyncio.timeout(timeout):
                await self._image_store.delete(keys)
        except TimeoutError:
            raise ImageStoreError("The image store did not answer in time; retry in a moment.") from None
        job_ids = [job.id for job in jobs]
        try:
            async with asyncio.timeout(timeout):
                await self._store.delete(job_ids)
        except TimeoutError:
            raise DatabaseUnavailableError(self._store.write_health.failure or "writes are slow") from None
        await self._events.forget(job_ids)
        logger.info("jobs deleted", extra={"jobs": len(job_ids)})

    async def _stop_when_recorded(self, recording: "asyncio.Future[Applied | None]") -> None:
        applied = await recording
        if applied is not None:
            await self._stop_images(applied.job)

    async def _stop_images(self, job: Job) -> None:
        try:
            await self._queue.cancel(job)
        except QueueUnavailableError:
            pass  # workers find the images canceled when they record them

    # Queries -------------------------------------------------------------------------------

    async def get_job(self, job_id: str, owner: str, any_owner: bool = False) -> Job:
        """The owner's job; `any_owner`: whoever's it is (an admin reads every job)."""
        # Not one of ours (a NUL byte, say, which PostgreSQL would refuse): there is no such job.
        job = await self._store.get(job_id) if domain.is_job_id(job_id) else None
        if job is None or (job.owner != owner and not any_owner):
            raise JobNotFoundError(job_id)
        if job.owner != owner:
            admin_log.info("admin action: read job", extra={"actor": owner, "action": "read job", "target": job_id})
        return job

    async def usage(self, owner: str, daily_quota: int | None) -> Usage:
        now = datetime.now(UTC)
        used = await self._store.images_used(owner, usage_day(now))
        remaining = None if daily_quota is None else max(0, daily_quota - used)
        return Usage(used, daily_quota, remaining, next_reset(now))

    async def list_jobs(self, owner: str, limit: int, cursor: str | None, links: ImageLinks) -> JobPage:
        before = decode_cursor(cursor) if cursor else None
        page = await self._store.page(owner, limit + 1, before)
        more = len(page) > limit
        page = page[:limit]
        next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if more else None
        return JobPage(jobs=[self.snapshot(job, links) for job in page], next_cursor=next_cursor)

    def snapshot(self, job: Job, links: ImageLinks) -> JobSnapshot:
        positions = [
            self._queue.position(job.id, image.index) if image.status == "queued" else None for image in job.images
        ]
        return links.snapshot(job, positions)

    async def follow(self, job: Job, after_id: int, keepalive_seconds: float) -> AsyncIterator[list[JobEvent] | None]:
        """The job's events after `after_id`, live until the job ends, in batches of all that
        have come; None means keepalive. Raises EventStreamInterrupted while events cannot be
        stored (or, from the bus, carried): the client reconnects with Last-Event-ID and resumes
        exactly."""
        if self._store.write_health.failure:
            raise EventStreamInterrupted
        self._metrics.open_streams.inc()
        try:
            async for batch in self._events.follow(job.id, after_id, keepalive_seconds):
                yield batch
        except Exception as exc:
            if transient_fault(exc) is None:
                raise
            raise EventStreamInterrupted from exc  # the stored past cannot be read right now
        finally:
            self._metrics.open_streams.dec()

    async def nothing_to_follow(self, job: Job, after_id: int) -> bool:
        """Whether the job's end is stored and its client has every event already (a
        browser's EventSource reconnects after the last one: it must be told to stop)."""
        if not job.finished or after_id <= 0:
            return False
        stored = await self._store.events(job.id, 0)
        return bool(stored) and stored[-1].terminal and after_id >= stored[-1].id

    # Recovery ------------------------------------------------------------------------------

    async def sweep(self, grace_seconds: float) -> None:
        """Bring every unfinished job to where it can finish: queue the images no queue holds,
        end a canceled job's images, and send `done` for a job whose images have all ended. At
        start and when the queue lost its contents, and every sweep interval (one process at a
        time)."""
        now, young = time.monotonic(), datetime.now(UTC) - timedelta(seconds=grace_seconds)
        for job in await self._store.unfinished():
            if job.created_at > young:
                continue
            try:
                if job.cancel_requested or not job.unfinished_images():
                    await self._recorder.record(job.id, lambda j: domain.concluded(j, now))
                    continue
                queued = await self._queue.push(job, [image.index for image in job.unfinished_images()])
                if queued:
                    logger.info("queued images no queue held", extra={"job_id": job.id, "images": len(queued)})
            except (QueueUnavailableError, DatabaseUnavailableError):
                raise
            except Exception:
                logger.exception("could not resume job", extra={"job_id": job.id})
                await self._recorder.record(job.id, lambda j: domain.failed(j, "The job could not be resumed."))

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                if await self._queue.lock("sweep", self._sweep_interval * 0.9):
                    # A job younger than this may still be on its way into the queue.
                    await self.sweep(self._write_timeout + SWEEP_GRACE_SECONDS)
            except Exception:  # the next sweep tries again
                logger.exception("sweep failed")

    # Retention -----------------------------------------------------------------------------

    async def expire_jobs(self, retention_seconds: float) -> int:
        """Delete the jobs that finished more than `retention_seconds` ago with their images,
        a batch per transaction; how many were deleted."""
        finished_before = datetime.now(UTC) - timedelta(seconds=retention_seconds)
        deleted = 0
        while True:
            batch = await self._store.expired(finished_before, RETENTION_BATCH_SIZE)
            if batch:
                await self._remove(batch)
                deleted += len(batch)
            if len(batch) < RETENTION_BATCH_SIZE:
                return deleted

    async def _expire_periodically(self, retention_seconds: float) -> None:
        interval = retention_interval(retention_seconds)
        while True:
            await asyncio.sleep(interval)
            try:
                if await self._queue.lock("retention", interval * 0.9):
                    await self.expire_jobs(retention_seconds)
            except Exception:  # the next round tries again
                logger.exception("retention failed")

    # Internals -----------------------------------------------------------------------------

    def _write_health_changed(self, failure: str | None) -> None:
        if failure is not None:
            # Nothing new can be stored, so nothing new can be sent: followers come back later.
            self._events.interrupt_all()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def retention_interval(retention_seconds: float) -> float:
    """How often retention runs: a tenth of the retention, between a second and an hour, so a
    job outlives it by that tenth at most."""
    return min(max(retention_seconds / 10, 1.0), 3600.0)


def _replayed(earlier: Job, new: Job) -> Job:
    """The earlier job of this Idempotency-Key, if it was asked for with the same body."""
    if earlier.request_fingerprint != new.request_fingerprint:
        raise IdempotencyConflictError
    return earlier


def _check_cancelable(job: Job) -> None:
    if job.finished or job.cancel_requested:
        raise JobAlreadyFinishedError(job.status)
