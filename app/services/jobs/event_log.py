"""A job's events in one process: added once, in order, read by any number of followers from
any point.

Every follower keeps its own cursor into one shared list, so late followers, resumes and
several readers at once all see the whole stream, and a slow reader holds no one up. Events
may be added out of order (two publishers of one job, or the past read from storage while
the present arrives): one that comes early waits until the gap before it is filled, so
followers only ever see ids 1, 2, 3 … with nothing missing or twice.
"""

import asyncio
from collections.abc import AsyncIterator

from app.services.jobs.domain import JobEvent


class EventStreamInterrupted(Exception):
    """The events stopped coming for a reason other than the job's end; reconnect later."""


class EventLog:
    def __init__(self) -> None:
        self._events: list[JobEvent] = []
        self._early: dict[int, JobEvent] = {}  # come before the events before them
        self._closed = False
        self._interrupted = False
        self._appended = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._events)

    @property
    def gapped(self) -> bool:
        """Whether events wait here for ones before them that have not come."""
        return bool(self._early)

    def add(self, event: JobEvent) -> None:
        """Take the event in its place; one seen already, or any after the log closed, is
        ignored. The log closes with the job's last event."""
        if self._closed or event.id <= len(self._events):
            return
        self._early[event.id] = event
        added = False
        while (following := self._early.pop(len(self._events) + 1, None)) is not None:
            self._events.append(following)
            added = True
            if following.terminal:
                self._closed = True
                self._early.clear()
                break
        if added:
            self._wake()

    def interrupt(self) -> None:
        """End every follower with EventStreamInterrupted: the source of events is gone."""
        self._interrupted = True
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        # Waiters hold the old Event; setting it wakes them all, the new one starts unset.
        self._appended.set()
        self._appended = asyncio.Event()

    async def follow(self, after_id: int, keepalive_seconds: float) -> AsyncIterator[list[JobEvent] | None]:
        """Events with id > after_id until the log closes, each time all that have come since
        the last (so that a burst costs a follower one write, not one per event); None after
        each quiet interval."""
        position = max(after_id, 0)
        while True:
            if position < len(self._events):
                batch = self._events[position:]
                position += len(batch)
                yield batch
                continue  # more may have come while this batch was being sent
            if self._closed:
                if self._interrupted:
                    raise EventStreamInterrupted
                return
            appended = self._appended
            try:
                async with asyncio.timeout(keepalive_seconds):
                    await appended.wait()
            except TimeoutError:
                yield None
