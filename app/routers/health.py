from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.models.health import CheckResult, HealthResponse, ReadinessResponse
from app.routers.deps import HealthServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="getHealth", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """The process is up and serving."""
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    operation_id="getReadiness",
    response_model=ReadinessResponse,
    responses={503: {"model": ReadinessResponse}},
)
async def readyz(health: HealthServiceDep) -> JSONResponse:
    """Each check by name, and whether it passes: the database answers, writes go through,
    the image store is writable, the provider is configured, and scaled out, Redis answers.
    503 when any fails; why is in the service's log, never here."""
    checks = await health.readiness()
    ready = all(check.ok for check in checks.values())
    body = ReadinessResponse(
        status="ready" if ready else "not ready",
        checks={name: CheckResult(ok=check.ok, detail=check.detail) for name, check in checks.items()},
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    operation_id="getMetrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(health: HealthServiceDep) -> Response:
    """Prometheus metrics: TTFI, batch and image latency histograms; job, image, retry,
    error, takeover and attempts-exhausted counters; open streams, busy workers, queued
    images here and in the whole deployment."""
    return Response(await health.metrics(), media_type=CONTENT_TYPE_LATEST)
