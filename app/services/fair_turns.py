"""Turns at a scarce resource, shared fairly between keys: a key that floods it waits its turn
behind the others instead of in front of them. On the event loop only (no locks)."""

import asyncio
import itertools
from collections import Counter, deque


class QueueFullError(Exception):
    """This key already has as many acquires waiting as it may."""


class FairTurns:
    """At most `slots` turns held at once, at most `per_key` of them by one key, and at most
    `queue_per_key` acquires of one key waiting. A freed slot goes to the waiting key holding the
    fewest turns, and among those to the one served least recently, so a late key waits for one
    turn to end, not for every turn queued before it."""

    def __init__(self, slots: int, per_key: int, queue_per_key: int) -> None:
        self._slots = slots
        self._per_key = per_key
        self._queue_per_key = queue_per_key
        self._held: Counter[str] = Counter()
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._served_at: dict[str, int] = {}  # of keys holding or waiting for a turn
        self._serving = itertools.count()

    async def acquire(self, key: str) -> None:
        """Wait for a turn; raise QueueFullError at once if `key` has too many waiting."""
        if key not in self._waiting and self._may_hold(key):
            self._grant(key)
            return
        queue = self._waiting.setdefault(key, deque())
        if len(queue) >= self._queue_per_key:
            raise QueueFullError
        turn = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted, but canceled before it was taken
                self.release(key)
            else:
                self._forget_waiter(key, turn)
            raise

    def release(self, key: str) -> None:
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]
        self._tidy(key)
        self._hand_out()

    def _may_hold(self, key: str) -> bool:
        return self._held.total() < self._slots and self._held[key] < self._per_key

    def _grant(self, key: str) -> None:
        self._held[key] += 1
        self._served_at[key] = next(self._serving)

    def _hand_out(self) -> None:
        while self._held.total() < self._slots:
            candidates = [key for key in self._waiting if self._held[key] < self._per_key]
            if not candidates:
                return
            key = min(candidates, key=lambda k: (self._held[k], self._served_at.get(k, -1)))
            queue = self._waiting[key]
            turn = queue.popleft()
            if not queue:
                del self._waiting[key]
            if turn.done():  # its waiter was canceled: nothing to hand over
                self._tidy(key)
            else:
                self._grant(key)
                turn.set_result(None)

    def _forget_waiter(self, key: str, turn: asyncio.Future[None]) -> None:
        queue = self._waiting.get(key)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del self._waiting[key]
            self._tidy(key)

    def _tidy(self, key: str) -> None:
        """Forget when a key that neither holds nor waits was served: memory stays bounded."""
        if key not in self._held and key not in self._waiting:
            self._served_at.pop(key, None)
