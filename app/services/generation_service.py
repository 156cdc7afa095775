"""Image-generation jobs: scheduling, state, metrics, durability and the event log.

Each image is one provider call on a worker thread, taken from a round-robin queue across
jobs. Workers report back to the event loop with `call_soon_threadsafe`; only the loop
thread changes a job. Every state change is written through the journal and published to
subscribers right after its commit, so an event a client has seen survives any crash, and
its id means the same thing after a restart.
"""

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

from app.core.metrics import Metrics
from app.core.security import ImageUrlSigner
from app.db.repository import Changes, Repository, StoredJob, as_utc
from app.models.generation import (
    DoneEvent,
    ErrorEvent,
    ImageResult,
    JobPage,
    JobSnapshot,
    ProgressEvent,
)
from app.providers.base import ImageProvider, ImageRequest, ImageStopped, ProviderError
from app.services.errors import InvalidFieldError
from app.services.event_log import EventLog, JobEvent
from app.services.image_fetch import ImageFetcher, ImageFetchError, require_image
from app.services.image_store import ImageStore, image_key
from app.services.journal import ConflictingWriteError, Journal
from app.services.scheduler import FairScheduler

logger = logging.getLogger("myflix.jobs")

FINISHED_IMAGE_STATUSES = frozenset({"succeeded", "failed", "canceled"})
FINISHED_JOB_STATUSES = frozenset({"succeeded", "partial", "failed", "canceled"})
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
    def __init__(self) -> None:
        super().__init__("The service is shutting down; retry in a moment.")


class InvalidCursorError(InvalidFieldError):
    location = ("query", "cursor")

    def __init__(self) -> None:
        super().__init__("cursor is not one this service issued")


@dataclass
class ImageState:
    index: int
    status: str = "queued"
    image_key: str | None = None
    error: str | None = None
    latency_ms: float | None = None
    prediction_id: str | None = None
    started_at: float | None = None  # time.monotonic(), this process only
    request: ImageRequest | None = field(default=None, repr=False)
    deadline: asyncio.TimerHandle | None = field(default=None, repr=False)


@dataclass
class Job:
    id: str
    owner: str
    prompt: str
    num_images: int
    seed: int | None
    image_base_url: str
    created_at: datetime
    accepted_at: float  # time.monotonic(); for a job from before a restart, reconstructed
    images: list[ImageState]
    status: str = "queued"
    cancel_requested: bool = False
    ttfi_ms: float | None = None
    total_ms: float | None = None
    idempotency_key: str | None = None
    request_fingerprint: str | None = None
    finished_at: datetime | None = None
    events: EventLog = field(default_factory=EventLog, repr=False)
    last_event_id: int = 0

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_JOB_STATUSES

    @property
    def completed(self) -> int:
        return sum(image.status in FINISHED_IMAGE_STATUSES for image in self.images)

    def elapsed_ms(self, at: float) -> float:
        return _ms(at - self.accepted_at)

    def outcome(self) -> str:
        if self.cancel_requested:
            return "canceled"
        succeeded = sum(image.status == "succeeded" for image in self.images)
        if succeeded == self.num_images:
            return "succeeded"
        return "partial" if succeeded else "failed"


@dataclass
class _ImageTask:
    job: Job
    image: ImageState


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _ttfi_from_events(events: EventLog) -> float | None:
    """TTFI as the events recorded it: stored only when a job ends, so a job resumed after a
    restart takes it from its first `succeeded` event."""
    succeeded = (
        data["elapsed_ms"] for data in (json.loads(e.data) for e in events.all() if e.name == "progress")
        if data["status"] == "succeeded"
    )
    return min(succeeded, default=None)


def _event_rows(job: Job, events: list[JobEvent]) -> list[dict]:
    return [{"job_id": job.id, "id": e.id, "name": e.name, "data": e.data} for e in events]


def new_job_id() -> str:
    return f"job_{secrets.token_hex(12)}"


def request_fingerprint(prompt: str, num_images: int, seed: int | None) -> str:
    canonical = json.dumps({"prompt": prompt, "num_images": num_images, "seed": seed}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([as_utc(created_at).isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created_at), str(job_id)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidCursorError() from None


class GenerationService:
    def __init__(
        self,
        provider: ImageProvider,
        image_store: ImageStore,
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
        self._provider = provider
        self._image_store = image_store
        self._repository = repository
        self._journal = journal
        self._url_signer = url_signer
        self._max_images_per_job = max_images_per_job
        self._max_active_jobs_per_user = max_active_jobs_per_user
        self._image_timeout_seconds = image_timeout_seconds
        self._shutdown_grace_seconds = shutdown_grace_seconds
        self._workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="image")
        self._scheduler: FairScheduler[_ImageTask] = FairScheduler(
            max_workers, self._start_image, defer=lambda dispatch: self._loop.call_soon(dispatch)
        )
        self._fetcher = ImageFetcher()
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
            job = self._job_from_rows(stored)
            events = await self._stored_events(job.id)
            job.events = EventLog.replay(events, closed=False)
            job.last_event_id = events[-1].id if events else 0
            job.ttfi_ms = _ttfi_from_events(job.events)
            self._live[job.id] = job
            try:
                self._resume(job)
            except Exception:
                logger.exception("could not resume job", extra={"job_id": job.id})
                self._fail_job(job, "The job could not be resumed after a restart.")

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
        self._fetcher.close()
        self._provider.close()

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
        if not 1 <= num_images <= self._max_images_per_job:
            raise TooManyImagesError(self._max_images_per_job)
        fingerprint = request_fingerprint(prompt, num_images, seed)
        if idempotency_key is not None:
            earlier = await self._find_idempotent(owner, idempotency_key)
            if earlier is not None:
                if earlier.request_fingerprint != fingerprint:
                    raise IdempotencyConflictError()
                return earlier, True
        active = sum(job.owner == owner and not job.finished for job in self._live.values())
        if active >= self._max_active_jobs_per_user:
            raise TooManyActiveJobsError(self._max_active_jobs_per_user, ACTIVE_JOBS_RETRY_AFTER_SECONDS)

        job = Job(
            id=new_job_id(),
            owner=owner,
            prompt=prompt,
            num_images=num_images,
            seed=seed,
            image_base_url=image_base_url.rstrip("/"),
            created_at=datetime.now(timezone.utc),
            accepted_at=time.monotonic(),
            images=[ImageState(index) for index in range(num_images)],
            idempotency_key=idempotency_key,
            request_fingerprint=fingerprint,
        )
        self._live[job.id] = job
        if idempotency_key is not None:
            self._pending_keys[(owner, idempotency_key)] = job
        positions = self._scheduler.positions_for_new_job(num_images)
        queued = [
            self._event(job, "progress", self._progress(job, image, job.accepted_at, queue_position=place))
            for image, place in zip(job.images, positions)
        ]
        changes = Changes(
            jobs=[self._job_row(job)],
            images=[self._image_state(job, image) for image in job.images],
            events=_event_rows(job, queued),
        )

        def publish() -> None:
            for event in queued:
                job.events.append(event)
            self._scheduler.push(job.id, [_ImageTask(job, image) for image in job.images])

        logger.info(
            "job accepted",
            extra={"job_id": job.id, "owner": owner, "num_images": num_images, "provider": self._provider.name},
        )
        try:
            await self._journal.write(changes, publish)
        except ConflictingWriteError:
            # Another process stored this Idempotency-Key first.
            del self._live[job.id]
            earlier = await self._find_idempotent(owner, idempotency_key) if idempotency_key else None
            if earlier is None:
                raise
            if earlier.request_fingerprint != fingerprint:
                raise IdempotencyConflictError() from None
            return earlier, True
        finally:
            if idempotency_key is not None:
                self._pending_keys.pop((owner, idempotency_key), None)
        return job, False

    async def cancel_job(self, job_id: str, owner: str) -> Job:
        job = await self.get_job(job_id, owner)
        if job.finished or job.cancel_requested:
            raise JobAlreadyFinishedError(job.status)
        job.cancel_requested = True
        self._journal.write(Changes(job_states=[self._job_state(job)]))
        self._scheduler.remove_job(job.id)
        now = time.monotonic()
        for image in job.images:
            if image.status not in FINISHED_IMAGE_STATUSES:
                if image.request is not None:
                    image.request.stop.cancel()
                self._change(job, image, "canceled", now)
        logger.info("job cancel requested", extra={"job_id": job.id})
        return job

    # Queries -----------------------------------------------------------------------------

    async def get_job(self, job_id: str, owner: str) -> Job:
        job = self._live.get(job_id)
        if job is None:
            stored = await self._repository.get_job(job_id)
            job = None if stored is None else self._job_from_rows(stored)
        if job is None or job.owner != owner:
            raise JobNotFoundError(job_id)
        return job

    async def list_jobs(self, owner: str, limit: int, cursor: str | None, image_base_url: str) -> JobPage:
        before = decode_cursor(cursor) if cursor else None
        stored = await self._repository.list_jobs(owner, limit + 1, before)
        page = [self._live.get(s.job.id) or self._job_from_rows(s) for s in stored[:limit]]
        next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(stored) > limit else None
        return JobPage(jobs=[self.snapshot(job, image_base_url) for job in page], next_cursor=next_cursor)

    def snapshot(self, job: Job, image_base_url: str) -> JobSnapshot:
        """The job now, with image links freshly signed for `image_base_url`."""
        return JobSnapshot(
            job_id=job.id,
            status=job.status,
            prompt=job.prompt,
            num_images=job.num_images,
            seed=job.seed,
            created_at=job.created_at.isoformat(),
            images=[self._result(job, image, image_base_url.rstrip("/")) for image in job.images],
            ttfi_ms=job.ttfi_ms,
            total_ms=job.total_ms,
        )

    async def follow(self, job: Job, after_id: int, keepalive_seconds: float) -> AsyncIterator[JobEvent | None]:
        """The job's events after `after_id`, live until the job ends; None means keepalive."""
        if job.id not in self._live:
            # Finished (possibly before a restart): replay what was stored.
            job.events = EventLog.replay(await self._stored_events(job.id))
        self._metrics.open_streams.inc()
        try:
            async for event in job.events.follow(after_id, keepalive_seconds):
                yield event
        finally:
            self._metrics.open_streams.dec()

    @property
    def healthy(self) -> bool:
        return self._journal.healthy

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
            self._change(job, image, "running", image.started_at)

    def _run_image(self, job: Job, image: ImageState, request: ImageRequest) -> None:
        outcome: tuple | None
        try:
            generated = self._provider.generate(request)
            if generated.content is not None:
                content, media_type = generated.content, require_image(generated.content)
            elif generated.url:
                content, media_type = self._fetcher.fetch(generated.url)
            else:
                raise ProviderError("The provider returned no image.")
            key = image_key(f"{job.id}-{image.index}", media_type)
            self._image_store.save(key, content)
            outcome = ("succeeded", time.monotonic(), key, None)
        except ImageStopped:
            outcome = None  # canceled (already recorded) or interrupted (resumed at next start)
        except (ProviderError, ImageFetchError) as exc:
            outcome = ("failed", time.monotonic(), None, str(exc))
        except Exception as exc:  # a bug or an unexpected library error: fail the image, not the pool
            logger.exception("image crashed", extra={"job_id": job.id, "index": image.index})
            outcome = ("failed", time.monotonic(), None, f"Internal error: {type(exc).__name__}")
        self._report(self._finish_image, job, image, request, outcome)

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
        message = f"The provider did not finish the image within {self._image_timeout_seconds:g} s."
        self._change(job, image, "failed", time.monotonic(), error=message)

    def _finish_image(self, job: Job, image: ImageState, request: ImageRequest, outcome: tuple | None) -> None:
        if image.request is request:
            image.request = None
            if image.deadline is not None:
                image.deadline.cancel()
        self._scheduler.release()
        if self._scheduler.busy == 0:
            self._idle.set()
        if outcome is None or self._stopping:
            return
        status, at, key, error = outcome
        self._change(job, image, status, at, key=key, error=error)

    def _record_prediction(self, job: Job, image: ImageState, prediction_id: str) -> None:
        image.prediction_id = prediction_id
        self._journal.write(Changes(image_states=[self._image_state(job, image)]))

    def _retrying(self, job: Job, image: ImageState, attempt: int, delay: float, reason: str) -> None:
        if image.status in FINISHED_IMAGE_STATUSES:
            return
        self._metrics.provider_retries.labels(self._provider.name).inc()
        logger.info(
            "image retrying", extra={"job_id": job.id, "index": image.index, "attempt": attempt, "reason": reason}
        )
        event = self._event(
            job, "progress",
            self._progress(job, image, time.monotonic(), status="retrying", error=reason,
                           attempt=attempt, delay_ms=_ms(delay)),
        )
        self._persist_and_publish(job, [event], Changes())

    def _change(
        self, job: Job, image: ImageState, status: str, at: float,
        key: str | None = None, error: str | None = None,
    ) -> None:
        if image.status in FINISHED_IMAGE_STATUSES:
            return  # e.g. a result that arrives after the image was canceled
        image.status = status
        job.status = "running" if job.status == "queued" else job.status
        if status in FINISHED_IMAGE_STATUSES:
            image.image_key, image.error = key, error
            if image.started_at is not None:
                image.latency_ms = _ms(at - image.started_at)
            self._count_image(image)
            if status == "succeeded":
                # Workers stamp their own times, so the first applied need not be the first.
                elapsed = job.elapsed_ms(at)
                job.ttfi_ms = elapsed if job.ttfi_ms is None else min(job.ttfi_ms, elapsed)
        logger.info(
            "image %s", status,
            extra={"job_id": job.id, "index": image.index, "status": status, "error": error},
        )
        event = self._event(job, "progress", self._progress(job, image, at))
        changes = Changes(image_states=[self._image_state(job, image)])
        if job.completed == job.num_images:
            self._finish_job(job, at, [event], changes)
        else:
            self._persist_and_publish(job, [event], changes)

    def _finish_job(self, job: Job, at: float, events: list[JobEvent], changes: Changes) -> None:
        job.status = job.outcome()
        job.finished_at = datetime.now(timezone.utc)
        job.total_ms = max(job.elapsed_ms(at), job.ttfi_ms or 0.0)
        done = self._event(
            job, "done",
            DoneEvent(
                job_id=job.id,
                status=job.status,
                images=[self._result(job, image, job.image_base_url) for image in job.images],
                ttfi_ms=job.ttfi_ms,
                total_ms=job.total_ms,
            ).model_dump_json(),
        )
        self._count_job(job)
        changes.job_states.append(self._job_state(job))
        logger.info(
            "job %s", job.status,
            extra={"job_id": job.id, "status": job.status, "ttfi_ms": job.ttfi_ms, "total_ms": job.total_ms},
        )
        self._persist_and_publish(job, [*events, done], changes, closes=True)

    def _fail_job(self, job: Job, message: str) -> None:
        job.status = "failed"
        job.finished_at = datetime.now(timezone.utc)
        logger.error("job failed: %s", message, extra={"job_id": job.id})
        error = self._event(job, "error", ErrorEvent(job_id=job.id, message=message).model_dump_json())
        self._persist_and_publish(job, [error], Changes(job_states=[self._job_state(job)]), closes=True)

    def _persist_and_publish(self, job: Job, events: list[JobEvent], changes: Changes, closes: bool = False) -> None:
        changes.events += _event_rows(job, events)

        def publish() -> None:
            for event in events:
                job.events.append(event)
            if closes:
                job.events.close()
                self._live.pop(job.id, None)

        self._journal.write(changes, publish)

    def _count_image(self, image: ImageState) -> None:
        provider = self._provider.name
        self._metrics.images.labels(provider, image.status).inc()
        if image.status == "failed":
            self._metrics.provider_errors.labels(provider).inc()
        if image.latency_ms is not None:
            self._metrics.image_latency.labels(provider, image.status).observe(image.latency_ms / 1000)

    def _count_job(self, job: Job) -> None:
        provider = self._provider.name
        self._metrics.jobs.labels(provider, job.status).inc()
        if job.ttfi_ms is not None:
            self._metrics.ttfi.labels(provider, job.status).observe(job.ttfi_ms / 1000)
        if job.total_ms is not None:
            self._metrics.batch.labels(provider, job.status).observe(job.total_ms / 1000)

    def _event(self, job: Job, name: str, data: str) -> JobEvent:
        job.last_event_id += 1
        return JobEvent(job.last_event_id, name, data)

    def _progress(self, job: Job, image: ImageState, at: float, **extra: object) -> str:
        """The image's `progress` event now; `extra` adds or overrides fields (e.g. a retry's)."""
        fields = dict(
            job_id=job.id,
            index=image.index,
            status=image.status,
            url=self._image_url(job.image_base_url, image.image_key),
            error=image.error,
            elapsed_ms=job.elapsed_ms(at),
            completed=job.completed,
            total=job.num_images,
        )
        return ProgressEvent(**{**fields, **extra}).model_dump_json(exclude_none=True)

    def _result(self, job: Job, image: ImageState, image_base_url: str) -> ImageResult:
        return ImageResult(
            index=image.index,
            status=image.status,
            url=self._image_url(image_base_url, image.image_key),
            error=image.error,
            latency_ms=image.latency_ms,
            queue_position=self._scheduler.position(job.id, _ImageTask(job, image)) if image.status == "queued" else None,
        )

    def _image_url(self, base_url: str, key: str | None) -> str | None:
        if key is None:
            return None
        return f"{base_url}/api/images/{key}?{self._url_signer.query(key)}"

    # Persistence -------------------------------------------------------------------------

    async def _stored_events(self, job_id: str) -> list[JobEvent]:
        return [JobEvent(row.id, row.name, row.data) for row in await self._repository.events(job_id)]

    async def _find_idempotent(self, owner: str, key: str) -> Job | None:
        pending = self._pending_keys.get((owner, key))
        if pending is not None:
            return pending
        row = await self._repository.find_by_idempotency_key(owner, key)
        if row is None:
            return None
        return self._live.get(row.id) or await self.get_job(row.id, owner)

    def _job_row(self, job: Job) -> dict:
        return {
            "id": job.id,
            "owner_email": job.owner,
            "prompt": job.prompt,
            "num_images": job.num_images,
            "seed": job.seed,
            "provider": self._provider.name,
            "model": self._provider.model,
            "image_base_url": job.image_base_url,
            "created_at": job.created_at,
            "idempotency_key": job.idempotency_key,
            "request_fingerprint": job.request_fingerprint,
            **self._job_state(job),
        }

    @staticmethod
    def _job_state(job: Job) -> dict:
        return {
            "id": job.id,
            "status": job.status if job.finished else "queued",  # unfinished is all a restart needs
            "cancel_requested": job.cancel_requested,
            "finished_at": job.finished_at,
            "ttfi_ms": job.ttfi_ms if job.finished else None,
            "total_ms": job.total_ms,
        }

    @staticmethod
    def _image_state(job: Job, image: ImageState) -> dict:
        return {
            "job_id": job.id,
            "index": image.index,
            "status": image.status,
            "image_key": image.image_key,
            "error": image.error,
            "latency_ms": image.latency_ms,
            "prediction_id": image.prediction_id,
        }

    @staticmethod
    def _job_from_rows(stored: StoredJob) -> Job:
        row = stored.job
        created_at = as_utc(row.created_at)
        age = (datetime.now(timezone.utc) - created_at).total_seconds()
        return Job(
            id=row.id,
            owner=row.owner_email,
            prompt=row.prompt,
            num_images=row.num_images,
            seed=row.seed,
            image_base_url=row.image_base_url,
            created_at=created_at,
            # The monotonic clock restarts with the process; carry the job's age across.
            accepted_at=time.monotonic() - age,
            images=[
                ImageState(
                    index=image.index,
                    status=image.status,
                    image_key=image.image_key,
                    error=image.error,
                    latency_ms=image.latency_ms,
                    prediction_id=image.prediction_id,
                )
                for image in stored.images
            ],
            status=row.status,
            cancel_requested=row.cancel_requested,
            ttfi_ms=row.ttfi_ms,
            total_ms=row.total_ms,
            finished_at=as_utc(row.finished_at) if row.finished_at else None,
            idempotency_key=row.idempotency_key,
            request_fingerprint=row.request_fingerprint,
        )

    def _resume(self, job: Job) -> None:
        if any(image.status != "queued" for image in job.images):
            job.status = "running"
        logger.info("job resumed after restart", extra={"job_id": job.id})
        unfinished = [image for image in job.images if image.status not in FINISHED_IMAGE_STATUSES]
        if job.cancel_requested:
            now = time.monotonic()
            for image in unfinished:
                self._change(job, image, "canceled", now)
            return
        if not unfinished:  # every image finished but the process stopped before `done`
            self._finish_job(job, time.monotonic(), [], Changes())
            return
        running = [_ImageTask(job, image) for image in unfinished if image.status == "running"]
        queued = [_ImageTask(job, image) for image in unfinished if image.status == "queued"]
        # Work that had started goes first: it may only need re-attaching.
        self._scheduler.push(job.id, running, front=True)
        self._scheduler.push(job.id, queued)
