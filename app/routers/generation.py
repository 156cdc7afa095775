from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response, status
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.models.generation import GenerateRequest, GenerateResponse, JobSnapshot
from app.routers.deps import CurrentUser, GenerationServiceDep, SettingsDep, StreamUser
from app.services.event_log import JobEvent
from app.services.generation_service import Job

router = APIRouter(prefix="/api/generate", tags=["generation"])

_NOT_FOUND = {404: {"description": "No such job for this user"}}


def _snapshot(job: Job) -> JobSnapshot:
    return JobSnapshot(
        job_id=job.id,
        status=job.status,
        prompt=job.prompt,
        num_images=job.num_images,
        seed=job.seed,
        created_at=job.created_at.isoformat(),
        images=[image.result() for image in job.images],
        ttfi_ms=job.ttfi_ms,
        total_ms=job.total_ms,
    )


@router.post("/", status_code=status.HTTP_202_ACCEPTED, response_model=GenerateResponse)
async def create_job(
    body: GenerateRequest,
    user: CurrentUser,
    service: GenerationServiceDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
) -> GenerateResponse:
    """Start a job of `num_images` images; follow it at `/api/generate/{job_id}/stream`."""
    job = service.create_job(
        owner=user.email,
        prompt=body.prompt,
        num_images=body.num_images,
        seed=body.seed,
        image_base_url=settings.PUBLIC_BASE_URL or str(request.base_url),
    )
    response.headers["Location"] = f"/api/generate/{job.id}"
    return GenerateResponse(job_id=job.id)


@router.get("/{job_id}", response_model=JobSnapshot, responses=_NOT_FOUND)
async def get_job(job_id: str, user: CurrentUser, service: GenerationServiceDep) -> JobSnapshot:
    """The job's current state: each image's status, url, error and latency, and its metrics."""
    return _snapshot(service.get_job(job_id, user.email))


async def _to_sse(events: AsyncIterator[JobEvent | None]) -> AsyncIterator[ServerSentEvent]:
    async for event in events:
        if event is None:
            yield ServerSentEvent(event="keepalive", data="{}")
        else:
            yield ServerSentEvent(id=str(event.id), event=event.name, data=event.data)


@router.get(
    "/{job_id}/stream",
    responses={**_NOT_FOUND, 200: {"content": {"text/event-stream": {}}}},
    response_class=EventSourceResponse,
)
async def stream_job(
    job_id: str,
    user: StreamUser,
    service: GenerationServiceDep,
    settings: SettingsDep,
    last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0)] = None,
) -> EventSourceResponse:
    """Server-Sent Events of the job from the start, or after `Last-Event-ID`: `progress`,
    then `done` (or `error`), with `keepalive` while nothing else happens."""
    job = service.get_job(job_id, user.email)
    events = service.follow(job, last_event_id or 0, settings.SSE_KEEPALIVE_SECONDS)
    # Keepalives are our own `keepalive` events, sent only when the stream is quiet.
    return EventSourceResponse(_to_sse(events), ping=0)
