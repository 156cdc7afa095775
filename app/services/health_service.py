"""Readiness: can this process do its work right now?

Each check says whether it passes, in words of our own: /readyz answers anyone, so it never
carries a file path or an exception's text. Those go to the log, when a check starts failing.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.metrics import Metrics
from app.core.redis_link import RedisLink
from app.providers.base import ImageProvider
from app.services.image_store import ImageStore, ImageStoreError

logger = logging.getLogger("myflix.health")

CHECK_TIMEOUT_SECONDS = 2.0
# /readyz answers anyone: the image store is probed (an object written, read and removed) at
# most once in this long, however often it is asked.
STORE_PROBE_INTERVAL_SECONDS = 1.0


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


class HealthService:
    def __init__(
        self,
        engine: AsyncEngine,
        write_failure: Callable[[], str | None],
        image_store: ImageStore,
        provider: ImageProvider,
        metrics: Metrics,
        queue_depth: Callable[[], Awaitable[int]],
        redis: RedisLink | None = None,
        work_queue_failure: Callable[[], str | None] | None = None,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._queue_depth = queue_depth
        self._work_queue_failure = work_queue_failure
        self._write_failure = write_failure
        self._image_store = image_store
        self._store_probe: asyncio.Task[Check] | None = None
        self._store_probed_at = float("-inf")
        self._provider = provider
        self._redis = redis
        self._failing: set[str] = set()  # checks whose failure has been logged

    async def readiness(self) -> dict[str, Check]:
        checks = {
            "database": await self._database(),
            "writes": self._writes(),
            "image_store": await self._image_store_check(),
            "provider": Check(True, f"{self._provider.name} ({self._provider.model})"),
        }
        if self._redis is not None:
            # Pinged every second by the link itself, which logs why when Redis goes away.
            checks["redis"] = Check(True, "ok") if self._redis.available else Check(False, "does not answer")
        if self._work_queue_failure is not None:
            checks["work_queue"] = self._work_queue()
        return checks

    def _work_queue(self) -> Check:
        assert self._work_queue_failure is not None
        failure = self._work_queue_failure()
        if failure is not None:
            return self._failed("work_queue", "failing; tried again", f"the work queue fails: {failure}")
        return self._passed("work_queue", "ok")

    async def metrics(self) -> bytes:
        """The metrics, with the deployment's queue depth as it is now (the last one known
        while it cannot be read)."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                self._metrics.queue_depth.set(await self._queue_depth())
        except Exception as exc:  # the metrics are still served; readiness says what fails
            logger.warning("the queue depth could not be read: %s: %s", type(exc).__name__, exc)
        return self._metrics.exposition()

    async def _database(self) -> Check:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                async with self._engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
        except TimeoutError:
            late = f"no answer within {CHECK_TIMEOUT_SECONDS:g} s"
            return self._failed("database", late, f"the database gave {late}")
        except Exception as exc:  # any failure means not ready; the log says which
            return self._failed("database", "unreachable", f"the database is unreachable: {type(exc).__name__}: {exc}")
        return self._passed("database", self._engine.dialect.name)

    def _writes(self) -> Check:
        # WriteHealth logs the failure, with its cause, when writes start failing.
        if self._write_failure() is not None:
            return Check(False, "failing; retried until they go through")
        return Check(True, "ok")

    async def _image_store_check(self) -> Check:
        probe = self._store_probe
        if probe is None or (probe.done() and time.monotonic() - self._store_probed_at >= STORE_PROBE_INTERVAL_SECONDS):
            self._store_probed_at = time.monotonic()
            probe = self._store_probe = asyncio.ensure_future(self._probe_image_store())
        # Shared by every request that comes while it runs; a request that gives up leaves it be.
        return await asyncio.shield(probe)

    async def _probe_image_store(self) -> Check:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                await self._image_store.probe()
        except TimeoutError:
            late = f"no answer within {CHECK_TIMEOUT_SECONDS:g} s"
            return self._failed("image_store", late, f"the image store {self._image_store.url} gave {late}")
        except ImageStoreError as exc:
            cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
            return self._failed("image_store", str(exc), f"the image store {self._image_store.url} is {exc}{cause}")
        return self._passed("image_store", "writable")

    def _failed(self, name: str, detail: str, logged: str) -> Check:
        if name not in self._failing:
            self._failing.add(name)
            logger.warning("not ready: %s", logged, extra={"check": name})
        return Check(False, detail)

    def _passed(self, name: str, detail: str) -> Check:
        if name in self._failing:
            self._failing.discard(name)
            logger.info("ready again: %s", name, extra={"check": name})
        return Check(True, detail)
