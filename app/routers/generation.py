from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status
from sse_starlette import EventSourceResponse

from app.models.errors import BODY_ERRORS, STORE_UNAVAILABLE, UNAUTHORIZED, error_responses
from app.models.generation import (
    STREAM_EVENT_MODELS,
    GenerateRequest,
    GenerateResponse,
    JobPage,
    JobSnapshot,
)
from app.routers.deps import (
    CurrentUser,
    DailyQuota,
    JobServiceDep,
    Links,
    SettingsDep,
    StreamSlotDep,
    StreamUser,
)
from app.services.jobs.domain import JobEvent
from app.services.jobs.event_log import EventStreamInterrupted
from app.services.jobs.views import KEEPALIVE_WIRE, RECONNECT_WIRE, ImageLinks, parse_last_event_id

router = APIRouter(prefix="/api/generate", tags=["generation"])

_UNAUTHORIZED = {**UNAUTHORIZED, **STORE_UNAVAILABLE}
_NOT_FOUND = {**_UNAUTHORIZED, **error_responses(_404="No such job for this user")}
_CANCEL_RESPONSES = {**_NOT_FOUND, **error_responses(_409="The job has already finished")}


@router.post(
    "/",
    operation_id="createJob",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=GenerateResponse,
    responses={
        **BODY_ERRORS,
        **_UNAUTHORIZED,
        **error_responses(
            _409="Idempotency-Key reused with a different body",
            _429=(
                "Too many jobs in progress, or the job asks for more images than are left today "
                "(DAILY_IMAGE_QUOTA; the message says how many are left); see Retry-After"
            ),
            _503=(
                "The service is shutting down, the database takes no writes (for DB_WRITE_TIMEOUT_SECONDS), "
                "or (scaled out) Redis is unreachable; see Retry-After"
            ),
        ),
    },
)
async def create_job(
    body: GenerateRequest,
    user: CurrentUser,
    quota: DailyQuota,
    service: JobServiceDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=255, description="Repeat a request safely: the same key and body return the same job."),
    ] = None,
) -> GenerateResponse:
    """Start a job of `num_images` images; follow it at `/api/generate/{job_id}/stream`."""
    job, replayed = await service.create_job(
        owner=user.email,
        prompt=body.prompt,
        num_images=body.num_images,
        seed=body.seed,
        idempotency_key=idempotency_key,
        daily_quota=quota,
    )
    response.headers["Location"] = f"/api/generate/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return GenerateResponse(job_id=job.id)


@router.get("/", operation_id="listJobs", response_model=JobPage, responses=_UNAUTHORIZED)
async def list_jobs(
    user: CurrentUser,
    service: JobServiceDep,
    links: Links,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500, description="`next_cursor` of the previous page.")] = None,
) -> JobPage:
    """The caller's jobs, newest first, with their images and metrics."""
    return await service.list_jobs(user.email, limit, cursor, links)


@router.get("/{job_id}", operation_id="getJob", response_model=JobSnapshot, responses=_NOT_FOUND)
async def get_job(job_id: str, user: CurrentUser, service: JobServiceDep, links: Links) -> JobSnapshot:
    """The job's current state: each image's status, url, error and latency, and its metrics.
    Image URLs are freshly signed on every call. An admin may read anyone's job."""
    return service.snapshot(await service.get_job(job_id, user.email, any_owner=user.is_admin), links)


@router.post(
    "/{job_id}/cancel",
    operation_id="cancelJob",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobSnapshot,
    responses=_CANCEL_RESPONSES,
)
async def cancel_job(job_id: str, user: CurrentUser, service: JobServiceDep, links: Links) -> JobSnapshot:
    """Stop the images that have not finished; the stream ends with `done` status `canceled`."""
    return service.snapshot(await service.cancel_job(job_id, user.email), links)


@router.delete(
    "/{job_id}",
    operation_id="deleteJob",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={
        **_NOT_FOUND,
        **error_responses(_503="The database or the image store is unreachable; see Retry-After"),
    },
)
async def delete_job(job_id: str, user: CurrentUser, service: JobServiceDep) -> Response:
    """Delete the job: cancel it if it is still running, then remove its images, its record
    and its events. Afterwards the job, its stream and its image links answer 404."""
    await service.delete_job(job_id, user.email)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def _to_sse(batches: AsyncIterator[list[JobEvent] | None], links: ImageLinks) -> AsyncIterator[bytes]:
    try:
        async for batch in batches:
            yield KEEPALIVE_WIRE if batch is None else b"".join(links.wire(event) for event in batch)
    except EventStreamInterrupted:
        yield RECONNECT_WIRE


_STREAM_DESCRIPTION = "\n".join(
    ["Server-Sent Events. Each event's `data` is JSON:", ""]
    + [
        f"- `{name}`: `{model.__name__}` — {(model.__doc__ or '').strip()}"
        for name, model in STREAM_EVENT_MODELS.items()
    ]
)


@router.get(
    "/{job_id}/stream",
    operation_id="streamJob",
    responses={
        **_NOT_FOUND,
        **error_responses(_429="Too many open streams for this user (MAX_STREAMS_PER_USER)"),
        204: {"description": "The job has ended and `Last-Event-ID` was its last event: nothing more will come."},
        200: {
            "description": _STREAM_DESCRIPTION,
            "content": {
                "text/event-stream": {
                    "schema": {
                        "oneOf": [
                            {"$ref": f"#/components/schemas/{model.__name__}"} for model in STREAM_EVENT_MODELS.values()
                        ]
                    }
                }
            },
        },
    },
    response_class=EventSourceResponse,
)
async def stream_job(
    job_id: str,
    user: StreamUser,
    service: JobServiceDep,
    settings: SettingsDep,
    links: Links,
    stream_slot: StreamSlotDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    """Server-Sent Events of the job from the start, or after `Last-Event-ID`: `progress`,
    then `done` (or `error`), with `keepalive` while nothing else happens. 204 when the job
    has ended and `Last-Event-ID` is its last event: `EventSource` then stops reconnecting.
    An admin may follow anyone's job."""
    job = await service.get_job(job_id, user.email, any_owner=user.is_admin)
    after_id = parse_last_event_id(last_event_id)
    if await service.nothing_to_follow(job, after_id):
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    await stream_slot.take()
    events = service.follow(job, after_id, settings.SSE_KEEPALIVE_SECONDS)
    # Keepalives are our own `keepalive` events, sent only when the stream is quiet.
    return EventSourceResponse(_to_sse(events, links), ping=0, send_timeout=settings.SSE_SEND_TIMEOUT_SECONDS)
