"""A worker process of the scaled-out deployment: `python -m app.worker`.

Takes image work from Redis and makes the images, GENERATION_MAX_WORKERS at a time, with the
same job engine and settings as the API (REDIS_URL and a PostgreSQL DATABASE_URL are
required). SIGTERM or Ctrl-C: it takes no more work and gives running images
SHUTDOWN_GRACE_SECONDS to finish; what is left is taken over by another worker.
"""

import asyncio
import logging
import signal
import sys

from app.bootstrap import freeze_startup_objects, job_service, open_components
from app.core.config import Settings, settings_or_exit
from app.core.logging import configure_logging

logger = logging.getLogger("myflix.worker")


async def run(settings: Settings) -> None:
    components = await open_components(settings)
    service = job_service(settings, components, makes_images=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    freeze_startup_objects()
    logger.info(
        "worker ready: %d at a time, provider %s",
        settings.GENERATION_MAX_WORKERS,
        components.image_maker.provider.name,
    )
    try:
        await stop.wait()
        logger.info("worker stopping")
    finally:
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
