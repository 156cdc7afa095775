"""A job's events: appended once, read by any number of subscribers from any point.

Every subscriber keeps its own cursor into one shared list, so late subscribers, resumes
and several readers at once all see the whole stream, and a slow reader holds no one up.
"""

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class JobEvent:
    id: int  # 1, 2, 3 … within the job; the SSE `id`
    name: str  # the SSE `event`
    data: str  # JSON on one line, serialised once for every subscriber

    @cached_property
    def wire(self) -> bytes:
        """The event as Server-Sent Events bytes, encoded once however many subscribers send it."""
        return f"id: {self.id}\r\nevent: {self.name}\r\ndata: {self.data}\r\n\r\n".encode()


KEEPALIVE_WIRE = b"event: keepalive\r\ndata: {}\r\n\r\n"


class EventLog:
    def __init__(self) -> None:
        self._events: list[JobEvent] = []
        self._closed = False
        self._appended = asyncio.Event()

    @classmethod
    def replay(cls, events: Iterable["JobEvent"], closed: bool = True) -> "EventLog":
        """A log holding stored events; closed unless the job goes on."""
        log = cls()
        log._events.extend(events)
        log._closed = closed
        return log

    def all(self) -> list[JobEvent]:
        return list(self._events)

    def append(self, event: JobEvent) -> None:
        if self._closed:
            raise RuntimeError("event log is closed")
        if event.id != len(self._events) + 1:
            raise ValueError(f"event {event.id} out of order after {len(self._events)}")
        self._events.append(event)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        # Waiters hold the old Event; setting it wakes them all, the new one starts unset.
        self._appended.set()
        self._appended = asyncio.Event()

    async def follow(self, after_id: int, keepalive_seconds: float) -> AsyncIterator[JobEvent | None]:
        """Events with id > after_id until the log closes; None after each quiet interval."""
        position = max(after_id, 0)
        while True:
            while position < len(self._events):
                position += 1
                yield self._events[position - 1]
            if self._closed:
                return
            appended = self._appended
            try:
                async with asyncio.timeout(keepalive_seconds):
                    await appended.wait()
            except TimeoutError:
                yield None
