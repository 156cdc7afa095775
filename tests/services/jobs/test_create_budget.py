"""The provider's create budget: the token bucket, the scheduler spending it first images
first, the budget shared through Redis, and, end to end, a service that never meets the
fake Replicate's 429 and slows down when one comes anyway."""

import asyncio

import pytest

from app.core.redis_link import RedisLink
from app.services.jobs.create_budget import Grant, RedisCreateBudget, TokenBucket
from app.services.jobs.scheduler import FairScheduler
from tests.conftest import LiveServer, login, make_settings, read_stream, redis_url
from tests.fake_replicate import Fault


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_grants_a_burst_then_its_rate():
    clock = Clock()
    bucket = TokenBucket(per_minute=120, burst=3, clock=clock)  # two a second
    assert bucket.take(5) == Grant(3, 0.0)
    empty = bucket.take(1)
    assert empty.granted == 0 and empty.retry_in == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.take(2) == Grant(1, 0.0)
    clock.now += 60  # a quiet spell refills no more than the burst
    assert bucket.take(10).granted == 3


def test_unused_creates_are_given_back_up_to_the_burst():
    bucket = TokenBucket(per_minute=60, burst=2, clock=Clock())
    assert bucket.take(2).granted == 2
    bucket.give_back(5)
    assert bucket.take(5).granted == 2


def test_a_slow_down_holds_every_create_and_the_budget_starts_again_from_empty():
    clock = Clock()
    bucket = TokenBucket(per_minute=60, burst=5, clock=clock)
    bucket.slow_down(3.0)
    held = bucket.take(1)
    assert held.granted == 0 and held.retry_in == pytest.approx(3.0)
    clock.now += 2
    assert bucket.take(1).granted == 0
    clock.now += 1  # the pause is over, and nothing accrued during it
    assert bucket.take(1).granted == 0
    clock.now += 1  # one create's worth after the pause
    assert bucket.take(5).granted == 1


class Later:
    """call_later for the scheduler, run by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, object]] = []

    def __call__(self, delay, callback):
        self.calls.append((delay, callback))

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for _, callback in calls:
            callback()


def test_the_scheduler_spends_the_budget_on_first_images_first():
    clock, later = Clock(), Later()
    started: list[str] = []
    bucket = TokenBucket(per_minute=60, burst=1, clock=clock)
    scheduler = FairScheduler(8, started.append, call_later=later, clock=clock, budget=bucket)
    for job in "abc":
        scheduler.push(job, [f"{job}0", f"{job}1", f"{job}2"])
    assert started == ["a0"]  # eight free workers, one create
    assert scheduler.waiting == 8  # the rest stay queued, with their places
    assert scheduler.position("c", "c0") == 2 and later.calls and later.calls[0][0] == pytest.approx(1.0)
    for _ in range(5):
        clock.now += 1.0
        later.run()
    assert started == ["a0", "b0", "c0", "a1", "b1", "c1"]
    scheduler.push("d", ["d0"])  # a new job's first image goes before the later images left
    clock.now += 1.0
    later.run()
    assert started[-1] == "d0"


def test_during_a_burst_of_jobs_later_images_leave_the_creates_to_first_images():
    clock, later = Clock(), Later()
    started: list[str] = []
    bucket = TokenBucket(per_minute=60, burst=10, clock=clock)
    scheduler = FairScheduler(
        16, started.append, defer=lambda dispatch: later(0, dispatch), call_later=later, clock=clock, budget=bucket
    )
    scheduler.push("a", ["a0", "a1", "a2"])
    clock.now += 0.01  # the next job comes within the burst window
    scheduler.push("b", ["b0", "b1", "b2"])
    later.run()  # the loop's next turn: later images wait for the burst to pass
    assert started == ["a0", "b0"]
    clock.now += 0.01
    scheduler.push("c", ["c0", "c1", "c2"])
    assert started == ["a0", "b0", "c0"]
    clock.now += 1.0  # the burst is over
    later.run()
    assert started == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]


def test_a_scheduler_without_a_budget_starts_at_once():
    started: list[str] = []
    scheduler = FairScheduler(8, started.append)
    scheduler.push("a", ["a0", "a1"])
    assert started == ["a0", "a1"]


# Shared through Redis ------------------------------------------------------------------------


def test_two_processes_share_one_budget_in_redis():
    async def run() -> None:
        prefix = f"test-budget-{id(run)}"
        one, two = RedisLink(redis_url(), prefix), RedisLink(redis_url(), prefix)
        try:
            a, b = RedisCreateBudget(one, 120, 3), RedisCreateBudget(two, 120, 3)
            assert (await a.grant(2)).granted == 2
            assert (await b.grant(2)).granted == 1
            refused = await b.grant(1)
            assert refused.granted == 0 and 0 < refused.retry_in <= 0.5
            await a.give_back(1)
            assert (await b.grant(1)).granted == 1
            await a.slow_down(2.0)
            paused = await b.grant(1)
            assert paused.granted == 0 and 1.9 <= paused.retry_in <= 2.0
        finally:
            await one.client.delete(one.key("provider-creates"))
            await one.close()
            await two.close()

    asyncio.run(run())


def test_an_unreachable_redis_leaves_creates_unshaped():
    async def run() -> None:
        link = RedisLink("redis://127.0.0.1:1/0", "test-budget-down")
        try:
            assert await RedisCreateBudget(link, 60, 1).grant(4) == Grant(4, 0.0)
        finally:
            await link.close()

    asyncio.run(run())


# End to end ----------------------------------------------------------------------------------


def _service(tmp_path, fake, **settings) -> LiveServer:
    return LiveServer(
        make_settings(
            tmp_path / "data",
            IMAGE_PROVIDER="replicate",
            REPLICATE_API_TOKEN=fake.token,
            REPLICATE_BASE_URL=fake.base_url,
            **settings,
        )
    )


def _seeds_created(fake) -> list[int]:
    return [prediction["input"]["seed"] for prediction in fake.created()]


@pytest.mark.slow
def test_a_burst_never_meets_the_providers_429_and_first_images_go_first(tmp_path, fake_replicate):
    # The fake allows two creates a second with a burst of two; the service spends one less.
    fake_replicate.limit_creates(120, burst=2)
    with (
        _service(tmp_path, fake_replicate, PROVIDER_MAX_CREATES_PER_MINUTE=120, PROVIDER_CREATE_BURST=1) as server,
        server.client() as client,
    ):
        token = login(client)
        headers = {"Authorization": f"Bearer {token}"}
        jobs = []
        for k in range(4):  # job k's image i has seed 100k + i
            response = client.post(
                "/api/generate/", json={"prompt": f"job {k}", "num_images": 3, "seed": 100 * k}, headers=headers
            )
            assert response.status_code == 202
            jobs.append(response.json()["job_id"])
        waiting = client.get(f"/api/generate/{jobs[-1]}", headers=headers).json()
        assert [image["status"] for image in waiting["images"]] == ["queued"] * 3
        assert all(image["queue_position"] for image in waiting["images"])
        for job_id in jobs:
            assert read_stream(client, job_id, headers)[-1].data["status"] == "succeeded"
    assert fake_replicate.creates_throttled == 0
    seeds = _seeds_created(fake_replicate)
    assert sorted(seed % 100 for seed in seeds[:4]) == [0, 0, 0, 0], seeds  # every first image before any other


@pytest.mark.slow
def test_a_429_that_comes_anyway_holds_the_next_creates_for_its_retry_after(tmp_path, fake_replicate):
    fake_replicate.push_create_fault(Fault(retry_after=2))
    with (
        _service(tmp_path, fake_replicate, PROVIDER_MAX_CREATES_PER_MINUTE=600, PROVIDER_CREATE_BURST=10) as server,
        server.client() as client,
    ):
        headers = {"Authorization": f"Bearer {login(client)}"}
        first = client.post("/api/generate/", json={"prompt": "first", "num_images": 1, "seed": 1}, headers=headers)
        # Once the image says it is retrying, the service has heard the 429.
        read_stream(client, first.json()["job_id"], headers, stop=lambda event: event.data.get("status") == "retrying")
        throttled_at = fake_replicate.requests_to("/v1/models", "POST")[0].at
        second = client.post("/api/generate/", json={"prompt": "second", "num_images": 1, "seed": 2}, headers=headers)
        for response in (first, second):
            assert read_stream(client, response.json()["job_id"], headers)[-1].data["status"] == "succeeded"
    creates = fake_replicate.requests_to("/v1/models", "POST")
    second_create = next(r for r in creates if r.json["input"]["prompt"] == "second")
    assert second_create.at - throttled_at >= 1.9, [(r.json["input"]["prompt"], r.at - throttled_at) for r in creates]


@pytest.mark.slow
def test_a_refused_create_is_sent_again_only_in_its_turn_of_the_budget(tmp_path, fake_replicate):
    fake_replicate.push_create_fault(Fault(retry_after=1))
    with (
        _service(tmp_path, fake_replicate, PROVIDER_MAX_CREATES_PER_MINUTE=60, PROVIDER_CREATE_BURST=1) as server,
        server.client() as client,
    ):
        headers = {"Authorization": f"Bearer {login(client)}"}
        job = client.post("/api/generate/", json={"prompt": "refused once", "num_images": 1}, headers=headers)
        assert read_stream(client, job.json()["job_id"], headers)[-1].data["status"] == "succeeded"
    refused, sent_again = fake_replicate.requests_to("/v1/models", "POST")
    # The 429's Retry-After holds the budget for a second, which then has a create a second:
    # the create goes again in its turn, not the moment its own backoff ends.
    assert sent_again.at - refused.at >= 1.9, sent_again.at - refused.at
