"""Readiness: can this process do its work right now?"""

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.redis_link import RedisLink
from app.providers.base import ImageProvider

CHECK_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


class HealthService:
    def __init__(
        self,
        engine: AsyncEngine,
        write_failure: Callable[[], str | None],
        image_store_dir: Path,
        provider: ImageProvider,
        redis: RedisLink | None = None,
    ) -> None:
        self._engine = engine
        self._write_failure = write_failure
        self._image_store_dir = image_store_dir
        self._provider = provider
        self._redis = redis

    async def readiness(self) -> dict[str, Check]:
        checks = {
            "database": await self._database(),
            "image_store": self._image_store(),
            "provider": Check(True, f"{self._provider.name} ({self._provider.model})"),
        }
        if self._redis is not None:
            # Pinged every second by the link itself; a check here would only repeat it.
            checks["redis"] = Check(self._redis.available, self._redis.detail)
        return checks

    async def _database(self) -> Check:
        write_failure = self._write_failure()
        if write_failure is not None:
            return Check(False, f"writes fail and are being retried: {write_failure}")
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                async with self._engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
        except Exception as exc:  # any failure means not ready; say which
            return Check(False, f"{type(exc).__name__}: {exc}"[:300])
        return Check(True, self._engine.dialect.name)

    def _image_store(self) -> Check:
        directory = self._image_store_dir
        if directory.is_dir() and os.access(directory, os.W_OK):
            return Check(True, str(directory))
        return Check(False, f"{directory} is not a writable directory")
