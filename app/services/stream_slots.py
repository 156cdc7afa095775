"""How many job streams each user holds open, so that no one user can hold the connections
everyone shares. In one process, counted here; scaled out, counted in Redis across replicas
as well, each slot a lease its replica renews, so that the slots of a replica that dies lapse
within LEASE_SECONDS."""

import asyncio
import logging
import uuid
from collections import Counter

from redis.exceptions import RedisError

from app.core.redis_link import RedisLink

logger = logging.getLogger("myflix.streams")

# A stream lasts as long as its job; a refused client may try again this soon.
RETRY_AFTER_SECONDS = 5
LEASE_SECONDS = 30.0

# KEYS[1]: the owner's sorted set of slots (score: when the lease lapses, in ms).
# ARGV: slot, per-user limit, lease in ms. 1 if taken, 0 if the owner holds every slot.
_TAKE = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
# KEYS: the owners' sets, one per slot; ARGV: the lease in ms, then the slots in KEYS' order.
_RENEW = """
local now = redis.call('TIME')
local lapses = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
    redis.call('ZADD', key, 'XX', lapses, ARGV[i + 1])
    redis.call('PEXPIRE', key, tonumber(ARGV[1]))
end
return 1
"""


class TooManyStreamsError(Exception):
    retry_after = RETRY_AFTER_SECONDS


class StreamSlot:
    """One stream's place in its owner's count: taken once it is sure to be sent, given back
    whenever it ends (giving back a slot never taken, or twice, does nothing)."""

    def __init__(self, slots: "StreamSlots", owner: str) -> None:
        self.slots = slots
        self.owner = owner
        self.id = uuid.uuid4().hex
        self.held = False

    async def take(self) -> None:
        """Raises TooManyStreamsError when the owner holds every slot already."""
        if not self.held:
            await self.slots.take(self)
            self.held = True

    async def release(self) -> None:
        if self.held:
            self.held = False
            await self.slots.give_back(self)


class StreamSlots:
    """Counted in this process."""

    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._open: Counter[str] = Counter()

    def slot(self, owner: str) -> StreamSlot:
        return StreamSlot(self, owner)

    def open_streams(self, owner: str) -> int:
        return self._open[owner]

    async def take(self, slot: StreamSlot) -> None:
        self._take_here(slot.owner)

    async def give_back(self, slot: StreamSlot) -> None:
        self._give_back_here(slot.owner)

    async def close(self) -> None:
        pass

    def _refusal(self) -> TooManyStreamsError:
        return TooManyStreamsError(
            f"Too many open streams: at most {self.per_user} per user; close one or try again later"
        )

    def _take_here(self, owner: str) -> None:
        if self._open[owner] >= self.per_user:
            raise self._refusal()
        self._open[owner] += 1

    def _give_back_here(self, owner: str) -> None:
        self._open[owner] -= 1
        if self._open[owner] <= 0:
            del self._open[owner]


class RedisStreamSlots(StreamSlots):
    """Counted in this process and across replicas in Redis. While Redis does not answer,
    the count of this process alone bounds its streams."""

    def __init__(self, link: RedisLink, per_user: int, lease_seconds: float = LEASE_SECONDS) -> None:
        super().__init__(per_user)
        self._link = link
        self._lease_ms = int(lease_seconds * 1000)
        # Renewed thrice a lease: one late or failed renewal lets no slot lapse.
        self._renew_every = lease_seconds / 3
        # Lapse times by Redis's clock, the one every replica shares.
        self._take_script = link.client.register_script(_TAKE)
        self._renew_script = link.client.register_script(_RENEW)
        self._leased: dict[str, StreamSlot] = {}
        self._renewing: asyncio.Task[None] | None = None

    def _key(self, owner: str) -> str:
        return self._link.key("streams", owner)

    async def take(self, slot: StreamSlot) -> None:
        self._take_here(slot.owner)
        try:
            taken = await self._take_script(keys=[self._key(slot.owner)], args=[slot.id, self.per_user, self._lease_ms])
        except RedisError as exc:
            logger.warning("Streams counted in this process only: Redis does not answer (%s)", exc)
            return
        except BaseException:
            self._give_back_here(slot.owner)
            raise
        if not taken:
            self._give_back_here(slot.owner)
            raise self._refusal()
        self._leased[slot.id] = slot
        self._start_renewing()

    async def give_back(self, slot: StreamSlot) -> None:
        self._give_back_here(slot.owner)
        if self._leased.pop(slot.id, None) is not None:
            try:
                await self._link.client.zrem(self._key(slot.owner), slot.id)
            except RedisError:
                pass  # its lease lapses

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            self._renewing = None

    def _start_renewing(self) -> None:
        if self._renewing is None:
            self._renewing = asyncio.create_task(
                self._link.keep_running("stream slot leases", self._renew_for_good), name="stream-slot-leases"
            )

    async def _renew_for_good(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every)
            await self.renew()

    async def renew(self) -> None:
        """Extend the lease of every slot this process holds."""
        if not self._leased:
            return
        slots = list(self._leased.values())
        await self._renew_script(
            keys=[self._key(slot.owner) for slot in slots], args=[self._lease_ms, *(slot.id for slot in slots)]
        )


def stream_slots_for(per_user: int, link: RedisLink | None) -> StreamSlots:
    return StreamSlots(per_user) if link is None else RedisStreamSlots(link, per_user)
