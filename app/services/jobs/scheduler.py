"""Which waiting image a free worker takes next: first images first, then round-robin.

A job none of whose images has started waits in arrival order, and a free worker takes its
first image before any other job's later images. Once started, a job's remaining images join
a round-robin across jobs: a worker takes the oldest image of the job whose turn it is, and
that job goes to the back. So a job's first image never waits behind another job's fourth.

While jobs arrive in a burst (a new job within BURST_WINDOW_SECONDS of the one before), later
images may not take the last `reserve` free workers: those are kept for the first images of
the jobs still arriving, which would otherwise wait a whole round behind the first arrivals'
later images. The reserve lifts BURST_WINDOW_SECONDS after the last arrival; a lone job never
meets it. A first image starts the moment its job is pushed if a worker is free; later images
wait for the loop's next turn (`defer`), so that the first images of jobs pushed together go
before any of their later ones. With the provider's create budget (create_budget.py), a task
starts only with a create granted: the others wait, in this order, until the budget has one;
and while jobs arrive in a burst, later images leave every create to first images.
Lives on the event-loop thread only; it never blocks.
"""

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

from app.services.jobs.create_budget import TokenBucket

Task = TypeVar("Task")

BURST_WINDOW_SECONDS = 0.05


class BurstReserve:
    """While jobs arrive in a burst, later images leave the last `reserve` free workers to
    the first images of the jobs still arriving."""

    def __init__(self, workers: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.reserve = workers // 2
        self._clock = clock
        self._last_arrival = float("-inf")
        self._burst_until = float("-inf")

    def arrived(self) -> None:
        """A new job (its first image) has come."""
        now = self._clock()
        if now - self._last_arrival < BURST_WINDOW_SECONDS:
            self._burst_until = now + BURST_WINDOW_SECONDS
        self._last_arrival = now

    def holds(self, free: int) -> float:
        """Seconds for which a later image may not take one of `free` workers; 0: it may."""
        if free > self.reserve:
            return 0.0
        return max(0.0, self._burst_until - self._clock())


class FairScheduler(Generic[Task]):
    def __init__(
        self,
        workers: int,
        start: Callable[[Task], None],
        defer: Callable[[Callable[[], None]], object] = lambda dispatch: dispatch(),
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        free: int | None = None,
        budget: TokenBucket | None = None,
    ) -> None:
        # Workers free for a task: `workers` unless given; each `release` brings one more.
        self._free = workers if free is None else free
        self._burst = BurstReserve(workers, clock)
        self._start = start
        self._defer = defer
        self._call_later = call_later
        self._dispatch_pending = False
        self._wake_pending = False
        self._budget = budget
        self._budget_wake_pending = False
        self._unstarted: OrderedDict[str, deque[Task]] = OrderedDict()
        self._rotation: OrderedDict[str, deque[Task]] = OrderedDict()
        self._paused = False

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in (*self._unstarted.values(), *self._rotation.values()))

    def positions_for_new_job(self, count: int) -> list[int]:
        """1-based places in the dispatch order that `count` images of a new job would get."""
        firsts = len(self._unstarted) + 1
        lengths = self._rotation_lengths()
        return [firsts] + [firsts + _round_robin_place(lengths, m) for m in range(count - 1)]

    def position(self, job_id: str, task: Task) -> int | None:
        """The task's 1-based place in the dispatch order, or None when it is not waiting."""
        if job_id in self._unstarted:
            queue = self._unstarted[job_id]
            if task not in queue:
                return None
            k = queue.index(task)
            if k == 0:
                return list(self._unstarted).index(job_id) + 1
            m, ahead_ids = k - 1, [*self._rotation, *self._unstarted]
        elif job_id in self._rotation:
            queue = self._rotation[job_id]
            if task not in queue:
                return None
            m, ahead_ids = queue.index(task), [*self._rotation, *self._unstarted]
        else:
            return None
        lengths = self._rotation_lengths()
        earlier_rounds = sum(min(n, m) for n in lengths)
        ahead_in_round = sum(n > m for n in lengths[: ahead_ids.index(job_id)])
        return len(self._unstarted) + earlier_rounds + ahead_in_round + 1

    def _rotation_lengths(self) -> list[int]:
        """Waiting later images per job, in the order the round-robin will visit them."""
        return [len(q) for q in self._rotation.values()] + [len(q) - 1 for q in self._unstarted.values()]

    def push(self, job_id: str, tasks: list[Task], front: bool = False) -> None:
        if not tasks:
            return
        queue = self._rotation.get(job_id)
        if queue is None:
            queue = self._unstarted.get(job_id)
        if queue is None:
            self._burst.arrived()
            queue = self._unstarted[job_id] = deque()
        if front:
            queue.extendleft(reversed(tasks))
            (self._rotation if job_id in self._rotation else self._unstarted).move_to_end(job_id, last=False)
        else:
            queue.extend(tasks)
        while self._unstarted and self._free > 0 and not self._paused and self._granted():
            self._free -= 1
            self._start(self._next_first())
        if not self._dispatch_pending:
            self._dispatch_pending = True
            self._defer(self._dispatch)

    def remove_job(self, job_id: str) -> list[Task]:
        """Take a job's waiting tasks out; they will never start."""
        return list(self._unstarted.pop(job_id, ())) + list(self._rotation.pop(job_id, ()))

    def release(self) -> None:
        """A worker is free for a task (it has just started, or finished its last)."""
        self._free += 1
        self._dispatch()

    def pause(self) -> None:
        self._paused = True

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        while self._free > 0 and not self._paused and (self._unstarted or self._rotation) and self._granted():
            task = self._next()
            if task is None:
                if self._budget is not None:
                    self._budget.give_back(1)
                return
            self._free -= 1
            self._start(task)

    def _next(self) -> Task | None:
        if self._unstarted:
            return self._next_first()
        if not self._rotation or self._reserved():
            return None
        job_id, queue = next(iter(self._rotation.items()))
        task = queue.popleft()
        if queue:
            self._rotation.move_to_end(job_id)
        else:
            del self._rotation[job_id]
        return task

    def _next_first(self) -> Task:
        """The first image of the job that has waited longest for one."""
        job_id, queue = next(iter(self._unstarted.items()))
        del self._unstarted[job_id]
        task = queue.popleft()
        if queue:
            self._rotation[job_id] = queue
        return task

    def _reserved(self) -> bool:
        """Whether the free workers left are kept for first images still arriving. Under a
        create budget, creates are what is scarce: later images leave them all to first
        images while a burst of jobs lasts."""
        remaining = self._burst.holds(0 if self._budget is not None else self._free)
        if remaining <= 0 or self._call_later is None:
            return False
        if not self._wake_pending:
            self._wake_pending = True
            self._call_later(remaining, self._wake)
        return True

    def _wake(self) -> None:
        self._wake_pending = False
        self._dispatch()

    def _granted(self) -> bool:
        """Whether a create may go now; if not, dispatching resumes when one may."""
        if self._budget is None:
            return True
        grant = self._budget.take(1)
        if grant.granted:
            return True
        if not self._budget_wake_pending and self._call_later is not None:
            self._budget_wake_pending = True
            self._call_later(grant.retry_in, self._budget_woke)
        return False

    def _budget_woke(self) -> None:
        self._budget_wake_pending = False
        self._dispatch()


def _round_robin_place(lengths: list[int], m: int) -> int:
    """The place, in the round-robin over jobs with `lengths` waiting images, of the (m+1)-th
    image of one more job at the back."""
    return sum(min(n, m + 1) for n in lengths) + m + 1
