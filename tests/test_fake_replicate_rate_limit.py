"""The fake Replicate API's throttle of prediction creates (a token bucket, as Replicate's), driven
by the real ``replicate`` client and by httpx. Rates are high (a refill in 100 ms) where a test
waits for tokens, and low (a refill in seconds) where it must see a 429 at once, so that a slow
machine cannot refill a token between two requests."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import replicate
from replicate.exceptions import ReplicateError

from tests.fake_replicate import FLUX_SCHNELL, FakeReplicate

CREATE_PATH = f"/v1/models/{FLUX_SCHNELL}/predictions"


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(headers={"Authorization": "Bearer r8_test"}, timeout=10) as client:
        yield client


def post_create(http: httpx.Client, fake: FakeReplicate, prompt: str = "a cat") -> httpx.Response:
    return http.post(fake.base_url + CREATE_PATH, json={"input": {"prompt": prompt}})


def assert_within_the_bucket(times: list[float], rate_per_second: float, burst: int) -> None:
    """Every window between two accepted creates holds no more than the bucket allows:
    burst + rate × its length (a millisecond of slack for the clocks' reading)."""
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate_per_second * (times[j] - start + 0.001), (i, j, times)


def test_creates_within_the_burst_succeed_and_the_next_is_throttled():
    with FakeReplicate(create_rate_per_minute=60, create_burst=3) as fake:
        client = replicate.Client(api_token=fake.token, base_url=fake.base_url)
        made = [
            client.models.predictions.create(model=FLUX_SCHNELL, input={"prompt": f"cat {i}"}, wait=False)
            for i in range(3)
        ]
        assert [p.status for p in made] == ["starting"] * 3
        with pytest.raises(ReplicateError) as refused:
            client.models.predictions.create(model=FLUX_SCHNELL, input={"prompt": "one too many"}, wait=False)
        assert refused.value.status == 429
        assert refused.value.title == "Too Many Requests"
        assert refused.value.detail == "Request was throttled. Expected available in 1 second."

        assert [p["id"] for p in fake.created()] == [p.id for p in made]  # the refused one made nothing
        assert fake.creates_accepted == 3 and fake.creates_throttled == 1
        times = fake.create_times()
        assert len(times) == 3 and times == sorted(times)
        assert sum(fake.creates_per_second().values()) == 3
        assert set(fake.creates_per_second()) <= {int(t) for t in times}
        assert fake.errors == []


def test_a_throttled_create_is_answered_as_replicate_does(http):
    with FakeReplicate(create_rate_per_minute=6, create_burst=1) as fake:  # a token every 10 s
        assert post_create(http, fake).status_code == 201
        sent = time.monotonic()
        refused = post_create(http, fake)
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        # Whole seconds until the next token: 10 s after the first create, less what has passed.
        retry_after = int(refused.headers["retry-after"])
        assert 10 - (time.monotonic() - sent) - 1 <= retry_after <= 10
        assert refused.json() == {
            "title": "Too Many Requests",
            "detail": f"Request was throttled. Expected available in {retry_after} seconds.",
            "status": 429,
        }
        # Both create endpoints draw on the one bucket; nothing else does, and a wrong token is
        # refused as unauthenticated before the throttle is asked.
        by_version = http.post(fake.base_url + "/v1/predictions", json={"version": "v1", "input": {"prompt": "x"}})
        assert by_version.status_code == 429
        (made,) = fake.created()
        assert http.get(f"{fake.base_url}/v1/predictions/{made['id']}").status_code == 200
        wrong_token = httpx.post(
            fake.base_url + CREATE_PATH, json={"input": {"prompt": "x"}}, headers={"Authorization": "Bearer r8_wrong"}
        )
        assert wrong_token.status_code == 401
        assert fake.creates_accepted == 1 and fake.creates_throttled == 2
        assert fake.errors == []


def test_tokens_refill_at_the_rate(http):
    rate, burst, creates = 10.0, 2, 7  # 600/min: a token every 100 ms
    with FakeReplicate(create_rate_per_minute=rate * 60, create_burst=burst) as fake:
        started = time.monotonic()
        refusals = 0
        for i in range(creates):
            deadline = time.monotonic() + 5
            while (response := post_create(http, fake, f"cat {i}")).status_code == 429:
                refusals += 1
                assert time.monotonic() < deadline, "no token came back"
                time.sleep(0.01)  # the rate's own wait: polled, a tenth of a refill at a time
            assert response.status_code == 201
        elapsed = time.monotonic() - started

        # The burst went at once; each create after it waited for a token of its own.
        assert elapsed >= (creates - burst) / rate - 0.005
        assert elapsed < (creates - burst) / rate + 2.0
        times = fake.create_times()
        assert len(times) == creates
        assert_within_the_bucket(times, rate, burst)
        assert times[burst] - times[0] >= 1 / rate - 0.005
        assert fake.creates_throttled == refusals
        assert sum(fake.creates_per_second().values()) == creates
        assert fake.max_creates_in_any_second() <= burst + rate
        assert fake.errors == []


def test_a_quiet_spell_refills_the_burst_and_no_more(http):
    rate, burst = 10.0, 2
    with FakeReplicate(create_rate_per_minute=rate * 60, create_burst=burst) as fake:
        for _ in range(burst):
            assert post_create(http, fake).status_code == 201
        time.sleep(3 * burst / rate)  # the quiet spell: long enough for three bursts, of which one is kept
        codes = [post_create(http, fake).status_code for _ in range(burst)]
        assert codes == [201] * burst
        # Then the bucket is empty again (its capacity is the burst): polled until its next token.
        deadline, refused = time.monotonic() + 5, 0
        while post_create(http, fake).status_code == 429:
            refused += 1
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert fake.creates_accepted == 2 * burst + 1 and fake.creates_throttled == refused
        assert_within_the_bucket(fake.create_times()[burst:], rate, burst)


def test_no_throttle_by_default_and_limit_creates_switches_it(http):
    with FakeReplicate() as fake:
        assert all(post_create(http, fake).status_code == 201 for _ in range(20))
        assert fake.creates_throttled == 0 and fake.creates_accepted == 20

        fake.limit_creates(6, burst=1)
        assert post_create(http, fake).status_code == 201
        assert post_create(http, fake).status_code == 429
        fake.limit_creates(None)
        assert post_create(http, fake).status_code == 201
        assert fake.creates_accepted == 22 and fake.creates_throttled == 1
        assert sum(fake.creates_per_second().values()) == 22


def test_the_stats_endpoint_reports_the_counters_and_is_not_recorded(http):
    with FakeReplicate(create_rate_per_minute=6, create_burst=2) as fake:
        codes = [post_create(http, fake).status_code for _ in range(3)]
        assert codes == [201, 201, 429]
        recorded = len(fake.requests)
        stats = httpx.get(fake.base_url + "/_fake/stats").json()  # no token needed
        assert len(fake.requests) == recorded
        assert stats == fake.stats()
        assert stats["create_rate_per_minute"] == 6 and stats["create_burst"] == 2
        assert stats["creates_accepted"] == 2 and stats["creates_throttled"] == 1
        assert stats["create_times"] == fake.create_times()
        assert sum(stats["creates_per_second"].values()) == 2
        assert stats["max_creates_per_wall_second"] == max(fake.creates_per_second().values())
        assert stats["max_creates_in_any_second"] == 2


@pytest.mark.slow
def test_the_fake_in_a_process_of_its_own_throttles_and_reports():
    from bench.processes import FakeReplicateProcess

    with FakeReplicateProcess(latency=0.01, create_rate_per_minute=6, create_burst=1) as fake:
        headers = {"Authorization": f"Bearer {fake.token}"}
        codes = [
            httpx.post(fake.base_url + CREATE_PATH, json={"input": {"prompt": "x"}}, headers=headers).status_code
            for _ in range(2)
        ]
        assert codes == [201, 429]
        stats = fake.stats()
        assert stats["creates_accepted"] == 1 and stats["creates_throttled"] == 1
        assert stats["create_rate_per_minute"] == 6 and stats["create_burst"] == 1
    with FakeReplicateProcess(latency=0.01) as unthrottled:
        assert unthrottled.stats()["create_rate_per_minute"] is None
