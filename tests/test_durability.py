"""Durable jobs on SQLite and PostgreSQL: history, kept images, cancel, idempotency, limits."""

import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from app.core.security import ImageUrlSigner, derive_key
from tests.conftest import BOB, TEST_JWT_SECRET, create_job, login, read_stream
from tests.fake_replicate import Rule


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def _finish(client, token, job_id):
    events = read_stream(client, job_id, headers=_auth(token))
    assert events[-1].event == "done", events[-1]
    return events


def test_history_is_newest_first_and_paginated_by_cursor(live_server, database_url):
    with live_server(DATABASE_URL=database_url, LOCAL_LATENCY_MS=0) as server, server.client() as client:
        alice, bob = login(client), login(client, BOB)
        created = []
        for n in range(5):
            created.append(create_job(client, alice, prompt=f"picture {n}", num_images=1))
            _finish(client, alice, created[-1])
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = client.get("/api/generate/", params=params, headers=_auth(alice)).json()
            pages += 1
            seen += [job["job_id"] for job in page["jobs"]]
            assert all(job["status"] == "succeeded" and job["images"][0]["url"] for job in page["jobs"])
            assert all(job["ttfi_ms"] is not None and job["total_ms"] is not None for job in page["jobs"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == created[::-1]
        assert pages == 3
        assert client.get("/api/generate/", headers=_auth(bob)).json() == {"jobs": [], "next_cursor": None}
        bad = client.get("/api/generate/", params={"cursor": "not-a-cursor"}, headers=_auth(alice))
        assert bad.status_code == 422
        assert client.get("/api/generate/", params={"limit": 0}, headers=_auth(alice)).status_code == 422


def test_a_finished_job_survives_a_restart_with_the_same_events(live_server, database_url):
    with live_server(DATABASE_URL=database_url) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="kept", num_images=2)
        before = _finish(client, token, job_id)
        first_base_url = server.base_url
    with live_server(DATABASE_URL=database_url) as server, server.client() as client:
        token = login(client)
        after = read_stream(client, job_id, headers=_auth(token))
        # Links are signed as they are sent, for the server the stream came from.
        relinked = [(e.id, e.event, json.loads(json.dumps(e.data).replace(server.base_url, "BASE"))) for e in after]
        assert relinked == [
            (e.id, e.event, json.loads(json.dumps(e.data).replace(first_base_url, "BASE"))) for e in before
        ]
        resumed = read_stream(client, job_id, headers={**_auth(token), "Last-Event-ID": "3"})
        assert [e.id for e in resumed] == [e.id for e in before[3:]]
        snapshot = client.get(f"/api/generate/{job_id}", headers=_auth(token)).json()
        assert snapshot["status"] == "succeeded"
        for image in snapshot["images"]:
            assert client.get(image["url"], headers={}).status_code == 200


def _key_and_query(url):
    parts = urlsplit(url)
    return parts.path.rsplit("/", 1)[-1], {k: v[0] for k, v in parse_qs(parts.query).items()}


def test_image_links_are_signed_expiring_and_cacheable(live_server):
    with live_server() as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="signed", num_images=1)
        _finish(client, token, job_id)
        url = client.get(f"/api/generate/{job_id}", headers=_auth(token)).json()["images"][0]["url"]
        key, query = _key_and_query(url)
        path = f"/api/images/{key}"

        ok = client.get(url)  # no Authorization header, as an <img> loads it
        assert ok.status_code == 200
        assert ok.headers["content-type"] == "image/png"
        assert ok.headers["etag"] == f'"{key}"'
        assert "immutable" in ok.headers["cache-control"]
        # A link lives a day, its expiry rounded up to the hour so that its URL stays the same.
        assert 24 * 3600 <= int(ok.headers["cache-control"].split("max-age=")[1].split(",")[0]) <= 25 * 3600
        assert client.get(url, headers={"If-None-Match": ok.headers["etag"]}).status_code == 304

        tampered_signature = {
            **query,
            "signature": query["signature"][:-1] + ("0" if query["signature"][-1] != "0" else "1"),
        }
        longer_life = {**query, "expires": str(int(query["expires"]) + 3600)}
        other_image = f"/api/images/{key.replace('-0.', '-1.')}"
        for target, params in ((path, tampered_signature), (path, longer_life), (other_image, query)):
            refused = client.get(target, params=params)
            assert refused.status_code == 403
            assert refused.json() == {"detail": "invalid image signature"}

        # A link signed with the server's key, but a day and an hour and a minute ago.
        signer = ImageUrlSigner(derive_key(TEST_JWT_SECRET, "image-urls"), 24 * 3600)
        signed_then = signer.expires(now=time.time() - 25 * 3600 - 60)
        old = dict(kv.split("=") for kv in signer.query(key, signed_then).split("&"))
        expired = client.get(path, params=old)
        assert expired.status_code == 403
        assert expired.json() == {"detail": "image link expired"}


def _replicate(live_server, fake, **overrides):
    return live_server(
        IMAGE_PROVIDER="replicate",
        REPLICATE_API_TOKEN=fake.token,
        REPLICATE_BASE_URL=fake.base_url,
        REPLICATE_POLL_INTERVAL=0.05,
        **overrides,
    )


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        (Rule(match="gone", output_http_status=404), "Could not download the image: HTTP 404"),
        (Rule(match="gone", output_body=b"<html>not an image</html>"), "not a PNG, JPEG or WebP image"),
    ],
)
def test_an_output_that_cannot_be_kept_fails_the_image_with_the_reason(live_server, fake_replicate, rule, reason):
    fake_replicate.add_rule(rule)
    with _replicate(live_server, fake_replicate) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="gone soon", num_images=1)
        done = _finish(client, token, job_id)[-1].data
    assert done["status"] == "failed"
    assert reason in done["images"][0]["error"]
    assert done["images"][0]["url"] is None


def _progress(events, status):
    return [e.data for e in events if e.event == "progress" and e.data["status"] == status]


def test_cancel_stops_unfinished_images_and_keeps_finished_ones(live_server, database_url):
    settings = dict(DATABASE_URL=database_url, LOCAL_LATENCY_MS=300, GENERATION_MAX_WORKERS=1)
    with live_server(**settings) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="cancel me", num_images=4)
        read_stream(client, job_id, headers=_auth(token), stop=lambda e: e.data.get("status") == "succeeded")
        response = client.post(f"/api/generate/{job_id}/cancel", headers=_auth(token))
        assert response.status_code == 202
        assert response.json()["status"] == "canceled"

        events = _finish(client, token, job_id)
        done = events[-1].data
        assert done["status"] == "canceled"
        finished = [image for image in done["images"] if image["status"] == "succeeded"]
        assert finished and all(image["url"] for image in finished)
        canceled = [image for image in done["images"] if image["status"] == "canceled"]
        assert len(finished) + len(canceled) == 4
        assert {p["index"] for p in _progress(events, "canceled")} == {i["index"] for i in canceled}
        # Queued images never started.
        assert len(_progress(events, "running")) < 4

        again = client.post(f"/api/generate/{job_id}/cancel", headers=_auth(token))
        assert again.status_code == 409
        assert "already finished" in again.json()["detail"]
        other = client.post(f"/api/generate/{job_id}/cancel", headers=_auth(login(client, BOB)))
        assert other.status_code == 404


def test_cancel_cancels_running_predictions_at_replicate(live_server, fake_replicate):
    fake_replicate.wait_cap = 0.05
    fake_replicate.add_rule(Rule(match="forever", never_finish=True))
    with _replicate(live_server, fake_replicate) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="forever", num_images=2)
        fake_replicate.wait_for(lambda fake: len(fake.requests_to("/v1/predictions/", method="GET")) >= 2)
        assert client.post(f"/api/generate/{job_id}/cancel", headers=_auth(token)).status_code == 202
        assert _finish(client, token, job_id)[-1].data["status"] == "canceled"
        fake_replicate.wait_for(
            lambda fake: [p["status"] for p in fake.predictions.values()] == ["canceled", "canceled"]
        )


def test_idempotency_key_returns_the_same_job(live_server, database_url):
    with live_server(DATABASE_URL=database_url) as server, server.client() as client:
        alice, bob = login(client), login(client, BOB)
        body = {"prompt": "once", "num_images": 2}
        key = {"Idempotency-Key": "order-42"}
        first = client.post("/api/generate/", json=body, headers={**_auth(alice), **key})
        again = client.post("/api/generate/", json=body, headers={**_auth(alice), **key})
        assert first.status_code == again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        changed = client.post("/api/generate/", json={**body, "num_images": 3}, headers={**_auth(alice), **key})
        assert changed.status_code == 409
        assert "different request body" in changed.json()["detail"]
        theirs = client.post("/api/generate/", json=body, headers={**_auth(bob), **key})
        assert theirs.status_code == 202 and theirs.json() != first.json()
        _finish(client, alice, first.json()["job_id"])
    with live_server(DATABASE_URL=database_url) as server, server.client() as client:
        alice = login(client)
        later = client.post("/api/generate/", json=body, headers={**_auth(alice), **key})
        assert later.json() == first.json()


@pytest.mark.slow
def test_too_many_active_jobs_is_429_with_retry_after(live_server, database_url):
    settings = dict(DATABASE_URL=database_url, MAX_ACTIVE_JOBS_PER_USER=2, LOCAL_LATENCY_MS=5000)
    with live_server(**settings) as server, server.client() as client:
        alice, bob = login(client), login(client, BOB)
        jobs = [create_job(client, alice, prompt=f"busy {n}", num_images=1) for n in range(2)]
        refused = client.post("/api/generate/", json={"prompt": "one more", "num_images": 1}, headers=_auth(alice))
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert "2 jobs in progress" in refused.json()["detail"]
        create_job(client, bob, prompt="bob is not limited by alice", num_images=1)
        client.post(f"/api/generate/{jobs[0]}/cancel", headers=_auth(alice))
        create_job(client, alice, prompt="a slot is free again", num_images=1)


@pytest.mark.slow
def test_queued_images_carry_their_place_in_the_queue(live_server):
    with live_server(GENERATION_MAX_WORKERS=1, LOCAL_LATENCY_MS=400) as server, server.client() as client:
        token = login(client)
        first = create_job(client, token, prompt="first", num_images=3)
        second = create_job(client, token, prompt="second", num_images=2)
        snapshot = client.get(f"/api/generate/{second}", headers=_auth(token)).json()
        second_events = _finish(client, token, second)
        first_events = _finish(client, token, first)
    queued = {e.data["index"]: e.data["queue_position"] for e in second_events if e.data.get("status") == "queued"}
    # First images first: the second job's first image goes ahead of the first job's later
    # ones; its second image then takes its turn in the round-robin.
    assert queued == {0: 1, 1: 3}
    assert [e.data["queue_position"] for e in first_events if e.data.get("status") == "queued"] == [1, 2, 3]
    assert [image["queue_position"] for image in snapshot["images"]] == [1, 3]
