"""A job, its images, and the transitions between their states.

A transition changes a `Job` and answers with an `Update`: the events it makes and what of
the job changed, for the store to write and the event bus to publish, in that order. It
knows nothing of where the job is kept, scheduled or sent: no thread, timer, connection or
URL lives here. Events hold image keys; links are signed when an event is sent.
"""

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger("myflix.jobs")

FINISHED_IMAGE_STATUSES = frozenset({"succeeded", "failed", "canceled"})
FINISHED_JOB_STATUSES = frozenset({"succeeded", "partial", "failed", "canceled"})
TERMINAL_EVENTS = frozenset({"done", "error"})


@dataclass(frozen=True)
class JobEvent:
    id: int  # 1, 2, 3 … within the job
    name: str  # the SSE `event`
    data: str  # JSON on one line, as stored: image keys, not links
    # The SSE `id` where it is not the number itself (Redis stream entries: `<id>-0`).
    sse_id: str = ""

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL_EVENTS


@dataclass
class ImageState:
    index: int
    status: str = "queued"
    image_key: str | None = None
    error: str | None = None
    latency_ms: float | None = None
    prediction_id: str | None = None
    started_at: float | None = None  # time.monotonic() of the process that runs it
    # How many times a worker has taken the image. The number is also the taker's lease: a
    # worker whose image was taken over since records nothing more of it (`by_attempt`).
    attempts: int = 0

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
    provider: str
    model: str
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

    def seed_of(self, index: int) -> int | None:
        return None if self.seed is None else self.seed + index


@dataclass
class Update:
    """What a transition made: its events, and which parts of the job it changed."""

    events: list[JobEvent] = field(default_factory=list)
    images: set[int] = field(default_factory=set)  # indexes of images whose state changed
    job_changed: bool = False
    created: bool = False  # the job is new: insert it
    closes: bool = False  # the job ended
    retries: int = 0  # provider calls about to be retried
    # Images that ended without being made (failed, canceled, or left by a failed job): they
    # are given back to their owner's daily quota.
    given_back: int = 0

    def add(self, other: "Update | None") -> "Update":
        if other is not None:
            self.events += other.events
            self.images |= other.images
            self.job_changed = self.job_changed or other.job_changed
            self.created = self.created or other.created
            self.closes = self.closes or other.closes
            self.retries += other.retries
            self.given_back += other.given_back
        return self


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


_JOB_ID = re.compile(r"job_[0-9a-f]{24}", re.ASCII)


def new_job_id() -> str:
    return f"job_{secrets.token_hex(12)}"


def is_job_id(text: str) -> bool:
    return _JOB_ID.fullmatch(text) is not None


def request_fingerprint(prompt: str, num_images: int, seed: int | None) -> str:
    canonical = json.dumps({"prompt": prompt, "num_images": num_images, "seed": seed}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_job(
    owner: str,
    prompt: str,
    num_images: int,
    seed: int | None,
    provider: str,
    model: str,
    idempotency_key: str | None,
) -> Job:
    return Job(
        id=new_job_id(),
        owner=owner,
        prompt=prompt,
        num_images=num_images,
        seed=seed,
        provider=provider,
        model=model,
        created_at=datetime.now(UTC),
        accepted_at=time.monotonic(),
        images=[ImageState(index) for index in range(num_images)],
        idempotency_key=idempotency_key,
        request_fingerprint=request_fingerprint(prompt, num_images, seed),
    )


# Transitions ---------------------------------------------------------------------------------


def accepted(job: Job, queue_positions: list[int | None]) -> Update:
    """The new job: one `queued` event per image, with its place in the queue."""
    logger.info(
        "job accepted",
        extra={"job_id": job.id, "owner": job.owner, "num_images": job.num_images, "provider": job.provider},
    )
    events = [
        _event(job, "progress", _progress(job, image, job.accepted_at, queue_position=place))
        for image, place in zip(job.images, queue_positions, strict=True)
    ]
    return Update(events, images={image.index for image in job.images}, job_changed=True, created=True)


def image_changed(
    job: Job, index: int, status: str, at: float, key: str | None = None, error: str | None = None
) -> Update | None:
    """None when the image had already finished (say, a result after a cancel)."""
    image = job.images[index]
    if image.finished or job.finished:
        return None
    image.status = status
    job.status = "running" if job.status == "queued" else job.status
    if status in FINISHED_IMAGE_STATUSES:
        job.completed += 1
        image.image_key, image.error = key, error
        if image.started_at is not None:
            image.latency_ms = ms(at - image.started_at)
        if status == "succeeded":
            # Workers stamp their own times, so the first applied need not be the first.
            elapsed = job.elapsed_ms(at)
            job.ttfi_ms = elapsed if job.ttfi_ms is None else min(job.ttfi_ms, elapsed)
    logger.info("image %s", status, extra={"job_id": job.id, "index": index, "status": status, "error": error})
    update = Update(
        [_event(job, "progress", _progress(job, image, at))],
        images={index},
        given_back=int(status in ("failed", "canceled")),
    )
    if job.completed == job.num_images:
        update.add(finished(job, at))
    return update


def claimed(job: Job, index: int, at: float, max_attempts: int) -> Update | None:
    """A worker took the image (its first time, or over from a worker that went away): its
    attempt count goes up, and past `max_attempts` the image fails, so an image whose every
    attempt kills its worker cannot hold its job open. None when it had already ended."""
    image = job.images[index]
    image.started_at = at
    if image.finished or job.cancel_requested or job.finished:
        return None
    image.attempts += 1
    if image.attempts > max_attempts:
        return image_changed(job, index, "failed", at, error=attempts_exhausted_message(max_attempts))
    if image.status == "queued":
        return image_changed(job, index, "running", at)
    return Update(images={index})


def attempts_exhausted_message(max_attempts: int) -> str:
    return f"The image was given up after {max_attempts} attempts: each one ended without a result."


def by_attempt(index: int, attempt: int, transition: Callable[[Job], Update | None]) -> Callable[[Job], Update | None]:
    """`transition`, applied only while `attempt` is still the image's latest: the worker that
    made it has not been overtaken by another one."""

    def fenced(job: Job) -> Update | None:
        if job.images[index].attempts != attempt:
            return None
        return transition(job)

    return fenced


def prediction_created(job: Job, index: int, prediction_id: str) -> Update | None:
    """The provider's id of the image's work, kept to re-attach to it after a restart."""
    image = job.images[index]
    if image.finished:
        return None
    image.prediction_id = prediction_id
    return Update(images={index})


def retrying(job: Job, index: int, attempt: int, delay: float, reason: str, at: float) -> Update | None:
    image = job.images[index]
    if image.finished or job.finished:
        return None
    logger.info("image retrying", extra={"job_id": job.id, "index": index, "attempt": attempt, "reason": reason})
    data = _progress(job, image, at, status="retrying", error=reason, attempt=attempt, delay_ms=ms(delay))
    return Update([_event(job, "progress", data)], retries=1)


def canceled(job: Job, at: float) -> Update:
    """The job's cancel: its unfinished images end as canceled, and with them the job."""
    job.cancel_requested = True
    logger.info("job cancel requested", extra={"job_id": job.id})
    update = Update(job_changed=True)
    for image in job.unfinished_images():
        update.add(image_changed(job, image.index, "canceled", at))
    return update


def finished(job: Job, at: float) -> Update:
    """`done`, once every image has finished."""
    job.status = job.outcome()
    job.finished_at = datetime.now(UTC)
    job.total_ms = max(job.elapsed_ms(at), job.ttfi_ms or 0.0)
    done = {
        "job_id": job.id,
        "status": job.status,
        "images": [image_result(image) for image in job.images],
        "ttfi_ms": job.ttfi_ms,
        "total_ms": job.total_ms,
    }
    logger.info(
        "job %s",
        job.status,
        extra={"job_id": job.id, "status": job.status, "ttfi_ms": job.ttfi_ms, "total_ms": job.total_ms},
    )
    return Update([_event(job, "done", _json(done))], job_changed=True, closes=True)


def failed(job: Job, message: str) -> Update:
    """`error`: the job cannot go on; its unfinished images will not be made."""
    given_back = 0 if job.finished else len(job.unfinished_images())
    job.status = "failed"
    job.finished_at = datetime.now(UTC)
    logger.error("job failed: %s", message, extra={"job_id": job.id})
    error = _event(job, "error", _json({"job_id": job.id, "message": message}))
    return Update([error], job_changed=True, closes=True, given_back=given_back)


def concluded(job: Job, at: float) -> Update | None:
    """Whatever brings a job that can end to its end: a requested cancel carried out, or
    `done` for a job whose images have all finished; None when it has to wait for images."""
    if job.finished:
        return None
    if job.cancel_requested:
        return canceled(job, at)
    return None if job.unfinished_images() else finished(job, at)


# Payloads ------------------------------------------------------------------------------------


def image_result(image: ImageState, queue_position: int | None = None) -> dict[str, Any]:
    return {
        "index": image.index,
        "status": image.status,
        "image_key": image.image_key,
        "error": image.error,
        "latency_ms": image.latency_ms,
        "queue_position": queue_position,
    }


def _progress(job: Job, image: ImageState, at: float, **extra: object) -> str:
    """The image's `progress` event now; `extra` adds or overrides fields (e.g. a retry's).
    Fields without a value are left out."""
    fields: dict[str, object] = {
        "job_id": job.id,
        "index": image.index,
        "status": image.status,
        "image_key": image.image_key,
        "error": image.error,
        "elapsed_ms": job.elapsed_ms(at),
        "completed": job.completed,
        "total": job.num_images,
    }
    fields.update(extra)
    return _json({name: value for name, value in fields.items() if value is not None})


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _event(job: Job, name: str, data: str) -> JobEvent:
    job.last_event_id += 1
    return JobEvent(job.last_event_id, name, data)
