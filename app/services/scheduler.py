"""Which waiting image a free worker takes next: round-robin across jobs.

Each job has its own queue; a free worker takes the oldest image of the job whose turn it
is, and that job goes to the back of the rotation. So every job's first image is taken
before any job's second: a job's first image never waits behind another job's fourth.
Jobs pushed together (a burst of requests whose inserts commit in one batch) are all queued
before any is dispatched: dispatching waits for `defer`, the loop's next turn.
Lives on the event-loop thread only; it never blocks.
"""

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

Task = TypeVar("Task")


class FairScheduler(Generic[Task]):
    def __init__(
        self,
        workers: int,
        start: Callable[[Task], None],
        defer: Callable[[Callable[[], None]], object] = lambda dispatch: dispatch(),
    ) -> None:
        self._free = workers
        self._workers = workers
        self._start = start
        self._defer = defer
        self._dispatch_pending = False
        self._queues: OrderedDict[str, deque[Task]] = OrderedDict()
        self._paused = False

    @property
    def busy(self) -> int:
        return self._workers - self._free

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def positions_for_new_job(self, count: int) -> list[int]:
        """1-based places in the dispatch order that `count` images of a new job would get."""
        lengths = [len(queue) for queue in self._queues.values()]
        # Image k of a job at the back of the rotation comes after every job's images of
        # rounds before k, and after the round-k image of each job that has one.
        return [sum(min(n, k + 1) for n in lengths) + k + 1 for k in range(count)]

    def position(self, job_id: str, task: Task) -> int | None:
        """The task's 1-based place in the dispatch order, or None when it is not waiting."""
        queue = self._queues.get(job_id)
        if queue is None or task not in queue:
            return None
        k = queue.index(task)
        earlier_rounds = sum(min(len(other), k) for other in self._queues.values())
        ahead_in_round = 0
        for other_id, other in self._queues.items():
            if other_id == job_id:
                break
            ahead_in_round += len(other) > k
        return earlier_rounds + ahead_in_round + 1

    def push(self, job_id: str, tasks: list[Task], front: bool = False) -> None:
        if not tasks:
            return
        queue = self._queues.setdefault(job_id, deque())
        if front:
            queue.extendleft(reversed(tasks))
            self._queues.move_to_end(job_id, last=False)
        else:
            queue.extend(tasks)
        if not self._dispatch_pending:
            self._dispatch_pending = True
            self._defer(self._dispatch)

    def remove_job(self, job_id: str) -> list[Task]:
        """Take a job's waiting tasks out; they will never start."""
        return list(self._queues.pop(job_id, ()))

    def release(self) -> None:
        """A worker has finished its task."""
        self._free += 1
        self._dispatch()

    def pause(self) -> None:
        self._paused = True

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        while self._free > 0 and self._queues and not self._paused:
            job_id, queue = next(iter(self._queues.items()))
            task = queue.popleft()
            if queue:
                self._queues.move_to_end(job_id)
            else:
                del self._queues[job_id]
            self._free -= 1
            self._start(task)
