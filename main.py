"""The FastAPI application (`main:app`)."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.bootstrap import freeze_startup_objects, health_service, job_service, jwt_secret, open_components
from app.core.config import PROJECT_ROOT, Settings, get_settings
from app.core.logging import RequestLogMiddleware, configure_logging
from app.core.request_limits import RequestLimitsMiddleware
from app.core.security_headers import SecurityHeadersMiddleware
from app.models.openapi import declare_settings_limits, stream_event_schemas
from app.routers import admin, auth, docs, generation, health, images, usage
from app.routers.errors import register_error_handlers
from app.services.auth_service import AuthService, seed_demo_users
from app.services.login_throttle import login_throttle_for
from app.services.stream_slots import stream_slots_for
from app.services.users_service import UsersService

# The largest valid body (a 2000-character prompt) is a few KiB; refuse far more (413).
MAX_REQUEST_BODY_BYTES = 64 * 1024
STATIC_DIR = PROJECT_ROOT / "app" / "static"


class MyFlixAPI(FastAPI):
    def openapi(self) -> dict[str, Any]:
        """The schema, plus the stream's event payloads, which no JSON response refers to."""
        return _openapi_with_stream_events(self)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        components = await open_components(settings)
        if settings.seeds_demo_users:
            await seed_demo_users(components.accounts)
        # Scaled out, a replica makes images too unless RUN_WORK_IN_API is false.
        service = job_service(settings, components, makes_images=settings.REDIS_URL is None or settings.RUN_WORK_IN_API)
        await service.start()
        app.state.image_store = components.image_store
        app.state.image_url_signer = components.signer
        app.state.health_service = health_service(components, service)
        app.state.auth_service = auth_service = AuthService(
            components.accounts,
            jwt_secret=jwt_secret(settings),
            token_lifetime=timedelta(minutes=settings.ACCESS_TOKEN_EXPIRE_MINUTES),
            refresh_lifetime=timedelta(days=settings.REFRESH_TOKEN_DAYS),
            throttle=login_throttle_for(
                components.redis,
                max_failures=settings.LOGIN_MAX_FAILURES,
                max_failures_per_account=settings.LOGIN_MAX_FAILURES_PER_ACCOUNT,
                window_seconds=settings.LOGIN_FAILURE_WINDOW_SECONDS,
            ),
            signup_enabled=settings.SIGNUP_ENABLED,
        )
        app.state.users_service = UsersService(
            components.accounts, settings.DAILY_IMAGE_QUOTA, on_changed=auth_service.forget
        )
        app.state.job_service = service
        app.state.stream_slots = stream_slots = stream_slots_for(settings.MAX_STREAMS_PER_USER, components.redis)
        loop_lag_probe = asyncio.create_task(components.metrics.probe_loop_lag(), name="loop-lag-probe")
        freeze_startup_objects()
        try:
            yield
        finally:
            loop_lag_probe.cancel()
            await service.shutdown()
            await stream_slots.close()
            await components.close()

    app = MyFlixAPI(
        title="MyFlix backend",
        description="JWT login and AI image generation with live progress over Server-Sent Events.",
        version="0.2.0",
        lifespan=lifespan,
        # Served by app/routers/docs.py, with every asset from this service.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.CORS_ORIGINS,
        allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key"],
        expose_headers=["Location", "Retry-After", "Idempotent-Replayed"],
    )
    # Inside the security headers, so that its refusals carry them too.
    app.add_middleware(RequestLimitsMiddleware, max_body_bytes=MAX_REQUEST_BODY_BYTES)
    app.add_middleware(SecurityHeadersMiddleware, hsts=settings.ENVIRONMENT == "production")
    app.add_middleware(RequestLogMiddleware)
    routers = [auth.router, generation.router, usage.router, admin.router, images.router, health.router, docs.router]
    register_error_handlers(app, routers)
    for router in routers:
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    docs.mount_assets(app)
    return app


def _openapi_with_stream_events(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(stream_event_schemas())
        declare_settings_limits(components, app.state.settings.MAX_IMAGES_PER_JOB)
        app.openapi_schema = schema
    return app.openapi_schema


app = create_app()
