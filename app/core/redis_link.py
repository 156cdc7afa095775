"""The connection to Redis, and whether Redis answers: pinged every second, so readiness and
new jobs know at once; `on_recovered` callbacks run when it answers again."""

import asyncio
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.core.loops import keep_running

logger = logging.getLogger("myflix.redis")

PING_INTERVAL_SECONDS = 1.0
# Blocking reads wait BLOCK_MS at most, well inside the socket timeout.
BLOCK_MS = 2000


def connect(url: str, name: str | None = None) -> "redis.Redis":
    """`name`: what CLIENT LIST shows for each of its connections."""
    return redis.Redis.from_url(
        url, socket_timeout=10, socket_connect_timeout=2, decode_responses=True, client_name=name
    )


class RedisLink:
    def __init__(self, url: str, prefix: str) -> None:
        self.client = connect(url, name=prefix)
        self.prefix = prefix
        self.available = True
        self.detail = "not checked yet"
        self._on_recovered: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def on_recovered(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_recovered.append(callback)

    def start(self) -> None:
        """Start watching (once, however many users the link has)."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="redis-watch")

    def lost(self, exc: BaseException) -> None:
        if self.available:
            logger.error("Redis is unavailable: %s", exc)
        self.available, self.detail = False, f"{type(exc).__name__}: {exc}"[:300]

    async def _watch(self) -> None:
        while True:
            try:
                await self.client.ping()
            except (RedisError, OSError) as exc:
                self.lost(exc)
            else:
                was_available, self.available, self.detail = self.available, True, "ok"
                if not was_available:
                    logger.info("Redis is back")
                    for callback in self._on_recovered:
                        try:
                            await callback()
                        except (RedisError, OSError) as exc:
                            self.lost(exc)
                        except Exception:
                            logger.exception("recovery step failed")
            await asyncio.sleep(PING_INTERVAL_SECONDS)

    async def keep_running(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run `body` for good: when Redis fails it, mark Redis lost and run it again after a
        growing pause; any other failure is logged and the same."""
        await keep_running(name, body, self._failed)

    def _failed(self, name: str, exc: BaseException | None) -> None:
        # Only a connection that fails says Redis is gone; an error answer says it is there.
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
            self.lost(exc)
        else:
            logger.error("%s failed; starting it again", name, exc_info=exc)

    @property
    def unavailable(self) -> str | None:
        return None if self.available else "Redis does not answer"

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
            await self.client.aclose()
