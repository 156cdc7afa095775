"""Slows down password guessing. Within a window, one client may fail `max_failures` sign-ins
for one account, and all clients together `max_failures_per_account`; then the account is
refused to that client, or to everyone, until the window frees a slot. The bound per client
locks no one else out; the bound per account caps what many addresses can guess together, at
the price that they can lock the owner out for a window.

An attempt counts as failed from the moment it begins, before its password is checked, so a
burst of concurrent guesses gets no more checks than the bound. In memory, in one process;
scaled out, in Redis as well, so that guesses split across replicas count together."""

import hashlib
import logging
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from redis.exceptions import RedisError

from app.core.redis_link import RedisLink

logger = logging.getLogger("myflix.auth")


class LoginThrottledError(Exception):
    message = "Too many failed sign-ins; try again later."

    def __init__(self, retry_after: int) -> None:
        super().__init__(self.message)
        self.retry_after = retry_after


@dataclass(eq=False)  # compared by identity: an attempt removes its own entry, not an equal one
class _Failure:
    at: float
    client: str


class LoginAttempt:
    """Counted as a failure unless it succeeds or is withdrawn."""

    def __init__(self, throttle: "LoginThrottle", account: str, client: str, failure: _Failure) -> None:
        self._throttle = throttle
        self._account = account
        self._client = client
        self._failure = failure

    async def succeeded(self) -> None:
        """The client proved it knows the password: its failures for the account are forgotten."""
        self._throttle._forget_client(self._account, self._client)

    async def withdraw(self) -> None:
        """The password was never checked (the attempt was refused or broke off before)."""
        self._throttle._forget_failure(self._account, self._client, self._failure)


class LoginThrottle:
    def __init__(
        self,
        *,
        max_failures: int,
        max_failures_per_account: int,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_failures = max_failures
        self._max_failures_per_account = max_failures_per_account
        self._window = window_seconds
        self._clock = clock
        # Pairs and accounts remembered at most; the least recently failed are forgotten first.
        self.max_tracked = 100_000
        self._by_pair: OrderedDict[Hashable, deque[_Failure]] = OrderedDict()
        self._by_account: OrderedDict[Hashable, deque[_Failure]] = OrderedDict()

    async def enter(self, account: str, client: str) -> LoginAttempt:
        """Count an attempt as failed now; raise LoginThrottledError instead if either bound
        is reached."""
        return self.begin(account, client)

    def begin(self, account: str, client: str) -> LoginAttempt:
        """`enter` in this process: synchronous, so concurrent attempts are counted one after
        another."""
        now = self._clock()
        by_pair = self._recent(self._by_pair, (account, client), now)
        by_account = self._recent(self._by_account, account, now)
        waits = [
            failures[0].at + self._window - now
            for failures, bound in ((by_pair, self._max_failures), (by_account, self._max_failures_per_account))
            if len(failures) >= bound
        ]
        if waits:
            raise LoginThrottledError(max(1, math.ceil(max(waits))))
        failure = _Failure(now, client)
        self._remember(self._by_pair, (account, client), by_pair, failure)
        self._remember(self._by_account, account, by_account, failure)
        return LoginAttempt(self, account, client, failure)

    def _recent(self, table: OrderedDict[Hashable, deque[_Failure]], key: Hashable, now: float) -> deque[_Failure]:
        failures = table.get(key)
        if failures is None:
            return deque()
        horizon = now - self._window
        while failures and failures[0].at <= horizon:
            failures.popleft()
        return failures

    def _remember(
        self, table: OrderedDict[Hashable, deque[_Failure]], key: Hashable, failures: deque[_Failure], failure: _Failure
    ) -> None:
        failures.append(failure)
        table[key] = failures
        table.move_to_end(key)
        while len(table) > self.max_tracked:
            table.popitem(last=False)

    def _forget_client(self, account: str, client: str) -> None:
        self._by_pair.pop((account, client), None)
        self._drop(self._by_account, account, lambda failure: failure.client == client)

    def _forget_failure(self, account: str, client: str, failure: _Failure) -> None:
        for table, key in ((self._by_pair, (account, client)), (self._by_account, account)):
            self._drop(table, key, lambda recorded: recorded is failure)

    @staticmethod
    def _drop(
        table: OrderedDict[Hashable, deque[_Failure]], key: Hashable, forgotten: Callable[[_Failure], bool]
    ) -> None:
        failures = table.get(key)
        if failures is None:
            return
        kept = deque(failure for failure in failures if not forgotten(failure))
        if kept:
            table[key] = kept
        else:
            del table[key]


# KEYS: the (account, client) pair's sorted set of failures, the account's. ARGV: the failure's
# member, the window in ms, the pair's bound, the account's. Scores are Redis's clock (ms), the
# one every replica shares. 0 if counted; else the ms until either set frees a slot.
_BEGIN = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local window = tonumber(ARGV[2])
local wait = 0
for i, key in ipairs(KEYS) do
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    if redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then
        local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
        wait = math.max(wait, tonumber(oldest[2]) + window - now)
    end
end
if wait > 0 then
    return wait
end
for _, key in ipairs(KEYS) do
    redis.call('ZADD', key, now, ARGV[1])
    redis.call('PEXPIRE', key, window)
end
return 0
"""
# KEYS: as above. ARGV: the client's member prefix. Its failures for the account are forgotten.
_SUCCEEDED = """
redis.call('DEL', KEYS[1])
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if string.sub(member, 1, #ARGV[1]) == ARGV[1] then
        redis.call('ZREM', KEYS[2], member)
    end
end
return 1
"""


class SharedLoginAttempt(LoginAttempt):
    """Counted in Redis."""

    def __init__(self, throttle: "RedisLoginThrottle", keys: list[str], client: str, member: str) -> None:
        self._shared = throttle
        self._keys = keys
        self._client = client
        self._member = member

    async def succeeded(self) -> None:
        await self._shared.forget_client(self._keys, self._client)

    async def withdraw(self) -> None:
        await self._shared.forget_failure(self._keys, self._member)


class RedisLoginThrottle(LoginThrottle):
    """Bounds counted across replicas in Redis; while Redis does not answer, in this process,
    which alone then bounds its sign-ins."""

    def __init__(
        self, link: RedisLink, *, max_failures: int, max_failures_per_account: int, window_seconds: float
    ) -> None:
        super().__init__(
            max_failures=max_failures, max_failures_per_account=max_failures_per_account, window_seconds=window_seconds
        )
        self._link = link
        self._window_ms = max(1, int(window_seconds * 1000))
        self._begin_script = link.client.register_script(_BEGIN)
        self._succeeded_script = link.client.register_script(_SUCCEEDED)

    def _keys(self, account: str, client: str) -> list[str]:
        # Digests: an email or an address chosen by a client never becomes a key's text.
        pair = _digest(f"{account}\0{client}")
        return [self._link.key("logins", "pair", pair), self._link.key("logins", "account", _digest(account))]

    async def enter(self, account: str, client: str) -> LoginAttempt:
        keys, member = self._keys(account, client), f"{client}|{uuid.uuid4().hex}"
        bounds = [self._max_failures, self._max_failures_per_account]
        try:
            wait_ms = int(await self._begin_script(keys=keys, args=[member, self._window_ms, *bounds]))
        except RedisError as exc:
            logger.warning("Sign-ins counted in this process only: Redis does not answer (%s)", exc)
            return self.begin(account, client)
        if wait_ms > 0:
            raise LoginThrottledError(max(1, math.ceil(wait_ms / 1000)))
        return SharedLoginAttempt(self, keys, client, member)

    async def forget_client(self, keys: list[str], client: str) -> None:
        try:
            await self._succeeded_script(keys=keys, args=[f"{client}|"])
        except RedisError:
            pass  # the failures lapse with the window

    async def forget_failure(self, keys: list[str], member: str) -> None:
        try:
            async with self._link.client.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.zrem(key, member)
                await pipe.execute()
        except RedisError:
            pass  # it lapses with the window


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def login_throttle_for(
    link: RedisLink | None, *, max_failures: int, max_failures_per_account: int, window_seconds: float
) -> LoginThrottle:
    if link is None:
        return LoginThrottle(
            max_failures=max_failures, max_failures_per_account=max_failures_per_account, window_seconds=window_seconds
        )
    return RedisLoginThrottle(
        link,
        max_failures=max_failures,
        max_failures_per_account=max_failures_per_account,
        window_seconds=window_seconds,
    )
