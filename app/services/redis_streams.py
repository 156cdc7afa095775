"""Redis for the scaled-out deployment.

- Each job's events: a stream `<prefix>:events:<job>` whose entry ids are `<n>-0`, n being the
  event's number in PostgreSQL. A script appends only the next number, so the stream is
  always a gap-free copy of what PostgreSQL holds, whoever publishes and in whatever order;
  a publisher that finds a gap fills it from PostgreSQL. Readers start from PostgreSQL and
  block on the stream for what follows.
- Image work: two streams read by one consumer group, `first` (each job's first image) before
  `rest`, so no job's first image waits behind other jobs' later ones. An entry stays pending
  until its image is recorded; a worker renews its claims while it works, and entries a dead
  worker held are claimed by another after WORKER_CLAIM_TIMEOUT_SECONDS.
- A set of the images that are queued or running, so that a sweep can find images that
  PostgreSQL says are unfinished but no queue holds (Redis lost its data, or a process died
  between the commit and the enqueue).
"""

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from app.services.event_log import TERMINAL_EVENTS, EventLog, JobEvent

logger = logging.getLogger("myflix.redis")

WORK_GROUP = "workers"
# How long a blocking read waits before it looks around (shutdown, lost publications).
BLOCK_MS = 2000
PING_INTERVAL_SECONDS = 1.0

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


def connect(url: str) -> redis.Redis:
    # Blocking reads wait BLOCK_MS at most, well inside the socket timeout.
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=2, decode_responses=True)


def stream_event(entry_id: str, fields: dict[str, str]) -> JobEvent:
    return JobEvent(int(entry_id.split("-", 1)[0]), fields["name"], fields["data"], sse_id=entry_id)


def with_stream_ids(events: list[JobEvent]) -> list[JobEvent]:
    """Events as the stream names them, for events read from PostgreSQL."""
    return [JobEvent(e.id, e.name, e.data, sse_id=f"{e.id}-0") for e in events]


class RedisLink:
    """The connection, and whether Redis answers: pinged every second, so readiness and new
    jobs know at once; `on_recovered` callbacks run when it answers again."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = connect(url)
        self.prefix = prefix
        self.available = True
        self.detail = "not checked yet"
        self._on_recovered: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task | None = None

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def on_recovered(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_recovered.append(callback)

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="redis-watch")

    def lost(self, exc: Exception) -> None:
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

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.client.aclose()


class RedisEventStreams:
    def __init__(
        self,
        link: RedisLink,
        retention_seconds: int,
        stored_events: Callable[[str, int], Awaitable[list[JobEvent]]],
        max_length: int = 2000,
    ) -> None:
        self._link = link
        self._retention = retention_seconds
        self._max_length = max_length
        self._stored_events = stored_events  # (job, after id): events from PostgreSQL, in order
        self._publish = link.client.register_script(_PUBLISH)
        self._feeds: dict[str, _Feed] = {}

    def _key(self, job_id: str) -> str:
        return self._link.key("events", job_id)

    async def publish(self, job_id: str, events: list[JobEvent]) -> None:
        """Append committed events; a publication lost to a Redis failure is made good by the
        next one, or by readers, who look in PostgreSQL when the stream is quiet."""
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
        args: list[object] = [self._max_length, self._retention]
        for event in events:
            args += [event.id, event.name, event.data]
        return int(await self._publish(keys=[self._key(job_id)], args=args))

    async def follow(self, job_id: str, after_id: int, keepalive_seconds: float) -> AsyncIterator[list[JobEvent] | None]:
        """The job's events after `after_id` until it ends, in batches; None means keepalive. All the
        subscribers of a job in this process share one reader."""
        feed = self._feeds.get(job_id)
        if feed is None or feed.log.closed:
            feed = self._feeds[job_id] = _Feed(self, job_id)
        feed.subscribers += 1
        try:
            async for batch in feed.log.follow(after_id, keepalive_seconds):
                yield batch
        finally:
            feed.subscribers -= 1
            if feed.subscribers == 0:
                feed.stop()
                if self._feeds.get(job_id) is feed:
                    del self._feeds[job_id]

    async def close(self) -> None:
        for feed in list(self._feeds.values()):
            feed.stop()
            feed.log.interrupt()


class _Feed:
    """One job's events in this process: what PostgreSQL has, then what the stream brings."""

    def __init__(self, streams: RedisEventStreams, job_id: str) -> None:
        self._streams = streams
        self._job_id = job_id
        self.log = EventLog()
        self.subscribers = 0
        self._task = asyncio.create_task(self._run(), name=f"feed-{job_id}")

    def stop(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        streams, key = self._streams, self._streams._key(self._job_id)
        try:
            await self._catch_up()
            while not self.log.closed:
                reply = await streams._link.client.xread({key: f"{len(self.log)}-0"}, block=BLOCK_MS, count=500)
                entries = reply[0][1] if reply else []
                for entry_id, fields in entries:
                    self._add(stream_event(entry_id, fields))
                if not entries or stream_event(*entries[-1]).id > len(self.log):
                    await self._catch_up()  # quiet (was a publication lost?), or past a gap
        except (RedisError, OSError) as exc:
            streams._link.lost(exc)
            self.log.interrupt()
        except Exception:
            logger.exception("event feed of %s failed", self._job_id)
            self.log.interrupt()

    async def _catch_up(self) -> None:
        for event in with_stream_ids(await self._streams._stored_events(self._job_id, len(self.log))):
            self._add(event)

    def _add(self, event: JobEvent) -> None:
        if event.id != len(self.log) + 1 or self.log.closed:
            return  # seen already; or past a gap, which the catch-up fills
        self.log.append(event)
        if event.name in TERMINAL_EVENTS:
            self.log.close()


@dataclass(frozen=True)
class WorkItem:
    stream: str
    entry_id: str
    job_id: str
    index: int

    @property
    def member(self) -> str:
        return f"{self.job_id}:{self.index}"


class RedisWorkQueue:
    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._client = link.client
        self.first, self.rest = link.key("work", "first"), link.key("work", "rest")
        self.tracked = link.key("work", "images")
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"

    async def ensure_group(self) -> None:
        for stream in (self.first, self.rest):
            try:
                await self._client.xgroup_create(stream, WORK_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def enqueue(self, job_id: str, indexes: list[int], first: int | None) -> None:
        """Queue the images; `first` (the job's first image, if it is among them) goes ahead."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.sadd(self.tracked, *(f"{job_id}:{index}" for index in indexes))
            for index in indexes:
                pipe.xadd(self.first if index == first else self.rest, {"job": job_id, "index": index})
            await pipe.execute()

    async def read(self, count: int, later: int, wait_seconds: float = BLOCK_MS / 1000) -> list[WorkItem]:
        """Up to `count` items, first images first, and of other images at most `later`;
        waits up to `wait_seconds` when there are none."""
        items = await self._read({self.first: ">"}, count, block=None)
        if later and len(items) < count:
            items += await self._read({self.rest: ">"}, min(later, count - len(items)), block=None)
        if not items:
            # A wait on both streams brings up to one item from each.
            streams = {self.first: ">", self.rest: ">"} if later else {self.first: ">"}
            items = await self._read(streams, 1, block=max(1, int(wait_seconds * 1000)))
            for extra in items[count:]:
                await self._give_back(extra)
        return items[:count]

    async def _give_back(self, item: WorkItem) -> None:
        """Return an item this consumer cannot start now, so that a free worker takes it
        rather than it waiting here behind the image this consumer runs."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xadd(item.stream, {"job": item.job_id, "index": item.index})
            pipe.xack(item.stream, WORK_GROUP, item.entry_id)
            pipe.xdel(item.stream, item.entry_id)
            await pipe.execute()

    async def _read(self, streams: dict[str, str], count: int, block: int | None) -> list[WorkItem]:
        reply = await self._client.xreadgroup(WORK_GROUP, self.consumer, streams, count=count, block=block)
        return [_item(stream, entry_id, fields) for stream, entries in reply or () for entry_id, fields in entries]

    async def reclaim(self, min_idle_seconds: float, count: int) -> list[WorkItem]:
        """Items other consumers have held without a sign of life for `min_idle_seconds`."""
        items: list[WorkItem] = []
        for stream in (self.first, self.rest):
            if len(items) < count:
                _, claimed, _ = await self._client.xautoclaim(
                    stream, WORK_GROUP, self.consumer, int(min_idle_seconds * 1000), count=count - len(items)
                )
                items += [_item(stream, entry_id, fields) for entry_id, fields in claimed if fields]
        return items

    async def keep(self, items: list[WorkItem]) -> None:
        """Renew this consumer's claim on items it still works on."""
        for stream in (self.first, self.rest):
            ids = [item.entry_id for item in items if item.stream == stream]
            if ids:
                await self._client.xclaim(stream, WORK_GROUP, self.consumer, 0, ids, justid=True)

    async def done(self, item: WorkItem) -> None:
        """The item's image is recorded: it leaves the queue for good."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xack(item.stream, WORK_GROUP, item.entry_id)
            pipe.xdel(item.stream, item.entry_id)
            pipe.srem(self.tracked, item.member)
            await pipe.execute()

    async def untrack(self, job_id: str, indexes: list[int]) -> None:
        if indexes:
            await self._client.srem(self.tracked, *(f"{job_id}:{index}" for index in indexes))

    async def untracked(self, images: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Those of the images no queue holds."""
        if not images:
            return []
        held = await self._client.smismember(self.tracked, [f"{job_id}:{index}" for job_id, index in images])
        return [image for image, is_held in zip(images, held) if not is_held]

    async def lock(self, name: str, seconds: float) -> bool:
        """A lock that expires by itself: whoever takes it does a periodic chore alone."""
        return bool(await self._client.set(self._link.key("lock", name), self.consumer, nx=True, px=int(seconds * 1000)))

    async def first_since_reset(self) -> bool:
        """True once after Redis has started empty (or lost its data): then the queues are gone
        and the sweep must put every unfinished image back."""
        return bool(await self._client.set(self._link.key("epoch"), self.consumer, nx=True))

    # Cancels reach the workers as messages; a worker that misses one finishes the image and
    # finds it already canceled when it records it.

    async def announce_cancel(self, job_id: str) -> None:
        await self._client.publish(self._link.key("cancel"), job_id)

    async def cancels(self) -> AsyncIterator[str]:
        pubsub = self._client.pubsub()
        await pubsub.subscribe(self._link.key("cancel"))
        try:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    yield message["data"]
        finally:
            await pubsub.aclose()


def _item(stream: str, entry_id: str, fields: dict[str, str]) -> WorkItem:
    return WorkItem(stream, entry_id, fields["job"], int(fields["index"]))
