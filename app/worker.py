"""A worker process of the scaled-out deployment: `python -m app.worker`.

Takes image work from Redis and makes the images, GENERATION_MAX_WORKERS at a time, with the
same job engine and settings as the API (REDIS_URL and a PostgreSQL DATABASE_URL are
required). SIGTERM or Ctrl-C: it takes no more work and gives running images
SHUTDOWN_GRACE_SECONDS to finish; what is left is taken over by another worker.

It serves /healthz, /readyz and /metrics (the API's own routes) on WORKER_METRICS_PORT.
"""

import asyncio
import logging
import signal
import sys

import uvicorn
from fastapi import FastAPI

from app.bootstrap import Components, freeze_startup_objects, health_service, job_service, open_components
from app.core.config import Settings, settings_or_exit
from app.core.http_server import server_config
from app.core.logging import configure_logging
from app.routers import health
from app.services.jobs.service import JobService

logger = logging.getLogger("myflix.worker")


def monitoring_app(components: Components, service: JobService) -> FastAPI:
    """The worker's /healthz, /readyz and /metrics: the API's routes, on this process's parts."""
    app = FastAPI(title="MyFlix worker", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.health_service = health_service(components, service)
    app.include_router(health.router)
    return app


async def run(settings: Settings) -> None:
    components = await open_components(settings)
    service = job_service(settings, components, makes_images=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    monitoring = uvicorn.Server(
        server_config(monitoring_app(components, service), settings, port=settings.WORKER_METRICS_PORT, lifespan="off")
    )
    # A signal reaches both: the loop's handler stops the worker, uvicorn's its server.
    serving = asyncio.create_task(monitoring.serve(), name="worker-monitoring")
    freeze_startup_objects()
    logger.info(
        "worker ready: %d at a time, provider %s",
        settings.GENERATION_MAX_WORKERS,
        components.image_maker.provider.name,
    )
    try:
        await asyncio.wait([asyncio.ensure_future(stop.wait()), serving], return_when=asyncio.FIRST_COMPLETED)
        if serving.done() and not stop.is_set():
            serving.result()  # the monitoring port could not be served: say why
        logger.info("worker stopping")
    finally:
        monitoring.should_exit = True
        await asyncio.gather(serving, return_exceptions=True)
        await service.shutdown()
        await components.close()


def main() -> int:
    settings = settings_or_exit()
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    if settings.REDIS_URL is None:
        print("python -m app.worker needs REDIS_URL (and a PostgreSQL DATABASE_URL)", file=sys.stderr)
        return 2
    asyncio.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
