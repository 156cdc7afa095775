"""The FastAPI application (`main:app`)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.core.config import Settings, get_settings
from app.core.logging import RequestLogMiddleware, configure_logging
from app.providers import create_provider
from app.routers import auth, generation, images
from app.routers.errors import register_error_handlers
from app.services.auth_service import DEMO_USERS, AuthService
from app.services.generation_service import GenerationService
from app.services.image_store import LocalImageStore


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        image_store = LocalImageStore(settings.images_dir)
        generation_service = GenerationService(
            provider=create_provider(settings),
            image_store=image_store,
            max_workers=settings.GENERATION_MAX_WORKERS,
            max_images_per_job=settings.MAX_IMAGES_PER_JOB,
        )
        await generation_service.start()
        app.state.settings = settings
        app.state.image_store = image_store
        app.state.auth_service = AuthService(
            users=DEMO_USERS,
            jwt_secret=settings.JWT_SECRET_KEY.get_secret_value(),
            token_lifetime=timedelta(minutes=settings.ACCESS_TOKEN_EXPIRE_MINUTES),
        )
        app.state.generation_service = generation_service
        try:
            yield
        finally:
            await generation_service.shutdown()

    app = FastAPI(
        title="MyFlix backend",
        description="JWT login and AI image generation with live progress over Server-Sent Events.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.dependency_overrides[get_settings] = lambda: settings
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.CORS_ORIGINS,
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key"],
    )
    app.add_middleware(RequestLogMiddleware)
    register_error_handlers(app)
    app.include_router(auth.router)
    app.include_router(generation.router)
    app.include_router(images.router)
    return app


app = create_app()
