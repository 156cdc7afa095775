"""Image-generation jobs: fan-out over a thread pool, state, metrics and the event log.

Each image is one provider call on a worker thread. A worker reports each state change back
to the event loop with `call_soon_threadsafe`; the loop thread alone mutates jobs and appends
events, so no lock is needed and no one polls: every subscriber is woken by the append.
"""

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

from app.models.generation import DoneEvent, ErrorEvent, ImageResult, ProgressEvent
from app.providers.base import ImageProvider, ImageRequest, ProviderError
from app.services.event_log import EventLog, JobEvent
from app.services.image_store import ImageStore, image_key

logger = logging.getLogger("myflix.jobs")

FINISHED_IMAGE_STATUSES = frozenset({"succeeded", "failed"})


class JobNotFoundError(Exception):
    """No such job for this user (another user's job is not found either)."""


class TooManyImagesError(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"num_images must be between 1 and {limit}")


@dataclass
class ImageState:
    index: int
    status: str = "queued"
    url: str | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def latency_ms(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return _ms(self.finished_at - self.started_at)

    def result(self) -> ImageResult:
        return ImageResult(
            index=self.index,
            status=self.status,
            url=self.url,
            error=self.error,
            latency_ms=self.latency_ms,
        )


@dataclass
class Job:
    id: str
    owner: str
    prompt: str
    num_images: int
    seed: int | None
    image_base_url: str
    created_at: datetime
    accepted_at: float  # time.monotonic()
    images: list[ImageState]
    events: EventLog = field(default_factory=EventLog)
    requests: list[ImageRequest] = field(default_factory=list, repr=False)
    first_success_at: float | None = None
    finished_at: float | None = None

    @property
    def completed(self) -> int:
        return sum(image.status in FINISHED_IMAGE_STATUSES for image in self.images)

    @property
    def status(self) -> str:
        if self.finished_at is None:
            return "running" if any(i.status != "queued" for i in self.images) else "queued"
        succeeded = sum(image.status == "succeeded" for image in self.images)
        if succeeded == self.num_images:
            return "succeeded"
        return "partial" if succeeded else "failed"

    @property
    def ttfi_ms(self) -> float | None:
        return None if self.first_success_at is None else _ms(self.first_success_at - self.accepted_at)

    @property
    def total_ms(self) -> float | None:
        return None if self.finished_at is None else _ms(self.finished_at - self.accepted_at)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def new_job_id() -> str:
    return f"job_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class _ImageChange:
    status: str
    at: float
    url: str | None = None
    error: str | None = None


class GenerationService:
    def __init__(
        self,
        provider: ImageProvider,
        image_store: ImageStore,
        max_workers: int,
        max_images_per_job: int,
    ) -> None:
        self._provider = provider
        self._max_images_per_job = max_images_per_job
        self._image_store = image_store
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="image")
        self._jobs: dict[str, Job] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def provider(self) -> ImageProvider:
        return self._provider

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def shutdown(self) -> None:
        # Unfinished images would only hold the pool open; stop waiting for them.
        for job in self._jobs.values():
            if job.finished_at is None:
                for request in job.requests:
                    request.canceled.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._provider.close()

    def create_job(
        self, owner: str, prompt: str, num_images: int, seed: int | None, image_base_url: str
    ) -> Job:
        if not 1 <= num_images <= self._max_images_per_job:
            raise TooManyImagesError(self._max_images_per_job)
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
        )
        self._jobs[job.id] = job
        logger.info(
            "job accepted",
            extra={"job_id": job.id, "owner": owner, "num_images": num_images,
                   "provider": self._provider.name},
        )
        for image in job.images:
            self._apply(job, image.index, _ImageChange("queued", job.accepted_at))
            job.requests.append(
                ImageRequest(
                    job_id=job.id,
                    index=image.index,
                    prompt=prompt,
                    seed=None if seed is None else seed + image.index,
                )
            )
        try:
            for request in job.requests:
                self._executor.submit(self._run_image, job, request)
        except RuntimeError as exc:  # the pool is shutting down
            self._fail_job(job, f"The service is shutting down: {exc}")
        return job

    def get_job(self, job_id: str, owner: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            raise JobNotFoundError(job_id)
        return job

    def follow(self, job: Job, after_id: int, keepalive_seconds: float) -> AsyncIterator[JobEvent | None]:
        """The job's events after `after_id`, live until the job ends; None means keepalive."""
        return job.events.follow(after_id, keepalive_seconds)

    # Worker threads -------------------------------------------------------------------

    def _run_image(self, job: Job, request: ImageRequest) -> None:
        self._report(job, request.index, _ImageChange("running", time.monotonic()))
        try:
            generated = self._provider.generate(request)
            if generated.content is not None:
                key = image_key(f"{job.id}-{request.index}", generated.content_type or "")
                self._image_store.save(key, generated.content)
                url = f"{job.image_base_url}/api/images/{key}"
            elif generated.url:
                url = generated.url
            else:
                raise ProviderError("The provider returned no image.")
            change = _ImageChange("succeeded", time.monotonic(), url=url)
        except ProviderError as exc:
            change = _ImageChange("failed", time.monotonic(), error=str(exc))
        except Exception as exc:  # a bug or an unexpected library error: fail the image, not the pool
            logger.exception("image crashed", extra={"job_id": job.id, "index": request.index})
            change = _ImageChange("failed", time.monotonic(), error=f"Internal error: {type(exc).__name__}")
        self._report(job, request.index, change)

    def _report(self, job: Job, index: int, change: _ImageChange) -> None:
        assert self._loop is not None, "GenerationService.start() was not awaited"
        self._loop.call_soon_threadsafe(self._apply, job, index, change)

    # Event-loop thread only --------------------------------------------------------------

    def _apply(self, job: Job, index: int, change: _ImageChange) -> None:
        image = job.images[index]
        if image.status in FINISHED_IMAGE_STATUSES:
            return
        image.status = change.status
        if change.status == "running":
            image.started_at = change.at
        elif change.status in FINISHED_IMAGE_STATUSES:
            image.finished_at = change.at
            image.url, image.error = change.url, change.error
            if change.status == "succeeded" and job.first_success_at is None:
                job.first_success_at = change.at
        logger.info(
            "image %s", change.status,
            extra={"job_id": job.id, "index": index, "status": change.status, "error": change.error},
        )
        job.events.append(
            "progress",
            ProgressEvent(
                job_id=job.id,
                index=index,
                status=change.status,
                url=change.url,
                error=change.error,
                elapsed_ms=_ms(change.at - job.accepted_at),
                completed=job.completed,
                total=job.num_images,
            ).model_dump_json(exclude_none=True),
        )
        if job.completed == job.num_images:
            self._finish_job(job, change.at)

    def _finish_job(self, job: Job, at: float) -> None:
        # Workers stamp their own times, so the last change applied need not be the latest.
        job.finished_at = max(at, *(image.finished_at or at for image in job.images))
        done = DoneEvent(
            job_id=job.id,
            status=job.status,
            images=[image.result() for image in job.images],
            ttfi_ms=job.ttfi_ms,
            total_ms=job.total_ms,
        )
        logger.info(
            "job %s", job.status,
            extra={"job_id": job.id, "status": job.status, "ttfi_ms": job.ttfi_ms, "total_ms": job.total_ms},
        )
        job.events.append("done", done.model_dump_json())
        job.events.close()

    def _fail_job(self, job: Job, message: str) -> None:
        job.finished_at = time.monotonic()
        logger.error("job failed: %s", message, extra={"job_id": job.id})
        job.events.append("error", ErrorEvent(job_id=job.id, message=message).model_dump_json())
        job.events.close()
