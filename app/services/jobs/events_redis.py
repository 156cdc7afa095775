"""A job's events carried across processes: a Redis stream per job, `<prefix>:events:<job>`,
whose entry ids are `<n>-0`, n being the event's number in the database. A script appends
only the next number, so the stream is always a gap-free copy of what the database holds,
whoever publishes and in whatever order; a publisher that finds a gap fills it from the
database. Followers start from the database and block on the stream for what follows; all the
followers of a job in one process share one reader."""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError

from app.core.redis_link import BLOCK_MS, RedisLink
from app.services.jobs.domain import JobEvent
from app.services.jobs.event_log import EventLog
from app.services.jobs.interfaces import StoredEvents

logger = logging.getLogger("myflix.redis")

_PUBLISH = """
local last = 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top > 0 then last = tonumber(string.match(top[1][1], '^(%d+)')) end
for i = 3, #ARGV, 3 do
  local n = tonumber(ARGV[i])
  if n == last + 1 then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], n .. '-0', 'name', ARGV[i + 1], 'data', ARGV[i + 2])
    last = n
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return last
"""


def stream_event(entry_id: str, fields: dict[str, str]) -> JobEvent:
    return JobEvent(int(entry_id.split("-", 1)[0]), fields["name"], fields["data"], sse_id=entry_id)


def with_stream_ids(events: list[JobEvent]) -> list[JobEvent]:
    """Events as the stream names them, for events read from the database."""
    return [JobEvent(e.id, e.name, e.data, sse_id=f"{e.id}-0") for e in events]


class RedisEventBus:
    def __init__(
        self, link: RedisLink, retention_seconds: int, stored_events: StoredEvents, max_length: int = 2000
    ) -> None:
        self._link = link
        self._retention = retention_seconds
        self._max_length = max_length
        self._stored_events = stored_events  # (job, after id): committed events, in order
        self._publish = link.client.register_script(_PUBLISH)
        self._feeds: dict[str, _Feed] = {}

    @property
    def unavailable(self) -> str | None:
        return self._link.unavailable

    async def start(self) -> None:
        self._link.start()

    async def close(self) -> None:
        self.interrupt_all()

    def key(self, job_id: str) -> str:
        return self._link.key("events", job_id)

    async def forget(self, job_ids: list[str]) -> None:
        try:
            await self._link.client.delete(*(self.key(job_id) for job_id in job_ids))
        except RedisError:
            pass  # the streams expire by themselves (REDIS_EVENTS_RETENTION_SECONDS)

    async def publish(self, job_id: str, events: list[JobEvent]) -> None:
        """Append committed events; a publication lost to a Redis failure is made good by the
        next one, or by followers, who look in the database when the stream is quiet."""
        if not events:
            return
        try:
            last = await self._append(job_id, events)
            if last < events[-1].id:
                # An earlier commit's publisher has not published yet (or never will).
                await self._append(job_id, await self._stored_events(job_id, last))
        except (RedisError, OSError) as exc:
            self._link.lost(exc)
            logger.warning("events of %s not published to Redis: %s", job_id, exc)

    async def _append(self, job_id: str, events: list[JobEvent]) -> int:
        args: list[str | int] = [self._max_length, self._retention]
        for event in events:
            args += [event.id, event.name, event.data]
        return int(await self._publish(keys=[self.key(job_id)], args=args))

    async def follow(
        self, job_id: str, after_id: int, keepalive_seconds: float
    ) -> AsyncIterator[list[JobEvent] | None]:
        feed = self._feeds.get(job_id)
        if feed is None or feed.log.closed:
            feed = self._feeds[job_id] = _Feed(self, job_id)
        feed.followers += 1
        try:
            async for batch in feed.log.follow(after_id, keepalive_seconds):
                yield batch
        finally:
            feed.followers -= 1
            if feed.followers == 0:
                feed.stop()
                if self._feeds.get(job_id) is feed:
                    del self._feeds[job_id]

    def interrupt_all(self) -> None:
        feeds, self._feeds = self._feeds, {}
        for feed in feeds.values():
            feed.stop()
            feed.log.interrupt()

    async def read(self, job_id: str, after_id: int) -> list[JobEvent]:
        """What the stream holds after `after_id`, waiting up to BLOCK_MS for something."""
        reply: Any = await self._link.client.xread({self.key(job_id): f"{after_id}-0"}, block=BLOCK_MS, count=500)
        return [stream_event(entry_id, fields) for entry_id, fields in (reply[0][1] if reply else [])]

    async def stored(self, job_id: str, after_id: int) -> list[JobEvent]:
        return with_stream_ids(await self._stored_events(job_id, after_id))

    def lost(self, exc: Exception) -> None:
        self._link.lost(exc)


class _Feed:
    """One job's events in this process: what the database has, then what the stream brings."""

    def __init__(self, bus: RedisEventBus, job_id: str) -> None:
        self._bus = bus
        self._job_id = job_id
        self.log = EventLog()
        self.followers = 0
        self._task = asyncio.create_task(self._run(), name=f"feed-{job_id}")

    def stop(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        try:
            await self._catch_up()
            while not self.log.closed:
                entries = await self._bus.read(self._job_id, len(self.log))
                for event in entries:
                    self.log.add(event)
                if not entries or entries[-1].id > len(self.log):
                    await self._catch_up()  # quiet (was a publication lost?), or past a gap
        except (RedisError, OSError) as exc:
            self._bus.lost(exc)
            self.log.interrupt()
        except Exception:
            logger.exception("event feed of %s failed", self._job_id)
            self.log.interrupt()

    async def _catch_up(self) -> None:
        for event in await self._bus.stored(self._job_id, len(self.log)):
            self.log.add(event)
