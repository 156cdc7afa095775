"""Image work within this process: the fair scheduler (first images first, then round-robin,
with a burst reserve) hands each image to the next of this process's workers that asks.

Two speed-ups live here, since only one process can have them:
- A job with no Idempotency-Key (which no racing request can refuse) has its images handed to
  workers the moment it is pushed, while its insert commits: the image's own writes go through
  the same journal after the insert, so nothing of it can be stored before the job. The
  provider is called only once the insert has committed (`JobAdmission`): a job the database
  refuses, or withdrawn because its insert took too long, never reaches the provider.
- First image first: when a job's images finish together, their work after the provider
  (download, save, record, commit, send) would share the GIL evenly and every image, the
  first too, would reach the browser last. So the first to finish goes on; the others wait
  until its event is published (or FIRST_IMAGE_HOLD_SECONDS), then go on together.
"""

import asyncio
import threading
from collections.abc import Awaitable, Callable

from app.providers.base import StopSignal
from app.services.jobs.create_budget import TokenBucket
from app.services.jobs.domain import Job
from app.services.jobs.interfaces import OnTaken, Takers, WorkItem
from app.services.jobs.scheduler import FairScheduler

# How long a job's other images wait for its first one to be published, at most: enough for a
# commit and a send; a stalled database delays the rest of the batch by no more than this.
FIRST_IMAGE_HOLD_SECONDS = 0.02
# How often an image waiting for its job's insert looks whether it was stopped meanwhile.
ADMISSION_STOP_CHECK_SECONDS = 0.05


class FirstImage:
    """A job's hold: the first of its images to finish goes on at once, the others wait."""

    def __init__(self) -> None:
        self._claim = threading.Lock()
        self._published = threading.Event()

    def wait_turn(self) -> None:
        """On a worker thread, once its image is made: the first returns at once."""
        if not self._claim.acquire(blocking=False):
            self._published.wait(FIRST_IMAGE_HOLD_SECONDS)

    def published(self) -> None:
        self._published.set()


class JobAdmission:
    """A job's insert, for its images: decided once, by the insert's outcome (set from its
    done-callback, so the image goes on without waiting for the loop's turn of the request) or
    by the job's withdrawal, whichever comes first."""

    def __init__(self) -> None:
        self._decided = threading.Event()
        self._admitted = False

    def settle(self, stored: "asyncio.Future[None]") -> None:
        self.decide(not stored.cancelled() and stored.exception() is None)

    def decide(self, admitted: bool) -> None:
        """On the event loop."""
        if not self._decided.is_set():
            self._admitted = admitted
            self._decided.set()

    def wait(self, stop: StopSignal) -> bool:
        while not self._decided.wait(ADMISSION_STOP_CHECK_SECONDS):
            if stop.is_set():
                return False
        return self._admitted and not stop.is_set()


def _later(delay: float, dispatch: Callable[[], None]) -> object:
    return asyncio.get_running_loop().call_later(delay, dispatch)


def _soon(dispatch: Callable[[], None]) -> object:
    return asyncio.get_running_loop().call_soon(dispatch)


class InProcessWorkQueue:
    def __init__(self, workers: int, create_budget: TokenBucket | None = None) -> None:
        # A worker is free when it asks for work (`take`), not before.
        self._scheduler: FairScheduler[WorkItem] = FairScheduler(
            workers, self._hand_over, defer=_soon, call_later=_later, free=0, budget=create_budget
        )
        self._takers = Takers()
        self._waiting: dict[tuple[str, int], WorkItem] = {}  # pushed, not taken
        self._taken: set[tuple[str, int]] = set()  # taken, not done
        self._cancel_callbacks: list[Callable[[str], None]] = []
        self._admissions: dict[str, JobAdmission] = {}  # of jobs whose insert is committing
        self._reset_callbacks: list[Callable[[], Awaitable[None]]] = []

    @property
    def unavailable(self) -> str | None:
        return None

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    async def depth(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        # A new process holds none of the work a previous one left unfinished.
        for callback in self._reset_callbacks:
            await callback()

    async def close(self) -> None:
        self._scheduler.pause()

    def positions_for_new_job(self, count: int) -> list[int | None]:
        return list(self._scheduler.positions_for_new_job(count))

    def position(self, job_id: str, index: int) -> int | None:
        item = self._waiting.get((job_id, index))
        return None if item is None else self._scheduler.position(job_id, item)

    async def push(self, job: Job, indexes: list[int], stored: Awaitable[None] | None = None) -> list[int]:
        admission = None
        if stored is not None and job.idempotency_key is not None:
            await stored  # a racing request with the same key may refuse it
        elif stored is not None:
            admission = self._admissions[job.id] = JobAdmission()
            committing = asyncio.ensure_future(stored)
            committing.add_done_callback(admission.settle)
            committing.add_done_callback(lambda _: self._admissions.pop(job.id, None))
        hold = FirstImage()
        held = set(self._waiting) | self._taken
        items = [WorkItem(job.id, index, hold, job, admission) for index in indexes if (job.id, index) not in held]
        for item in items:
            self._waiting[(item.job_id, item.index)] = item
        # Work that had started (before a restart) goes first: it may only need re-attaching.
        self._scheduler.push(job.id, [item for item in items if job.images[item.index].status == "running"], front=True)
        self._scheduler.push(job.id, [item for item in items if job.images[item.index].status != "running"])
        return [item.index for item in items]

    async def take(self, on_taken: OnTaken | None = None) -> WorkItem:
        taker = self._takers.wait(on_taken)
        self._scheduler.release()
        return await taker

    def _hand_over(self, item: WorkItem) -> None:
        """Called by the scheduler when a worker is free for this item."""
        key = (item.job_id, item.index)
        self._waiting.pop(key, None)
        if self._takers.hand(item):
            self._taken.add(key)

    async def done(self, item: WorkItem) -> None:
        self._taken.discard((item.job_id, item.index))

    def give_up(self, item: WorkItem) -> None:
        self._taken.discard((item.job_id, item.index))  # the next sweep queues it again

    async def cancel(self, job: Job) -> None:
        admission = self._admissions.pop(job.id, None)
        if admission is not None:
            admission.decide(False)  # withdrawn: its images that were handed over never start
        for item in self._scheduler.remove_job(job.id):
            self._waiting.pop((item.job_id, item.index), None)
        for callback in self._cancel_callbacks:
            callback(job.id)

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        self._cancel_callbacks.append(callback)

    def on_reset(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._reset_callbacks.append(callback)

    async def lock(self, name: str, seconds: float) -> bool:
        return True
