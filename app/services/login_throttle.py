"""Slows down password guessing. Within a window, one client may fail `max_failures` sign-ins
for one account, and all clients together `max_failures_per_account`; then the account is
refused to that client, or to everyone, until the window frees a slot. The bound per client
locks no one else out; the bound per account caps what many addresses can guess together, at
the price that they can lock the owner out for a window.

An attempt counts as failed from the moment it begins, before its password is checked, so a
burst of concurrent guesses gets no more checks than the bound. In memory: one process."""

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass


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

    def succeeded(self) -> None:
        """The client proved it knows the password: its failures for the account are forgotten."""
        self._throttle._forget_client(self._account, self._client)

    def withdraw(self) -> None:
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

    def begin(self, account: str, client: str) -> LoginAttempt:
        """Count an attempt as failed now; raise LoginThrottledError instead if either bound
        is reached. Synchronous, so concurrent attempts are counted one after another."""
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
