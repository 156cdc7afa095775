"""A job as rows and rows as a job: what both job stores write and read."""

import time
from datetime import UTC, date, datetime
from typing import Any

from app.db.repository import Changes, StoredJob, as_utc
from app.db.tables import EventRow
from app.services.jobs.domain import ImageState, Job, JobEvent, Update


def changes_of(job: Job, update: Update) -> Changes:
    """The rows `update` inserts and the row states it sets."""
    changes = Changes(
        events=[{"job_id": job.id, "id": e.id, "name": e.name, "data": e.data} for e in update.events],
    )
    if update.created:
        changes.jobs.append(job_row(job))
        changes.images.extend(image_state(job, image) for image in job.images)
        changes.usage.append(usage_change(job, job.num_images))
    else:
        if update.job_changed:
            changes.job_states.append(job_state(job))
        changes.image_states.extend(image_state(job, job.images[index]) for index in sorted(update.images))
    if update.given_back:
        changes.usage.append(usage_change(job, -update.given_back))
    return changes


def usage_day(moment: datetime) -> date:
    """The UTC day a job's images count on."""
    return moment.astimezone(UTC).date()


def usage_change(job: Job, images: int) -> dict[str, Any]:
    """The owner's images of the day the job was accepted, changed by `images`."""
    return {"user_email": job.owner, "day": usage_day(job.created_at), "images": images}


def job_row(job: Job) -> dict[str, Any]:
    return {
        "owner_email": job.owner,
        "prompt": job.prompt,
        "num_images": job.num_images,
        "seed": job.seed,
        "provider": job.provider,
        "model": job.model,
        "created_at": job.created_at,
        "idempotency_key": job.idempotency_key,
        "request_fingerprint": job.request_fingerprint,
        **job_state(job),
    }


def job_state(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status if job.finished else "queued",  # unfinished is all a restart needs
        "cancel_requested": job.cancel_requested,
        "finished_at": job.finished_at,
        "ttfi_ms": job.ttfi_ms if job.finished else None,
        "total_ms": job.total_ms,
    }


def image_state(job: Job, image: ImageState) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "index": image.index,
        "status": image.status,
        "image_key": image.image_key,
        "error": image.error,
        "latency_ms": image.latency_ms,
        "prediction_id": image.prediction_id,
        "attempts": image.attempts,
    }


def stored_events(rows: list[EventRow]) -> list[JobEvent]:
    return [JobEvent(row.id, row.name, row.data) for row in rows]


def job_from_rows(stored: StoredJob) -> Job:
    """The job as stored; read with what its events say, also where its event ids and TTFI
    stand (TTFI is stored only when a job ends; until then its first `succeeded` event has it)."""
    row = stored.job
    created_at = as_utc(row.created_at)
    # By the clock that stamped it: the database's where it says so, else this process's.
    now = as_utc(stored.database_now) if stored.database_now is not None else datetime.now(UTC)
    age = (now - created_at).total_seconds()
    job = Job(
        id=row.id,
        owner=row.owner_email,
        prompt=row.prompt,
        num_images=row.num_images,
        seed=row.seed,
        provider=row.provider,
        model=row.model,
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
                attempts=image.attempts,
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
    if stored.so_far is not None:
        job.last_event_id = stored.so_far.last_id
        job.ttfi_ms = job.ttfi_ms if job.finished else stored.so_far.ttfi_ms
    return job
