"""Slows down password guessing: after N failed logins for one account from one client within
a window, that pair must wait. Keyed by account *and* client, so a guesser can lock out
neither the account's owner nor anyone else. In memory: one process."""

import time
from collections import OrderedDict, deque


class LoginThrottledError(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many failed sign-ins; try again later.")
        self.retry_after = retry_after


class LoginThrottle:
    MAX_TRACKED = 100_000  # pairs remembered at most; the oldest are forgotten first

    def __init__(self, max_failures: int, window_seconds: float) -> None:
        self._max_failures = max_failures
        self._window = window_seconds
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def check(self, account: str, client: str) -> None:
        """Raise LoginThrottledError while this pair has used up its failures."""
        failures = self._recent(account, client)
        if len(failures) >= self._max_failures:
            raise LoginThrottledError(max(1, int(failures[0] + self._window - time.monotonic()) + 1))

    def failed(self, account: str, client: str) -> None:
        key = (account, client)
        self._recent(account, client).append(time.monotonic())
        self._failures.move_to_end(key)
        while len(self._failures) > self.MAX_TRACKED:
            self._failures.popitem(last=False)

    def succeeded(self, account: str, client: str) -> None:
        self._failures.pop((account, client), None)

    def _recent(self, account: str, client: str) -> deque[float]:
        failures = self._failures.setdefault((account, client), deque())
        horizon = time.monotonic() - self._window
        while failures and failures[0] <= horizon:
            failures.popleft()
        return failures
