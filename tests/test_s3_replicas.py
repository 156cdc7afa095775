"""Two API replicas with data directories of their own, sharing PostgreSQL, Redis and one
bucket of a real S3-compatible store: each serves the other's images, in both link modes, and
a job deleted on one is gone on both."""

import asyncio
import uuid

import httpx
import pytest
import redis

from app.core.config import S3Location
from app.services.image_store import ImageNotFoundError
from app.services.image_store_s3 import S3ImageStore
from tests.conftest import create_job, login, postgres_url, read_stream, redis_url
from tests.s3_server import ACCESS_KEY, BUCKET, SECRET_KEY

pytestmark = pytest.mark.slow  # it starts processes


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _in_bucket(prefix: str, endpoint: str, key: str) -> bool:
    store = S3ImageStore(S3Location(BUCKET, prefix), endpoint, ACCESS_KEY, SECRET_KEY, "us-east-1")
    try:
        asyncio.run(store.size_of(key))
    except ImageNotFoundError:
        return False
    return True


@pytest.fixture
def replicas(service_process, tmp_path, s3):
    redis_at = redis_url()
    key_prefix = f"test-{uuid.uuid4().hex[:12]}"
    bucket_prefix = f"replicas-{uuid.uuid4().hex[:8]}"

    def start(links: str) -> list:
        env = {
            "DATABASE_URL": postgres_url(),
            "REDIS_URL": redis_at,
            "REDIS_KEY_PREFIX": key_prefix,
            "IMAGE_PROVIDER": "local",
            "LOCAL_LATENCY_MS": "100",
            "LOCAL_LATENCY_JITTER_MS": "0",
            "IMAGE_LINKS": links,
            **s3.env(bucket_prefix),
        }
        return [service_process(**env, DATA_DIR=str(tmp_path / f"replica-{n}")) for n in range(2)]

    yield start, bucket_prefix, s3.endpoint
    client = redis.Redis.from_url(redis_at)
    keys = list(client.scan_iter(f"{key_prefix}:*"))
    if keys:
        client.delete(*keys)


@pytest.mark.parametrize("links", ["proxy", "presigned"])
def test_each_replica_serves_the_other_images_and_a_deletion_on_one_holds_on_both(replicas, links):
    start, bucket_prefix, endpoint = replicas
    a, b = start(links)
    with a.client() as on_a, b.client() as on_b:
        token = login(on_a)
        job_id = create_job(on_a, token, prompt="shared", num_images=2)
        events = read_stream(on_a, job_id, headers=_auth(token))
        assert events[-1].event == "done" and events[-1].data["status"] == "succeeded", events[-3:]
        # The links as the other replica signs them.
        snapshot = on_b.get(f"/api/generate/{job_id}", headers=_auth(token)).json()
        urls = [image["url"] for image in snapshot["images"]]
        for url in urls:
            answer = on_b.get(url)
            if links == "presigned":
                assert answer.status_code == 307
                answer = httpx.get(answer.headers["location"])
            assert answer.status_code == 200
            assert answer.headers["content-type"] == "image/png"
            assert answer.content.startswith(b"\x89PNG")
        keys = [httpx.URL(url).path.rsplit("/", 1)[-1] for url in urls]
        assert all(_in_bucket(bucket_prefix, endpoint, key) for key in keys)

        assert on_b.delete(f"/api/generate/{job_id}", headers=_auth(token)).status_code == 204
        for replica in (on_a, on_b):
            assert replica.get(f"/api/generate/{job_id}", headers=_auth(token)).status_code == 404
            assert replica.get(f"/api/generate/{job_id}/stream", headers=_auth(token)).status_code == 404
            assert all(replica.get(url).status_code == 404 for url in urls)
            jobs = replica.get("/api/generate/", headers=_auth(token)).json()["jobs"]
            assert job_id not in [job["job_id"] for job in jobs]
        assert not any(_in_bucket(bucket_prefix, endpoint, key) for key in keys)
