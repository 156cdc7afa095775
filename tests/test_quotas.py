"""Daily image quotas: counted at admission, atomically under concurrent POSTs, given back
for images that fail or are canceled, and told by GET /api/usage."""

import threading
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import BOB, LiveServer, login, make_settings, read_stream, wait_until
from tests.fake_replicate import Rule

pytestmark = pytest.mark.slow  # jobs whose images take seconds, waited out


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _next_midnight() -> datetime:
    return datetime.combine(datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)


def _usage(client, token: str) -> dict:
    response = client.get("/api/usage", headers=_auth(token))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def server(tmp_path):
    settings = make_settings(
        tmp_path / "data", DAILY_IMAGE_QUOTA=10, MAX_ACTIVE_JOBS_PER_USER=100, LOCAL_LATENCY_MS=2000
    )
    with LiveServer(settings) as live:
        yield live


def test_usage_starts_at_the_quota(server):
    with server.client() as client:
        usage = _usage(client, login(client))
    assert usage == {
        "images_today": 0,
        "quota": 10,
        "remaining": 10,
        "resets_at": _next_midnight().isoformat().replace("+00:00", "Z"),
    }


def test_concurrent_posts_cannot_overspend_the_quota(server):
    with server.client() as client:
        token = login(client)
    start = threading.Barrier(16)
    answers: list[tuple[int, dict, str | None]] = []

    def post(n: int) -> None:
        with server.client(token) as client:
            start.wait()
            response = client.post("/api/generate/", json={"prompt": f"burst {n}", "num_images": 2})
            answers.append((response.status_code, response.json(), response.headers.get("retry-after")))

    posters = [threading.Thread(target=post, args=(n,)) for n in range(16)]
    until_midnight_before = (_next_midnight() - datetime.now(UTC)).total_seconds()
    for poster in posters:
        poster.start()
    for poster in posters:
        poster.join()
    until_midnight_after = (_next_midnight() - datetime.now(UTC)).total_seconds()
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [202] * 5 + [429] * 11, answers
    refusal = next(body for status, body, _ in answers if status == 429)
    assert "you have 0 images left today and this job asks for 2" in refusal["detail"]
    retry_after = [int(after) for status, _, after in answers if status == 429]
    assert all(until_midnight_after - 1 <= after <= until_midnight_before + 1 for after in retry_after), (
        retry_after,
        until_midnight_before,
    )
    with server.client() as client:
        assert _usage(client, token)["remaining"] == 0
        # Another user's quota is their own.
        assert _usage(client, login(client, BOB))["remaining"] == 10


def test_a_job_over_what_is_left_is_refused_and_says_how_many_are(server):
    with server.client() as client:
        token = login(client)
        assert (
            client.post("/api/generate/", json={"prompt": "x", "num_images": 7}, headers=_auth(token)).status_code
            == 202
        )
        refused = client.post("/api/generate/", json={"prompt": "y", "num_images": 4}, headers=_auth(token))
        assert refused.status_code == 429
        assert "you have 3 images left today and this job asks for 4" in refused.json()["detail"]
        # What is left can still be used.
        assert (
            client.post("/api/generate/", json={"prompt": "z", "num_images": 3}, headers=_auth(token)).status_code
            == 202
        )
        assert _usage(client, token)["images_today"] == 10


def test_canceled_images_are_given_back(server):
    with server.client() as client:
        token = login(client)
        response = client.post("/api/generate/", json={"prompt": "slow", "num_images": 8}, headers=_auth(token))
        job_id = response.json()["job_id"]
        assert _usage(client, token)["remaining"] == 2
        assert client.post(f"/api/generate/{job_id}/cancel", headers=_auth(token)).status_code == 202
        wait_until(lambda: _usage(client, token)["remaining"] == 10, what="the canceled images to be given back")


def test_an_idempotent_replay_is_not_counted_twice(server):
    with server.client() as client:
        token = login(client)
        headers = {**_auth(token), "Idempotency-Key": "once"}
        for _ in range(3):
            assert (
                client.post("/api/generate/", json={"prompt": "x", "num_images": 4}, headers=headers).status_code == 202
            )
        assert _usage(client, token)["images_today"] == 4


def test_failed_images_are_given_back(tmp_path, fake_replicate):
    fake_replicate.add_rule(Rule(match="refused", fail_error="The model refused this prompt"))
    settings = make_settings(
        tmp_path / "data",
        DAILY_IMAGE_QUOTA=4,
        IMAGE_PROVIDER="replicate",
        REPLICATE_API_TOKEN=fake_replicate.token,
        REPLICATE_BASE_URL=fake_replicate.base_url,
    )
    with LiveServer(settings) as live, live.client() as client:
        token = login(client)
        job_id = client.post("/api/generate/", json={"prompt": "refused", "num_images": 4}, headers=_auth(token))
        assert job_id.status_code == 202
        events = read_stream(client, job_id.json()["job_id"], _auth(token))
        assert events[-1].event == "done" and events[-1].data["status"] == "failed"
        assert _usage(client, token) | {"resets_at": None} == {
            "images_today": 0,
            "quota": 4,
            "remaining": 4,
            "resets_at": None,
        }
        # The quota is whole again: a job of all four is taken.
        assert (
            client.post("/api/generate/", json={"prompt": "a cat", "num_images": 4}, headers=_auth(token)).status_code
            == 202
        )


def test_a_quota_of_zero_is_unlimited(tmp_path):
    with LiveServer(make_settings(tmp_path / "data", DAILY_IMAGE_QUOTA=0)) as live, live.client() as client:
        usage = _usage(client, login(client))
    assert usage["quota"] is None and usage["remaining"] is None and usage["images_today"] == 0
