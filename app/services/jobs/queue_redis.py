"""Image work across processes over Redis.

- Two streams read by one consumer group, `work:first` (each job's first image) before
  `work:rest`, so no job's first image waits behind other jobs' later ones. A process reads
  only as many entries as it has workers asking, and during a burst of new jobs it keeps half
  of them for first images (the single process's rule).
- An entry stays pending until its image is recorded (at-least-once): the holder renews its
  claim every third of the claim timeout, and entries left unrenewed for two thirds of it are
  taken over by a process with a free worker, so a dead worker's image moves on.
- A set of the images queued or running, so that a sweep can find images that the database
  says are unfinished but no queue holds (Redis lost its data, or a process died between the
  commit and the enqueue).
- Cancels reach every process by pub/sub; one that misses it finds the image canceled when it
  records it.
"""

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from app.core.redis_link import BLOCK_MS, RedisLink
from app.services.jobs.domain import Job
from app.services.jobs.interfaces import OnTaken, QueueUnavailableError, Takers, WorkItem
from app.services.jobs.scheduler import BurstReserve

logger = logging.getLogger("myflix.redis")

WORK_GROUP = "workers"


@dataclass(frozen=True)
class _Entry:
    stream: str
    entry_id: str


class RedisWorkQueue:
    def __init__(self, link: RedisLink, workers: int, claim_timeout_seconds: float) -> None:
        self._link = link
        self._client = link.client
        self._first, self._rest = link.key("work", "first"), link.key("work", "rest")
        self._tracked = link.key("work", "images")
        self._consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._claim_timeout = claim_timeout_seconds
        # The single process's rule: during a burst of new jobs, half the workers wait for
        # first images rather than take later ones.
        self._burst = BurstReserve(workers)
        self._takers = Takers()
        self._wanted = asyncio.Event()  # a worker is asking
        self._ready: list[WorkItem] = []  # read, not handed out yet
        self._entries: dict[WorkItem, _Entry] = {}  # read and not done: renewed while held
        self._cancel_callbacks: list[Callable[[str], None]] = []
        self._reset_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._loops: list[asyncio.Task[None]] = []

    @property
    def unavailable(self) -> str | None:
        return self._link.unavailable

    @property
    def waiting_count(self) -> int:
        return len(self._ready)

    async def start(self) -> None:
        self._link.start()
        self._link.on_recovered(self._recover)
        try:
            await self._recover()
        except (RedisError, OSError) as exc:
            self._link.lost(exc)  # the link recovers when Redis answers
        self._loops = [
            asyncio.create_task(self._link.keep_running("work intake", self._consume), name="work-consume"),
            asyncio.create_task(self._link.keep_running("work claims", self._keep_claims), name="work-claims"),
            asyncio.create_task(self._link.keep_running("work cancels", self._follow_cancels), name="work-cancels"),
        ]

    async def close(self) -> None:
        for loop in self._loops:
            loop.cancel()

    def positions_for_new_job(self, count: int) -> list[int | None]:
        return [None] * count

    def position(self, job_id: str, index: int) -> int | None:
        return None

    async def push(self, job: Job, indexes: list[int], stored: Awaitable[None] | None = None) -> None:
        if stored is not None:
            await stored  # a worker must find the job when it takes the work
        # A job none of whose images has succeeded yet sends its lowest one ahead.
        first = None if any(image.status == "succeeded" for image in job.images) else min(indexes, default=None)
        try:
            # Only what no queue holds yet: a sweep and an admission may push the same image.
            added = await self._track(job.id, indexes)
            async with self._client.pipeline(transaction=True) as pipe:
                for index in added:
                    pipe.xadd(self._first if index == first else self._rest, {"job": job.id, "index": index})
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._link.lost(exc)
            raise QueueUnavailableError(str(exc)) from exc

    async def _track(self, job_id: str, indexes: list[int]) -> list[int]:
        async with self._client.pipeline(transaction=True) as pipe:
            for index in indexes:
                pipe.sadd(self._tracked, f"{job_id}:{index}")
            newly = await pipe.execute()
        return [index for index, new in zip(indexes, newly, strict=True) if new]

    async def take(self, on_taken: OnTaken | None = None) -> WorkItem:
        if self._ready:
            item = self._ready.pop(0)
            if on_taken is not None:
                on_taken(item)
            return item
        taker = self._takers.wait(on_taken)
        self._wanted.set()
        return await taker

    async def done(self, item: WorkItem) -> None:
        entry = self._entries.pop(item, None)
        if entry is None:
            return
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xack(entry.stream, WORK_GROUP, entry.entry_id)
            pipe.xdel(entry.stream, entry.entry_id)
            pipe.srem(self._tracked, f"{item.job_id}:{item.index}")
            await pipe.execute()

    def give_up(self, item: WorkItem) -> None:
        # No longer renewed: another process takes it over once its claim is old enough.
        self._entries.pop(item, None)

    async def cancel(self, job: Job) -> None:
        try:
            await self._client.publish(self._link.key("cancel"), job.id)
            await self._client.srem(self._tracked, *(f"{job.id}:{image.index}" for image in job.images))
        except (RedisError, OSError) as exc:
            self._link.lost(exc)
            raise QueueUnavailableError(str(exc)) from exc

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        self._cancel_callbacks.append(callback)

    async def untracked(self, images: list[tuple[str, int]]) -> list[tuple[str, int]]:
        if not images:
            return []
        held = await self._client.smismember(self._tracked, [f"{job_id}:{index}" for job_id, index in images])
        return [image for image, is_held in zip(images, held, strict=True) if not is_held]

    def on_reset(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._reset_callbacks.append(callback)

    async def lock(self, name: str, seconds: float) -> bool:
        if self._link.unavailable:
            return False
        key = self._link.key("lock", name)
        return bool(await self._client.set(key, self._consumer, nx=True, px=int(seconds * 1000)))

    # Inside --------------------------------------------------------------------------------

    async def _recover(self) -> None:
        await self._ensure_groups()
        # True once after Redis has started empty (or lost its data): then the queues are gone.
        if await self._client.set(self._link.key("epoch"), self._consumer, nx=True):
            logger.info("Redis started empty: every unfinished image goes back in the queue")
            for callback in self._reset_callbacks:
                await callback()

    async def _ensure_groups(self) -> None:
        for stream in (self._first, self._rest):
            try:
                await self._client.xgroup_create(stream, WORK_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _hand_over(self, item: WorkItem, entry: _Entry) -> None:
        self._entries[item] = entry
        if not self._takers.hand(item):
            self._ready.append(item)

    def _asking(self) -> int:
        return len(self._takers)

    async def _consume(self) -> None:
        while True:
            if not self._asking():
                self._wanted.clear()
                await self._wanted.wait()
                continue
            free = self._asking()
            held = self._burst.holds(free)
            if held:
                taken = await self._read(free, later=0, wait_seconds=held)
            else:
                # Above the reserve, later images may take only what is above it.
                reserve = self._burst.reserve
                taken = await self._read(free, later=free - reserve if free > reserve else free)
            for item, entry in taken:
                if entry.stream == self._first:
                    self._burst.arrived()
                self._hand_over(item, entry)

    async def _read(
        self, count: int, later: int, wait_seconds: float = BLOCK_MS / 1000
    ) -> list[tuple[WorkItem, _Entry]]:
        """Up to `count` items, first images first, and of other images at most `later`;
        waits up to `wait_seconds` when there are none."""
        items = await self._read_group({self._first: ">"}, count, block=None)
        if later and len(items) < count:
            items += await self._read_group({self._rest: ">"}, min(later, count - len(items)), block=None)
        if not items:
            # A wait on both streams brings up to one item from each.
            streams = {self._first: ">", self._rest: ">"} if later else {self._first: ">"}
            items = await self._read_group(streams, 1, block=max(1, int(wait_seconds * 1000)))
            for _, extra in items[count:]:
                await self._give_back(extra)
        return items[:count]

    async def _give_back(self, entry: _Entry) -> None:
        """Return an entry this process cannot start now, so that a free worker elsewhere takes
        it rather than it waiting here."""
        fields: Any = await self._client.xrange(entry.stream, entry.entry_id, entry.entry_id)
        async with self._client.pipeline(transaction=True) as pipe:
            if fields:
                pipe.xadd(entry.stream, fields[0][1])
            pipe.xack(entry.stream, WORK_GROUP, entry.entry_id)
            pipe.xdel(entry.stream, entry.entry_id)
            await pipe.execute()

    async def _read_group(
        self, streams: dict[Any, Any], count: int, block: int | None
    ) -> list[tuple[WorkItem, _Entry]]:
        reply: Any
        try:
            reply = await self._client.xreadgroup(WORK_GROUP, self._consumer, streams, count=count, block=block)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_groups()  # Redis started empty; its epoch check follows
            return []
        return [_item(stream, entry_id, fields) for stream, entries in reply or () for entry_id, fields in entries]

    async def _keep_claims(self) -> None:
        """Renew the claims on held work every third of the claim timeout, and take over work
        left unrenewed for two thirds of it (looked for every sixth): a live process's claims
        are never that old, and a dead one's work moves on within the timeout."""
        renewed_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._claim_timeout / 6)
            if loop.time() - renewed_at >= self._claim_timeout / 3:
                await self._renew(list(self._entries.values()))
                renewed_at = loop.time()
            room = self._asking()
            if room > 0:
                taken = await self._reclaim(self._claim_timeout * 2 / 3, room)
                if taken:
                    logger.info("took over %d images from a worker that went quiet", len(taken))
                for item, entry in taken:
                    self._hand_over(item, entry)

    async def _renew(self, entries: list[_Entry]) -> None:
        for stream in (self._first, self._rest):
            ids: list[Any] = [entry.entry_id for entry in entries if entry.stream == stream]
            if ids:
                await self._client.xclaim(stream, WORK_GROUP, self._consumer, 0, ids, justid=True)

    async def _reclaim(self, min_idle_seconds: float, count: int) -> list[tuple[WorkItem, _Entry]]:
        """Entries other consumers have held without a sign of life for `min_idle_seconds`."""
        items: list[tuple[WorkItem, _Entry]] = []
        for stream in (self._first, self._rest):
            if len(items) < count:
                _, claimed, _ = await self._client.xautoclaim(
                    stream, WORK_GROUP, self._consumer, int(min_idle_seconds * 1000), count=count - len(items)
                )
                items += [_item(stream, entry_id, fields) for entry_id, fields in claimed if fields]
        return items

    async def _follow_cancels(self) -> None:
        pubsub = self._client.pubsub()
        await pubsub.subscribe(self._link.key("cancel"))
        try:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    for callback in self._cancel_callbacks:
                        callback(message["data"])
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]


def _item(stream: str, entry_id: str, fields: dict[str, str]) -> tuple[WorkItem, _Entry]:
    return WorkItem(fields["job"], int(fields["index"])), _Entry(stream, entry_id)
