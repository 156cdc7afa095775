"""The provider's budget of prediction creates: PROVIDER_MAX_CREATES_PER_MINUTE, at most
PROVIDER_CREATE_BURST at once after a quiet spell, one budget for the whole deployment.

The work queues spend it: an image leaves its queue only with a create granted, so images
waiting for the budget stay queued with their positions, and the queue's order (first images
first) decides which image a create goes to. A 429 that comes anyway holds every create for
its Retry-After, and the budget starts again from empty.

A token bucket: `TokenBucket` in this process (the embedded default), `RedisCreateBudget` for
every process of a scaled-out deployment, the same algorithm on Redis's clock."""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as redis

from app.core.redis_link import RedisLink

logger = logging.getLogger("myflix.jobs")


@dataclass(frozen=True)
class Grant:
    granted: int  # creates that may be sent now
    retry_in: float  # with none granted: seconds until one may be


class CreateBudget(Protocol):
    async def grant(self, wanted: int) -> Grant:
        """Up to `wanted` creates, now."""
        ...

    async def give_back(self, unused: int) -> None:
        """Creates granted that were not sent (there was no work for them)."""
        ...

    async def slow_down(self, seconds: float) -> None:
        """The provider answered 429: no creates for `seconds`, in any process."""
        ...


# Refills are sums of small floats: a whole create can come out a hair short of 1.
_ROUNDING = 1e-9


class TokenBucket:
    """The budget of one process. Synchronous, for the in-process scheduler, which never
    waits: it asks again when `retry_in` has passed."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._paused_until = -math.inf

    def take(self, wanted: int) -> Grant:
        now = self._refill()
        if now < self._paused_until:
            return Grant(0, self._paused_until - now)
        granted = min(wanted, math.floor(self._tokens + _ROUNDING))
        self._tokens -= granted
        return Grant(granted, 0.0 if granted else (1.0 - self._tokens) / self._rate)

    def give_back(self, unused: int) -> None:
        self._refill()
        self._tokens = min(self._burst, self._tokens + unused)

    def slow_down(self, seconds: float) -> None:
        now = self._refill()
        self._paused_until = max(self._paused_until, now + seconds)
        self._tokens = 0.0

    def _refill(self) -> float:
        now = self._clock()
        # Nothing accrues while paused: after a 429 the budget starts again from empty.
        accrued = max(0.0, now - max(self._at, self._paused_until)) * self._rate
        self._tokens = min(self._burst, self._tokens + accrued)
        self._at = now
        return now


class InProcessCreateBudget:
    """A process's bucket, as the CreateBudget the image runner reports 429s to."""

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket

    async def grant(self, wanted: int) -> Grant:
        return self.bucket.take(wanted)

    async def give_back(self, unused: int) -> None:
        self.bucket.give_back(unused)

    async def slow_down(self, seconds: float) -> None:
        self.bucket.slow_down(seconds)


# TokenBucket's algorithm in one atomic script, on Redis's clock (the one every process
# shares). ARGV: rate per ms, burst, wanted, given back, pause in ms. Returns
# {granted, ms until the next create}.
_BUCKET_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local wanted, given_back, pause = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'paused_until')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
local paused_until = tonumber(state[3]) or 0
tokens = math.min(burst, tokens + math.max(0, now - math.max(at, paused_until)) * rate)
if pause > 0 then
  paused_until = math.max(paused_until, now + pause)
  tokens = 0
end
tokens = math.min(burst, tokens + given_back)
local granted, wait = 0, 0
if now < paused_until then
  wait = paused_until - now
else
  granted = math.min(wanted, math.floor(tokens + 1e-9))
  tokens = tokens - granted
  if granted == 0 then wait = (1 - tokens) / rate end
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now), 'paused_until', tostring(paused_until))
redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(paused_until - now, 0) + burst / rate) + 60000)
return {granted, math.ceil(wait)}
"""


class RedisCreateBudget:
    """The deployment's budget, in Redis. While Redis cannot be reached, creates go unshaped
    (a 429 is retried by the provider): Redis carries no job, and its outage must not stop
    images being made."""

    def __init__(self, link: RedisLink, per_minute: float, burst: int) -> None:
        self._link = link
        self._rate_per_ms = per_minute / 60_000.0
        self._burst = burst
        self._script = link.client.register_script(_BUCKET_SCRIPT)
        self._key = link.key("provider-creates")

    async def grant(self, wanted: int) -> Grant:
        return await self._run(wanted, 0, 0.0, unreachable=Grant(wanted, 0.0))

    async def give_back(self, unused: int) -> None:
        await self._run(0, unused, 0.0, unreachable=Grant(0, 0.0))

    async def slow_down(self, seconds: float) -> None:
        await self._run(0, 0, seconds, unreachable=Grant(0, 0.0))

    async def _run(self, wanted: int, given_back: int, pause_seconds: float, unreachable: Grant) -> Grant:
        try:
            granted, wait_ms = await self._script(
                keys=[self._key],
                args=[self._rate_per_ms, self._burst, wanted, given_back, math.ceil(pause_seconds * 1000)],
            )
        except (redis.RedisError, OSError) as exc:
            logger.warning("the provider's create budget is unreachable; creates go unshaped: %s", exc)
            return unreachable
        return Grant(int(granted), int(wait_ms) / 1000)
