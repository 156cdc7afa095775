"""The fair scheduler on its own: first images first, then round-robin, and the burst reserve."""

from app.services.jobs.scheduler import FairScheduler


def test_round_robin_takes_every_jobs_first_image_before_any_second():
    started = []
    scheduler = FairScheduler(0, started.append)
    scheduler.push("A", ["A0", "A1", "A2", "A3"])
    scheduler.push("B", ["B0", "B1"])
    expected_positions = scheduler.positions_for_new_job(3)
    scheduler.push("C", ["C0", "C1", "C2"])
    order = ["A0", "B0", "C0", "A1", "B1", "C1", "A2", "C2", "A3"]
    positions = {task: scheduler.position(task[0], task) for task in order}
    assert sorted(order, key=positions.get) == order
    assert expected_positions == [positions["C0"], positions["C1"], positions["C2"]] == [3, 6, 8]
    for _ in order:
        scheduler.release()
    assert started == order


def test_a_jobs_first_image_goes_before_other_jobs_later_images():
    started = []
    scheduler = FairScheduler(1, started.append)
    scheduler.push("A", ["A0", "A1", "A2"])  # A0 starts at once
    scheduler.push("B", ["B0", "B1"])
    assert scheduler.positions_for_new_job(2) == [2, 5]
    scheduler.push("C", ["C0", "C1"])
    order = ["B0", "C0", "A1", "B1", "C1", "A2"]
    assert [scheduler.position(task[0], task) for task in order] == [1, 2, 3, 4, 5, 6]
    for _ in order:
        scheduler.release()
    assert started == ["A0", *order]


def test_a_first_image_starts_when_pushed_and_later_ones_on_the_next_turn():
    started, turns = [], []
    scheduler = FairScheduler(4, started.append, defer=turns.append)
    scheduler.push("A", ["A0", "A1", "A2"])
    scheduler.push("B", ["B0", "B1"])
    assert started == ["A0", "B0"]  # no first image waits for the loop's next turn
    for turn in turns:
        turn()
    assert started == ["A0", "B0", "A1", "B1"]


class _Timers:
    """A clock the test moves, and the timers set on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, object]] = []

    def call_later(self, delay, callback) -> None:
        self.timers.append((self.now + delay, callback))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [callback for at, callback in self.timers if at <= self.now]
        self.timers = [(at, callback) for at, callback in self.timers if at > self.now]
        for callback in due:
            callback()


def _burst_scheduler(workers: int):
    timers, started = _Timers(), []
    scheduler = FairScheduler(workers, started.append, call_later=timers.call_later, clock=lambda: timers.now)
    return scheduler, started, timers


def test_a_lone_job_gets_every_free_worker():
    scheduler, started, _ = _burst_scheduler(8)
    scheduler.push("A", [f"A{k}" for k in range(8)])
    assert len(started) == 8


def test_during_a_burst_half_the_workers_wait_for_first_images_until_it_ends():
    scheduler, started, timers = _burst_scheduler(8)
    scheduler.push("A", [f"A{k}" for k in range(4)])  # alone so far: all four start
    timers.advance(0.001)
    scheduler.push("B", [f"B{k}" for k in range(4)])  # a burst: B0 only; the last 4 free are kept
    assert started == ["A0", "A1", "A2", "A3", "B0"]
    timers.advance(0.001)
    scheduler.push("C", ["C0", "C1"])
    timers.advance(0.001)
    scheduler.push("D", ["D0", "D1"])
    assert started[5:] == ["C0", "D0"]  # first images take the kept workers
    timers.advance(0.06)  # no new job for longer than the burst window: the rest may go
    assert started[7:] == ["B1"]
    assert scheduler.waiting == 4
