"""What both ways of running jobs share — in one process (GenerationService) and across
processes (ScaledGenerationService): the domain errors, the rules a new job must pass, and
the operations whose logic does not depend on where jobs run."""

import logging
from collections.abc import AsyncIterator

from app.core.metrics import Metrics
from app.db.repository import ConflictingWriteError, Repository
from app.models.generation import JobPage, JobSnapshot
from app.services.errors import InvalidFieldError
from app.services.event_log import EventLog, JobEvent
from app.services.job_state import Job, JobRecorder, decode_cursor, encode_cursor, job_from_rows, new_job, stored_events

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


class JobService:
    """Subclasses say how a new job is admitted (`_admit`), how an unfinished job's events are
    followed (`_follow_live`), and in what form stored events are sent (`_as_sent`)."""

    def __init__(
        self,
        repository: Repository,
        recorder: JobRecorder,
        metrics: Metrics,
        max_images_per_job: int,
        max_active_jobs_per_user: int,
    ) -> None:
        self._repository = repository
        self._recorder = recorder
        self._metrics = metrics
        self._max_images_per_job = max_images_per_job
        self._max_active_jobs_per_user = max_active_jobs_per_user
        self._live: dict[str, Job] = {}  # the unfinished jobs this process holds in memory
        self._accepting = True

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
        try:
            await self._admit(job)
        except ConflictingWriteError:
            # Another request stored this Idempotency-Key first.
            earlier = await self._find_idempotent(owner, idempotency_key) if idempotency_key else None
            if earlier is None:
                raise
            return check_replay(earlier, job), True
        return job, False

    async def _admit(self, job: Job) -> None:
        """Check the owner's limits, store the job and start it."""
        raise NotImplementedError

    async def get_job(self, job_id: str, owner: str) -> Job:
        job = self._live.get(job_id)
        if job is None:
            stored = await self._repository.get_job(job_id)
            job = None if stored is None else job_from_rows(stored)
        if job is None or job.owner != owner:
            raise JobNotFoundError(job_id)
        return job

    async def list_jobs(self, owner: str, limit: int, cursor: str | None, image_base_url: str) -> JobPage:
        before = decode_cursor(cursor) if cursor else None
        stored = await self._repository.list_jobs(owner, limit + 1, before)
        page = [self._live.get(s.job.id) or job_from_rows(s) for s in stored[:limit]]
        next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(stored) > limit else None
        return JobPage(jobs=[self.snapshot(job, image_base_url) for job in page], next_cursor=next_cursor)

    def snapshot(self, job: Job, image_base_url: str) -> JobSnapshot:
        return self._recorder.snapshot(job, image_base_url)

    async def follow(self, job: Job, after_id: int, keepalive_seconds: float) -> AsyncIterator[list[JobEvent] | None]:
        """The job's events after `after_id`, live until the job ends, in batches of all that
        have come; None means keepalive."""
        if job.finished and job.id not in self._live:
            # Possibly before a restart: replay what was stored.
            stored = self._as_sent(await stored_events(self._repository, job.id))
            events = EventLog.replay(stored).follow(after_id, keepalive_seconds)
        else:
            events = self._follow_live(job, after_id, keepalive_seconds)
        self._metrics.open_streams.inc()
        try:
            async for batch in events:
                yield batch
        finally:
            self._metrics.open_streams.dec()

    def _follow_live(self, job: Job, after_id: int, keepalive_seconds: float) -> AsyncIterator[list[JobEvent] | None]:
        raise NotImplementedError

    def _as_sent(self, events: list[JobEvent]) -> list[JobEvent]:
        return events

    async def _find_idempotent(self, owner: str, key: str) -> Job | None:
        row = await self._repository.find_by_idempotency_key(owner, key)
        return None if row is None else await self.get_job(row.id, owner)


# Rules -------------------------------------------------------------------------------------


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


def check_cancelable(job: Job) -> None:
    if job.finished or job.cancel_requested:
        raise JobAlreadyFinishedError(job.status)


def timeout_message(seconds: float) -> str:
    return f"The provider did not finish the image within {seconds:g} s."
