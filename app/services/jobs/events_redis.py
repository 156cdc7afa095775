"""A job's events carried across processes: a Redis stream per job, `<prefix>:events:<job>`,
whose entry ids are `<n>-0`, n being the event's number in the database. A script appends
only the next number, so the stream is always a gap-free copy of what the database holds,
whoever publishes and in whatever order; a publisher that finds a gap fills it from the
database.

Followers start from the database. One reader per process then blocks on the streams of every
job followed there at once (one XREAD, one connection, however many jobs), and hands each
job's entries to its followers. A job newly followed wakes the reader through a stream of the
process's own, so it joins the next read at once. A job whose stream stays quiet, or shows a
gap, is looked up in the database (a publication may have been lost).
"""

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
# Entries one read takes from each stream.
READ_COUNT = 500
# The reader's wake-up stream outlives a process that died by this much.
WAKE_STREAM_SECONDS = 60


def stream_event(entry_id: str, fields: dict[str, str]) -> JobEvent:
    return JobEvent(int(entry_id.split("-", 1)[0]), fields["name"], fields["data"], sse_id=entry_id)


def with_stream_ids(events: list[JobEvent]) -> list[JobEvent]:
    """Events as the stream names them, for events read from the database."""
    return [JobEvent(e.id, e.name, e.data, sse_id=f"{e.id}-0") for e in events]


@dataclass(eq=False)
class _Feed:
    """One job's events in this process: what the database has, then what the stream brings."""

    log: EventLog = field(default_factory=EventLog)
    followers: int = 0
    heard_at: float = float("-inf")  # when the stream or the database last brought something
    catching_up: "asyncio.Task[None] | None" = None


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
        self._wake_key = link.key("wake", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._wake_seen = "0-0"
        self._feeds_changed = asyncio.Event()
        self._reading = False  # blocked in a read whose streams are fixed
        self._waking = False  # a wake-up is on its way to that read
        self._reader: asyncio.Task[None] | None = None
        self._wake_up: asyncio.Future[None] | None = None

    @property
    def unavailable(self) -> str | None:
        return self._link.unavailable

    async def start(self) -> None:
        self._link.start()
        self._reader = asyncio.create_task(self._link.keep_running("event reader", self._read), name="event-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
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
            feed = self._feeds[job_id] = _Feed()
            self._catch_up(job_id, feed)
            self._wake_reader()
        feed.followers += 1
        try:
            async for batch in feed.log.follow(after_id, keepalive_seconds):
                yield batch
        finally:
            feed.followers -= 1
            if feed.followers == 0:
                if feed.catching_up is not None:
                    feed.catching_up.cancel()
                if self._feeds.get(job_id) is feed:
                    del self._feeds[job_id]  # the reader leaves its stream at its next read

    def interrupt_all(self) -> None:
        feeds, self._feeds = self._feeds, {}
        for feed in feeds.values():
            if feed.catching_up is not None:
                feed.catching_up.cancel()
            feed.log.interrupt()

    # The reader ------------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                await self._read_once()
        except (RedisError, OSError):
            # Followers are told to come back later; keep_running marks Redis lost and reads
            # again after a pause.
            self.interrupt_all()
            raise

    async def _read_once(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._feeds:
            self._feeds_changed.clear()
            await self._feeds_changed.wait()
            return
        quiet_since = loop.time() - BLOCK_MS / 1000
        for job_id, feed in list(self._feeds.items()):
            if feed.heard_at < quiet_since:
                self._catch_up(job_id, feed)  # quiet: was a publication lost?
        followed = {self.key(job_id): (job_id, feed) for job_id, feed in self._feeds.items() if not feed.log.closed}
        streams: dict[Any, Any] = {key: f"{len(feed.log)}-0" for key, (_, feed) in followed.items()}
        streams[self._wake_key] = self._wake_seen
        self._feeds_changed.clear()
        self._reading = True
        try:
            reply: Any = await self._link.client.xread(streams, block=BLOCK_MS, count=READ_COUNT)
        finally:
            self._reading = self._waking = False
        heard_at = loop.time()
        for key, entries in reply or ():
            if key == self._wake_key:
                self._wake_seen = entries[-1][0]
                continue
            job_id, feed = followed[key]
            for entry_id, fields in entries:
                feed.log.add(stream_event(entry_id, fields))
            feed.heard_at = heard_at
            if stream_event(*entries[-1]).id > len(feed.log):
                self._catch_up(job_id, feed)  # past a gap

    def _wake_reader(self) -> None:
        """A job is newly followed: a read blocked on the others ends now, to take it in."""
        self._feeds_changed.set()
        if self._reading and not self._waking:
            self._waking = True
            self._wake_up = asyncio.ensure_future(self._send_wake_up())

    async def _send_wake_up(self) -> None:
        try:
            async with self._link.client.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"wake": "1"}, maxlen=10, approximate=True)
                pipe.expire(self._wake_key, WAKE_STREAM_SECONDS)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._link.lost(exc)  # the read fails too, and its followers come back later

    def _catch_up(self, job_id: str, feed: _Feed) -> None:
        """Read what the database has of the job beyond what the feed holds (one read at a
        time per job), without holding the reader up."""
        if feed.catching_up is None or feed.catching_up.done():
            feed.heard_at = asyncio.get_running_loop().time()
            feed.catching_up = asyncio.create_task(self._read_stored(job_id, feed), name=f"catch-up-{job_id}")

    async def _read_stored(self, job_id: str, feed: _Feed) -> None:
        try:
            for event in with_stream_ids(await self._stored_events(job_id, len(feed.log))):
                feed.log.add(event)
        except Exception:
            logger.exception("the stored events of %s could not be read", job_id)
            feed.log.interrupt()
