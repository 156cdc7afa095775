"""A job's events carried within this process: one log per job in memory, which every follower
reads. A job followed before anything of it was published here (say, resumed after a restart)
starts from what is stored, and what is published after joins it in its place."""

import asyncio
import logging
from collections.abc import AsyncIterator

from app.services.jobs.domain import JobEvent
from app.services.jobs.event_log import EventLog
from app.services.jobs.interfaces import StoredEvents

logger = logging.getLogger("myflix.jobs")

# How long events that came before their predecessors wait for them to be published here
# before the gap is filled from storage.
CATCH_UP_AFTER_SECONDS = 1.0


class InProcessEventBus:
    def __init__(self, stored_events: StoredEvents) -> None:
        self._stored_events = stored_events  # (job, after id): committed events, in order
        self._logs: dict[str, EventLog] = {}  # jobs whose last event has not been published
        self._catching_up: set[asyncio.Task[None]] = set()

    @property
    def unavailable(self) -> str | None:
        return None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.interrupt_all()

    async def publish(self, job_id: str, events: list[JobEvent]) -> None:
        if not events:
            return
        log = self._logs.get(job_id)
        if log is None:
            log = self._logs[job_id] = EventLog()
            if events[0].id > 1:
                # The events before these are on their way (a job's first image can be recorded
                # before its acceptance is published) or were published before this log existed:
                # read them from storage only if they do not come.
                asyncio.get_running_loop().call_later(CATCH_UP_AFTER_SECONDS, self._catch_up_if_gapped, job_id, log)
        for event in events:
            log.add(event)
        self._drop_if_closed(job_id, log)

    async def follow(
        self, job_id: str, after_id: int, keepalive_seconds: float
    ) -> AsyncIterator[list[JobEvent] | None]:
        log = self._logs.get(job_id)
        if log is not None and log.gapped:
            await self._catch_up(job_id, log)  # a follower waits: fill the gap now
        if log is None:
            stored = await self._stored_events(job_id, 0)
            # Whatever was published meanwhile has a log now; the past goes in before it.
            log = self._logs.get(job_id)
            if log is None:
                log = self._logs[job_id] = EventLog()
            for event in stored:
                log.add(event)
            self._drop_if_closed(job_id, log)
        async for batch in log.follow(after_id, keepalive_seconds):
            yield batch

    async def forget(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self._logs.pop(job_id, None)

    def interrupt_all(self) -> None:
        logs, self._logs = self._logs, {}
        for log in logs.values():
            log.interrupt()

    def _catch_up_if_gapped(self, job_id: str, log: EventLog) -> None:
        if log.gapped and self._logs.get(job_id) is log:
            task = asyncio.create_task(self._catch_up(job_id, log))
            self._catching_up.add(task)
            task.add_done_callback(self._catching_up.discard)

    async def _catch_up(self, job_id: str, log: EventLog) -> None:
        try:
            stored = await self._stored_events(job_id, 0)
        except Exception:  # the past cannot be read now: followers come back for it later
            logger.warning("could not read the stored events of %s", job_id, exc_info=True)
            log.interrupt()
            if self._logs.get(job_id) is log:
                del self._logs[job_id]
            return
        for event in stored:
            log.add(event)
        self._drop_if_closed(job_id, log)

    def _drop_if_closed(self, job_id: str, log: EventLog) -> None:
        # Followers keep their log; new ones read the finished job from storage.
        if log.closed and self._logs.get(job_id) is log:
            del self._logs[job_id]
