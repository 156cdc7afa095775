"""A job's events: appended once, read by any number of subscribers from any point.

Every subscriber keeps its own cursor into one shared list, so late subscribers, resumes
and several readers at once all see the whole stream, and a slow reader holds no one up.
"""

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from functools import cached_property

TERMINAL_EVENTS = frozenset({"done", "error"})


@dataclass(frozen=True)
class JobEvent:
    id: int  # 1, 2, 3 … within the job
    name: str  # the SSE `event`
    data: str  # JSON on one line, serialised once for every subscriber
    # The SSE `id`: the number itself, or with Redis the stream entry id, `<id>-0`.
    sse_id: str = ""

    @cached_property
    def wire(self) -> bytes:
        """The event as Server-Sent Events bytes, encoded once however many subscribers send it."""
        return f"id: {self.sse_id or self.id}\r\nevent: {self.name}\r\ndata: {self.data}\r\n\r\n".encode()


KEEPALIVE_WIRE = b"event: keepalive\r\ndata: {}\r\n\r\n"
# Sent before a stream ends because its events cannot be read right now: EventSource waits
# `retry` ms and reconnects with Last-Event-ID, and the stream resumes where it stopped.
RECONNECT_WIRE = b"retry: 2000\r\n: events are unavailable for a moment; reconnect with Last-Event-ID\r\n\r\n"

_LAST_EVENT_ID = re.compile(r"(\d{1,18})(-0)?", re.ASCII)


def parse_last_event_id(value: str | None) -> int:
    """The event number a Last-Event-ID names (`7` or the Redis form `7-0`); 0 for anything we
    did not send, so that a browser's reconnect replays from the start rather than fails."""
    match = _LAST_EVENT_ID.fullmatch(value or "")
    return int(match[1]) if match else 0


class EventStreamInterrupted(Exception):
    """The events stopped coming for a reason other than the job's end; reconnect later."""


class EventLog:
    def __init__(self) -> None:
        self._events: list[JobEvent] = []
        self._closed = False
        self._interrupted = False
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

    def interrupt(self) -> None:
        """End every follower with EventStreamInterrupted: the source of events is gone."""
        self._interrupted = True
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._events)

    def _wake(self) -> None:
        # Waiters hold the old Event; setting it wakes them all, the new one starts unset.
        self._appended.set()
        self._appended = asyncio.Event()

    async def follow(self, after_id: int, keepalive_seconds: float) -> AsyncIterator[list[JobEvent] | None]:
        """Events with id > after_id until the log closes, each time all that have come since
        the last (so that a burst costs a subscriber one write, not one per event); None after
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
                    raise EventStreamInterrupted()
                return
            appended = self._appended
            try:
                async with asyncio.timeout(keepalive_seconds):
                    await appended.wait()
            except TimeoutError:
                yield None
