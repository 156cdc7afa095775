"""Image links over real HTTP, with the images in a real S3-compatible store (and, where the
link mode allows it, a local directory): proxy and presigned links, Range and conditional
requests, DELETE, retention, and readiness of the store."""

import asyncio
import time
import uuid

import httpx
import pytest

from app.core.config import S3Location
from app.services.image_store import ImageNotFoundError
from app.services.image_store_s3 import S3ImageStore
from tests.conftest import BOB, create_job, login, read_stream, wait_until
from tests.s3_server import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedS3


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _finished(client: httpx.Client, token: str, job_id: str) -> dict:
    events = read_stream(client, job_id, headers=_auth(token))
    assert events[-1].event == "done", events[-3:]
    return events[-1].data


def _bucket_of(settings) -> S3ImageStore:
    location = settings.image_store_location
    assert isinstance(location, S3Location)
    return S3ImageStore(location, settings.AWS_ENDPOINT_URL, ACCESS_KEY, SECRET_KEY, "us-east-1")


def _in_bucket(settings, key: str) -> bool:
    try:
        asyncio.run(_bucket_of(settings).size_of(key))
    except ImageNotFoundError:
        return False
    return True


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def store_settings(request) -> dict:
    return {} if request.param == "local" else request.getfixturevalue("s3").env()


def test_proxy_links_serve_ranges_and_answer_conditional_requests(live_server, store_settings):
    with live_server(**store_settings) as server, server.client() as client:
        token = login(client)
        done = _finished(client, token, create_job(client, token, prompt="a lighthouse", num_images=1))
        url = done["images"][0]["url"]

        whole = client.get(url)
        assert whole.status_code == 200
        assert whole.headers["content-type"] == "image/png"
        assert whole.headers["accept-ranges"] == "bytes"
        assert int(whole.headers["content-length"]) == len(whole.content)
        assert "immutable" in whole.headers["cache-control"]
        etag, size = whole.headers["etag"], len(whole.content)

        part = client.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206
        assert part.content == whole.content[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{size}"
        tail = client.get(url, headers={"Range": "bytes=-5"})
        assert (tail.status_code, tail.content) == (206, whole.content[-5:])
        assert client.get(url, headers={"Range": "bytes=100-"}).content == whole.content[100:]

        beyond = client.get(url, headers={"Range": f"bytes={size}-"})
        assert beyond.status_code == 416
        assert beyond.headers["content-range"] == f"bytes */{size}"
        assert "not satisfiable" in beyond.json()["detail"]
        # Malformed, or several ranges: the whole image, as HTTP allows.
        assert client.get(url, headers={"Range": "bytes=abc"}).status_code == 200
        assert client.get(url, headers={"Range": "bytes=0-1,5-6"}).content == whole.content
        # If-Range with another validator: the client's copy is not this one, so all of it.
        assert client.get(url, headers={"Range": "bytes=0-1", "If-Range": '"other"'}).status_code == 200
        assert client.get(url, headers={"Range": "bytes=0-1", "If-Range": etag}).status_code == 206

        for validator in (etag, f"W/{etag}", f'"x", {etag}', "*"):
            unchanged = client.get(url, headers={"If-None-Match": validator})
            assert (unchanged.status_code, unchanged.content) == (304, b""), validator
            assert unchanged.headers["etag"] == etag
        assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200


def test_presigned_links_redirect_to_the_store_for_the_rest_of_the_link_life(live_server, s3):
    with live_server(IMAGE_LINKS="presigned", **s3.env()) as server, server.client() as client:
        token = login(client)
        done = _finished(client, token, create_job(client, token, prompt="a harbour", num_images=2))
        url = done["images"][0]["url"]
        redirect = client.get(url)
        assert redirect.status_code == 307
        target = redirect.headers["location"]
        assert target.startswith(f"{s3.endpoint}/{BUCKET}/")
        assert "X-Amz-Signature=" in target
        expires = int(httpx.URL(url).params["expires"])
        presigned_for = int(httpx.URL(target).params["X-Amz-Expires"])
        # Valid for what is left of the link's life, no longer.
        assert 0 < presigned_for <= expires - int(time.time()) + 1
        image = httpx.get(target)  # no credentials: the URL is the permission
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert image.content.startswith(b"\x89PNG")
        # A tampered link is refused before any redirect.
        assert client.get(url.replace("signature=", "signature=0")).status_code == 403


def test_delete_removes_a_running_job_its_stream_its_links_and_its_images(live_server, s3):
    with live_server(LOCAL_LATENCY_MS=400, GENERATION_MAX_WORKERS=1, **s3.env()) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="delete me", num_images=4)
        first = read_stream(client, job_id, headers=_auth(token), stop=lambda e: e.data.get("status") == "succeeded")
        url = first[-1].data["url"]
        key = httpx.URL(url).path.rsplit("/", 1)[-1]
        assert client.get(url).status_code == 200 and _in_bucket(server.settings, key)
        # Another user cannot delete it: for them it does not exist.
        assert client.delete(f"/api/generate/{job_id}", headers=_auth(login(client, BOB))).status_code == 404

        deleted = client.delete(f"/api/generate/{job_id}", headers=_auth(token))
        assert (deleted.status_code, deleted.content) == (204, b"")

        assert client.get(f"/api/generate/{job_id}", headers=_auth(token)).status_code == 404
        assert client.get(f"/api/generate/{job_id}/stream", headers=_auth(token)).status_code == 404
        gone = client.get(url)
        assert gone.status_code == 404 and gone.json() == {"detail": "Image not found"}
        listed = client.get("/api/generate/", headers=_auth(token)).json()["jobs"]
        assert job_id not in [job["job_id"] for job in listed]
        assert client.delete(f"/api/generate/{job_id}", headers=_auth(token)).status_code == 404
        assert not _in_bucket(server.settings, key)
        # The image that was being made when the job was deleted is not kept either.
        wait_until(
            lambda: not any(_in_bucket(server.settings, f"{job_id}-{n}.png") for n in range(4)),
            timeout=10,
            what="the images of the deleted job to be gone from the bucket",
        )
        # The service goes on.
        assert (
            _finished(client, token, create_job(client, token, prompt="after", num_images=1))["status"] == "succeeded"
        )


@pytest.mark.slow
def test_retention_deletes_old_jobs_with_their_images_and_keeps_new_ones(live_server, s3):
    retention_seconds = 4
    settings = {"JOB_RETENTION_DAYS": retention_seconds / 86_400, "LOCAL_LATENCY_MS": 10, **s3.env()}
    with live_server(**settings) as server, server.client() as client:
        token = login(client)
        old = create_job(client, token, prompt="old", num_images=2)
        old_key = httpx.URL(_finished(client, token, old)["images"][0]["url"]).path.rsplit("/", 1)[-1]
        assert _in_bucket(server.settings, old_key)

        wait_until(
            lambda: client.get(f"/api/generate/{old}", headers=_auth(token)).status_code == 404,
            timeout=retention_seconds + 10,
            what="retention to delete the old job",
        )
        assert not _in_bucket(server.settings, old_key)

        new = create_job(client, token, prompt="new", num_images=1)
        new_url = _finished(client, token, new)["images"][0]["url"]
        # Finished just now, far younger than the retention: kept, with its image.
        assert client.get(f"/api/generate/{new}", headers=_auth(token)).status_code == 200
        assert client.get(new_url).status_code == 200


@pytest.mark.slow
def test_a_store_that_turns_read_only_makes_the_service_unready_and_fails_images_with_a_reason(live_server, s3):
    prefix = f"read-only-{uuid.uuid4().hex[:6]}"
    with live_server(LOCAL_LATENCY_MS=10, **s3.env(prefix)) as server, server.client() as client:
        token = login(client)
        assert client.get("/readyz").status_code == 200
        s3.read_only(prefix)
        try:
            wait_until(lambda: client.get("/readyz").status_code == 503, timeout=30, what="/readyz to fail")
            assert client.get("/readyz").json()["checks"]["image_store"]["detail"].startswith("not writable: ")
            refused = _finished(client, token, create_job(client, token, prompt="nowhere to go", num_images=1))
            assert refused["status"] == "failed"
            assert refused["images"][0]["error"].startswith("The image could not be kept: ")
        finally:
            s3.read_only(prefix, False)
        wait_until(lambda: client.get("/readyz").status_code == 200, timeout=30, what="/readyz to recover")
        kept = _finished(client, token, create_job(client, token, prompt="kept again", num_images=1))
        assert kept["status"] == "succeeded" and client.get(kept["images"][0]["url"]).status_code == 200


@pytest.mark.slow  # weed takes seconds to come back with its data
def test_a_store_that_goes_away_makes_the_service_unready_until_it_is_back(live_server, tmp_path):
    own = SeaweedS3(tmp_path / "own-s3")
    store = own.env(f"readiness-{uuid.uuid4().hex[:6]}")
    with own, live_server(**store) as server, server.client() as client:
        assert client.get("/readyz").json()["checks"]["image_store"] == {"ok": True, "detail": "writable"}
        token = login(client)
        earlier = create_job(client, token, prompt="made before", num_images=1)
        earlier_url = _finished(client, token, earlier)["images"][0]["url"]
        own.kill()
        wait_until(lambda: client.get("/readyz").status_code == 503, timeout=30, what="/readyz to fail")
        check = client.get("/readyz").json()["checks"]["image_store"]
        assert check["ok"] is False
        assert own.endpoint not in check["detail"] and "127.0.0.1" not in check["detail"]
        assert client.get("/healthz").status_code == 200  # up, just not ready
        # Neither an image link nor a DELETE can be answered: both say so, and nothing is lost.
        unavailable = client.get(earlier_url)
        assert unavailable.status_code == 503 and unavailable.headers["retry-after"]
        not_now = client.delete(f"/api/generate/{earlier}", headers=_auth(token))
        assert not_now.status_code == 503 and not_now.headers["retry-after"]
        assert not_now.json()["detail"].startswith("The image")
        assert client.get(f"/api/generate/{earlier}", headers=_auth(token)).status_code == 200

        own.start()
        wait_until(lambda: client.get("/readyz").status_code == 200, timeout=30, what="/readyz to recover")
        assert client.get(earlier_url).status_code == 200
        assert client.delete(f"/api/generate/{earlier}", headers=_auth(token)).status_code == 204
        assert client.get(earlier_url).status_code == 404
        done = _finished(client, token, create_job(client, token, prompt="after the outage", num_images=1))
        assert done["status"] == "succeeded"
        assert client.get(done["images"][0]["url"]).status_code == 200
