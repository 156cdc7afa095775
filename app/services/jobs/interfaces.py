"""The three things the job service stands on, each with an in-process implementation (the
embedded default: one process does everything) and a scaled one (API replicas and workers
over PostgreSQL and Redis):

- `JobStore`: where jobs are kept and changed — one transactional call applies a transition.
- `EventBus`: where a job's events go — publish, and follow from an id.
- `WorkQueue`: where image work goes — push, take, done, cancel.
"""

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from app.db.faults import WriteHealth
from app.providers.base import StopSignal
from app.services.jobs.domain import Job, JobEvent, Update

Transition = Callable[[Job], Update | None]
# (job id, after id): the job's committed events, in order.
StoredEvents = Callable[[str, int], Awaitable[list[JobEvent]]]


class FirstImageHold(Protocol):
    """Lets the job's first finished image go out before the job's other images go on."""

    def wait_turn(self) -> None: ...

    def published(self) -> None: ...


class Admission(Protocol):
    """The job's insert, as an image handed over while it commits sees it."""

    def wait(self, stop: StopSignal) -> bool:
        """On a worker thread: True once the insert has committed, False if the job was
        withdrawn (or the image stopped) first."""
        ...


@dataclass(frozen=True, eq=False)
class WorkItem:
    """One image to make. `hold`: the job's FirstImageHold, where the queue has one; `job`:
    the job as this process holds it, where the queue has it (the worker need not read it);
    `admission`: where the item is handed over before its job is stored, what the provider
    call waits for."""

    job_id: str
    index: int
    hold: FirstImageHold | None = None
    job: Job | None = None
    admission: Admission | None = None


# Called with an item the moment it is handed to a worker, on the event loop, before `take`
# returns: the worker may start it there, without waiting for the loop's next turn (which a
# burst of requests can make long).
OnTaken = Callable[[WorkItem], None]


class Takers:
    """Workers of this process waiting for work, each with the future its item goes into."""

    def __init__(self) -> None:
        self._waiting: deque[tuple[asyncio.Future[WorkItem], OnTaken | None]] = deque()

    def __len__(self) -> int:
        self._waiting = deque(waiting for waiting in self._waiting if not waiting[0].done())
        return len(self._waiting)

    def wait(self, on_taken: OnTaken | None = None) -> "asyncio.Future[WorkItem]":
        taker: asyncio.Future[WorkItem] = asyncio.get_running_loop().create_future()
        self._waiting.append((taker, on_taken))
        return taker

    def hand(self, item: WorkItem) -> bool:
        """Give the item to the worker that has waited longest; False when none waits."""
        while self._waiting:
            taker, on_taken = self._waiting.popleft()
            if not taker.done():
                if on_taken is not None:
                    on_taken(item)
                taker.set_result(item)
                return True
        return False


class ActiveJobLimitError(Exception):
    """The owner has as many unfinished jobs as allowed: the new one was not stored."""


class DailyQuotaError(Exception):
    """The new job asks for more images than its owner has left today: it was not stored."""

    def __init__(self, images_left: int) -> None:
        super().__init__(f"{images_left} images left today")
        self.images_left = images_left


@dataclass(frozen=True)
class OwnerLimits:
    """What a new job's owner may have: unfinished jobs, and images per UTC day (None: any)."""

    max_unfinished: int
    daily_images: int | None


class QueueUnavailableError(Exception):
    """The work queue cannot be reached right now."""


@dataclass(frozen=True)
class Applied:
    job: Job
    update: Update


class JobStore(Protocol):
    # Whether writes go through now, and who is told when that changes.
    write_health: WriteHealth

    async def start(self) -> None: ...

    async def close(self, timeout: float) -> None: ...

    def create(self, job: Job, update: Update, limits: OwnerLimits) -> Awaitable[None]:
        """Store a new job unless its owner would go past `limits` with it (and count its images
        on the owner's day), checked and stored at once, however many processes admit jobs
        together. The write is under way when this returns; the awaitable resolves once it is
        committed, or raises ActiveJobLimitError, DailyQuotaError, or ConflictingWriteError (its
        Idempotency-Key was taken)."""
        ...

    async def images_used(self, owner: str, day: date) -> int:
        """Images the owner's jobs of that UTC day count (those given back left out)."""
        ...

    def withdraw(self, job_id: str) -> Awaitable[bool]:
        """The new job's creator gave up on it: if it is not committed yet, it never will be.
        Resolves to whether it was committed after all (a commit was under way)."""
        ...

    async def apply(self, job_id: str, transition: Transition) -> Applied | None:
        """Apply `transition` to the job as stored and store what it changed, atomically (a
        write that fails for a passing cause is retried until it goes through); None when there
        is no such job."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def page(self, owner: str, limit: int, before: tuple[datetime, str] | None) -> list[Job]:
        """The owner's jobs, newest first, strictly after the `before` (created_at, id) key."""
        ...

    async def unfinished(self) -> list[Job]: ...

    async def find_idempotent(self, owner: str, key: str) -> Job | None: ...

    async def events(self, job_id: str, after_id: int = 0) -> list[JobEvent]: ...

    async def expired(self, finished_before: datetime, limit: int) -> list[Job]:
        """Up to `limit` finished jobs that finished before then, the oldest first."""
        ...

    async def delete(self, job_ids: list[str]) -> None:
        """Remove the finished jobs with their images' rows and their events, in one
        transaction (retried until it goes through, like every write)."""
        ...


class EventBus(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, job_id: str, events: list[JobEvent]) -> None:
        """Send committed events to every follower of the job, in any process."""
        ...

    def follow(self, job_id: str, after_id: int, keepalive_seconds: float) -> AsyncIterator[list[JobEvent] | None]:
        """The job's events after `after_id` until its last, in batches of all that have come;
        None after each quiet `keepalive_seconds`. Raises EventStreamInterrupted when the events
        cannot be read for a while (the follower reconnects later)."""
        ...

    def interrupt_all(self) -> None:
        """End every follower with EventStreamInterrupted."""
        ...

    async def forget(self, job_ids: list[str]) -> None:
        """The jobs are deleted: drop what is kept of their events (best effort)."""
        ...

    @property
    def unavailable(self) -> str | None:
        """Why events cannot be carried now; None while they can."""
        ...


class WorkQueue(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def unavailable(self) -> str | None:
        """Why work cannot be queued now; None while it can."""
        ...

    @property
    def waiting_count(self) -> int:
        """Images this process holds that wait for a worker."""
        ...

    async def depth(self) -> int:
        """Images waiting for a worker, in the whole deployment."""
        ...

    def positions_for_new_job(self, count: int) -> list[int | None]:
        """1-based places the images of a new job would get (None where unknown)."""
        ...

    def position(self, job_id: str, index: int) -> int | None: ...

    async def push(self, job: Job, indexes: list[int], stored: Awaitable[None] | None = None) -> list[int]:
        """Queue those of the job's images that no queue holds (waiting, or taken and not done),
        and answer which those were. `stored`: the job's insert, still committing; work must not
        be recorded before it, and the queue decides whether work may start before it. Raises
        QueueUnavailableError."""
        ...

    async def take(self, on_taken: OnTaken | None = None) -> WorkItem:
        """The next image this process should make; waits for one. `on_taken` is called with
        it as it is handed over."""
        ...

    async def done(self, item: WorkItem) -> None:
        """The item's image is recorded (or needs no work): it leaves the queue for good."""
        ...

    def give_up(self, item: WorkItem) -> None:
        """This process will not finish the item (its work failed): another may take it over,
        or the sweep queues it again."""
        ...

    async def cancel(self, job: Job) -> None:
        """The job's waiting images never start; its running ones are told to stop."""
        ...

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        """`callback(job_id)` in every process when a job is canceled."""
        ...

    def on_reset(self, callback: Callable[[], Awaitable[None]]) -> None:
        """`callback()` when the queue has lost what it held (the in-process queue of a new
        process holds nothing of what the one before it queued)."""
        ...

    async def lock(self, name: str, seconds: float) -> bool:
        """Whether this process may do the periodic chore `name` now (one at a time)."""
        ...
