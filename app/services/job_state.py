"""A job's state and its transitions, free of where it is stored, scheduled or sent.

`JobRecorder` changes a `Job` and answers with an `Update`: the rows to write and the events
to publish, in that order. The single-process service applies updates through its journal
and in-memory event logs; the scaled-out service applies them in a PostgreSQL transaction
and publishes them to Redis. Both make the same events from the same transitions.
"""

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from app.core.metrics import Metrics
from app.core.security import ImageUrlSigner
from app.db.repository import Changes, Repository, StoredJob, as_utc
from app.models.generation import DoneEvent, ErrorEvent, ImageResult, JobSnapshot, ProgressEvent
from app.providers.base import ImageRequest
from app.services.errors import InvalidFieldError
from app.services.event_log import EventLog, JobEvent
from app.services.image_maker import FirstImage

logger = logging.getLogger("myflix.jobs")

FINISHED_IMAGE_STATUSES = frozenset({"succeeded", "failed", "canceled"})
FINISHED_JOB_STATUSES = frozenset({"succeeded", "partial", "failed", "canceled"})


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

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_IMAGE_STATUSES


@dataclass
class Job:
    id: str
    owner: str
    prompt: str
    num_images: int
    seed: int | None
    image_base_url: str
    created_at: datetime
    accepted_at: float  # time.monotonic(); for a job from storage, reconstructed from its age
    images: list[ImageState]
    status: str = "queued"
    cancel_requested: bool = False
    ttfi_ms: float | None = None
    total_ms: float | None = None
    idempotency_key: str | None = None
    request_fingerprint: str | None = None
    finished_at: datetime | None = None
    events: EventLog = field(default_factory=EventLog, repr=False)
    first_image: FirstImage = field(default_factory=FirstImage, repr=False)
    last_event_id: int = 0
    # Finished images, counted as they finish: every event carries it.
    completed: int = field(init=False)

    def __post_init__(self) -> None:
        self.completed = sum(image.finished for image in self.images)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_JOB_STATUSES

    def elapsed_ms(self, at: float) -> float:
        return ms(at - self.accepted_at)

    def outcome(self) -> str:
        if self.cancel_requested:
            return "canceled"
        succeeded = sum(image.status == "succeeded" for image in self.images)
        if succeeded == self.num_images:
            return "succeeded"
        return "partial" if succeeded else "failed"

    def unfinished_images(self) -> list[ImageState]:
        return [image for image in self.images if not image.finished]


@dataclass
class Update:
    """What a transition stores (`changes`) and then sends (`events`); `closes`: the job ended."""

    events: list[JobEvent] = field(default_factory=list)
    changes: Changes = field(default_factory=Changes)
    closes: bool = False

    def add(self, other: "Update | None") -> "Update":
        if other is not None:
            self.events += other.events
            for kind in ("jobs", "images", "events", "image_states", "job_states"):
                getattr(self.changes, kind).extend(getattr(other.changes, kind))
            self.closes = self.closes or other.closes
        return self


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


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


def new_job(
    owner: str, prompt: str, num_images: int, seed: int | None, image_base_url: str, idempotency_key: str | None
) -> Job:
    return Job(
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
        request_fingerprint=request_fingerprint(prompt, num_images, seed),
    )


async def stored_events(repository: Repository, job_id: str, after_id: int = 0) -> list[JobEvent]:
    return [JobEvent(row.id, row.name, row.data) for row in await repository.events(job_id, after_id)]


def job_from_rows(stored: StoredJob, events: list[JobEvent] | None = None) -> Job:
    """The job as stored; with its stored events, also where its event ids and TTFI stand."""
    row = stored.job
    created_at = as_utc(row.created_at)
    age = (datetime.now(timezone.utc) - created_at).total_seconds()
    job = Job(
        id=row.id,
        owner=row.owner_email,
        prompt=row.prompt,
        num_images=row.num_images,
        seed=row.seed,
        image_base_url=row.image_base_url,
        created_at=created_at,
        # The monotonic clock is this process's own; carry the job's age across.
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
    if not job.finished and any(image.status != "queued" for image in job.images):
        job.status = "running"  # stored as "queued" until it ends
    if events is not None:
        job.last_event_id = events[-1].id if events else 0
        # TTFI is stored only when a job ends; until then its first `succeeded` event has it.
        job.ttfi_ms = job.ttfi_ms if job.finished else _ttfi_from_events(events)
    return job


def _ttfi_from_events(events: list[JobEvent]) -> float | None:
    succeeded = (
        data["elapsed_ms"] for data in (json.loads(e.data) for e in events if e.name == "progress")
        if data["status"] == "succeeded"
    )
    return min(succeeded, default=None)


class JobRecorder:
    def __init__(
        self,
        provider_name: str,
        provider_model: str,
        url_signer: ImageUrlSigner,
        metrics: Metrics,
        queue_position: Callable[[Job, ImageState], int | None] = lambda job, image: None,
    ) -> None:
        self._provider = provider_name
        self._model = provider_model
        self._url_signer = url_signer
        self._metrics = metrics
        self._queue_position = queue_position

    # Transitions -------------------------------------------------------------------------

    def accepted(self, job: Job, queue_positions: list[int | None]) -> Update:
        events = [
            self._event(job, "progress", self.progress(job, image, job.accepted_at, queue_position=place))
            for image, place in zip(job.images, queue_positions)
        ]
        logger.info(
            "job accepted",
            extra={"job_id": job.id, "owner": job.owner, "num_images": job.num_images, "provider": self._provider},
        )
        return self._update(
            job, events, Changes(jobs=[self.job_row(job)], images=[self.image_state(job, i) for i in job.images])
        )

    def image_changed(
        self, job: Job, image: ImageState, status: str, at: float, key: str | None = None, error: str | None = None
    ) -> Update | None:
        """None when the image had already finished (say, a result after a cancel)."""
        if image.finished:
            return None
        image.status = status
        job.status = "running" if job.status == "queued" else job.status
        if image.finished:
            job.completed += 1
            image.image_key, image.error = key, error
            if image.started_at is not None:
                image.latency_ms = ms(at - image.started_at)
            self._count_image(image)
            if status == "succeeded":
                # Workers stamp their own times, so the first applied need not be the first.
                elapsed = job.elapsed_ms(at)
                job.ttfi_ms = elapsed if job.ttfi_ms is None else min(job.ttfi_ms, elapsed)
        logger.info(
            "image %s", status, extra={"job_id": job.id, "index": image.index, "status": status, "error": error}
        )
        update = self._update(
            job, [self._event(job, "progress", self.progress(job, image, at))],
            Changes(image_states=[self.image_state(job, image)]),
        )
        if job.completed == job.num_images:
            update.add(self.finished(job, at))
        return update

    def retrying(self, job: Job, image: ImageState, attempt: int, delay: float, reason: str) -> Update | None:
        if image.finished:
            return None
        self._metrics.provider_retries.labels(self._provider).inc()
        logger.info("image retrying", extra={"job_id": job.id, "index": image.index, "attempt": attempt, "reason": reason})
        data = self.progress(
            job, image, time.monotonic(), status="retrying", error=reason, attempt=attempt, delay_ms=ms(delay)
        )
        return self._update(job, [self._event(job, "progress", data)], Changes())

    def canceled(self, job: Job, at: float) -> Update:
        """The job's cancel: its unfinished images end as canceled, and with them the job."""
        job.cancel_requested = True
        logger.info("job cancel requested", extra={"job_id": job.id})
        update = Update(changes=Changes(job_states=[self.job_state(job)]))
        for image in job.unfinished_images():
            update.add(self.image_changed(job, image, "canceled", at))
        return update

    def finished(self, job: Job, at: float) -> Update:
        """`done`, once every image has finished."""
        job.status = job.outcome()
        job.finished_at = datetime.now(timezone.utc)
        job.total_ms = max(job.elapsed_ms(at), job.ttfi_ms or 0.0)
        done = DoneEvent(
            job_id=job.id,
            status=job.status,
            images=[self.result(job, image, job.image_base_url) for image in job.images],
            ttfi_ms=job.ttfi_ms,
            total_ms=job.total_ms,
        )
        self._count_job(job)
        logger.info(
            "job %s", job.status,
            extra={"job_id": job.id, "status": job.status, "ttfi_ms": job.ttfi_ms, "total_ms": job.total_ms},
        )
        update = self._update(job, [self._event(job, "done", done.model_dump_json())], Changes(job_states=[self.job_state(job)]))
        update.closes = True
        return update

    def failed(self, job: Job, message: str) -> Update:
        """`error`: the job cannot go on."""
        job.status = "failed"
        job.finished_at = datetime.now(timezone.utc)
        logger.error("job failed: %s", message, extra={"job_id": job.id})
        error = self._event(job, "error", ErrorEvent(job_id=job.id, message=message).model_dump_json())
        update = self._update(job, [error], Changes(job_states=[self.job_state(job)]))
        update.closes = True
        return update

    # Views -------------------------------------------------------------------------------

    def snapshot(self, job: Job, image_base_url: str) -> JobSnapshot:
        """The job now, with image links freshly signed for `image_base_url`."""
        return JobSnapshot(
            job_id=job.id,
            status=job.status,
            prompt=job.prompt,
            num_images=job.num_images,
            seed=job.seed,
            created_at=job.created_at.isoformat(),
            images=[self.result(job, image, image_base_url.rstrip("/")) for image in job.images],
            ttfi_ms=job.ttfi_ms,
            total_ms=job.total_ms,
        )

    def progress(self, job: Job, image: ImageState, at: float, **extra: object) -> str:
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

    def result(self, job: Job, image: ImageState, image_base_url: str) -> ImageResult:
        return ImageResult(
            index=image.index,
            status=image.status,
            url=self._image_url(image_base_url, image.image_key),
            error=image.error,
            latency_ms=image.latency_ms,
            queue_position=self._queue_position(job, image) if image.status == "queued" else None,
        )

    def _image_url(self, base_url: str, key: str | None) -> str | None:
        if key is None:
            return None
        return f"{base_url}/api/images/{key}?{self._url_signer.query(key)}"

    # Rows --------------------------------------------------------------------------------

    def job_row(self, job: Job) -> dict:
        return {
            "id": job.id,
            "owner_email": job.owner,
            "prompt": job.prompt,
            "num_images": job.num_images,
            "seed": job.seed,
            "provider": self._provider,
            "model": self._model,
            "image_base_url": job.image_base_url,
            "created_at": job.created_at,
            "idempotency_key": job.idempotency_key,
            "request_fingerprint": job.request_fingerprint,
            **self.job_state(job),
        }

    @staticmethod
    def job_state(job: Job) -> dict:
        return {
            "id": job.id,
            "status": job.status if job.finished else "queued",  # unfinished is all a restart needs
            "cancel_requested": job.cancel_requested,
            "finished_at": job.finished_at,
            "ttfi_ms": job.ttfi_ms if job.finished else None,
            "total_ms": job.total_ms,
        }

    @staticmethod
    def image_state(job: Job, image: ImageState) -> dict:
        return {
            "job_id": job.id,
            "index": image.index,
            "status": image.status,
            "image_key": image.image_key,
            "error": image.error,
            "latency_ms": image.latency_ms,
            "prediction_id": image.prediction_id,
        }

    # Internals ---------------------------------------------------------------------------

    @staticmethod
    def _event(job: Job, name: str, data: str) -> JobEvent:
        job.last_event_id += 1
        return JobEvent(job.last_event_id, name, data)

    @staticmethod
    def _update(job: Job, events: list[JobEvent], changes: Changes) -> Update:
        changes.events += [{"job_id": job.id, "id": e.id, "name": e.name, "data": e.data} for e in events]
        return Update(events, changes)

    def _count_image(self, image: ImageState) -> None:
        self._metrics.images.labels(self._provider, image.status).inc()
        if image.status == "failed":
            self._metrics.provider_errors.labels(self._provider).inc()
        if image.latency_ms is not None:
            self._metrics.image_latency.labels(self._provider, image.status).observe(image.latency_ms / 1000)

    def _count_job(self, job: Job) -> None:
        self._metrics.jobs.labels(self._provider, job.status).inc()
        if job.ttfi_ms is not None:
            self._metrics.ttfi.labels(self._provider, job.status).observe(job.ttfi_ms / 1000)
        if job.total_ms is not None:
            self._metrics.batch.labels(self._provider, job.status).observe(job.total_ms / 1000)
