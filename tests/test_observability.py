"""Health, readiness, Prometheus metrics during a job, retries as events, and the OpenAPI docs."""

import asyncio
import logging
import shutil
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import OperationalError

from app.core.metrics import Metrics
from app.providers.local import LocalProvider
from app.services.health_service import HealthService
from app.services.image_store import LocalImageStore
from tests.conftest import create_job, login, read_stream, wait_until
from tests.fake_replicate import Fault


def _samples(client) -> dict[tuple, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_health_and_readiness(live_server, tmp_path, caplog):
    with live_server() as server, server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready"
        assert set(body["checks"]) == {"database", "writes", "image_store", "provider"}
        assert all(check["ok"] is True for check in body["checks"].values())
        assert body["checks"]["database"] == {"ok": True, "detail": "sqlite"}
        assert body["checks"]["provider"]["detail"].startswith("local")

        store = server.settings.image_store_location
        shutil.rmtree(store)
        with caplog.at_level(logging.WARNING, logger="myflix.health"):
            # The store is probed once a second at most, however often /readyz is asked.
            wait_until(lambda: client.get("/readyz").status_code == 503, timeout=5, what="/readyz to fail")
            not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.headers["content-type"] == "application/json"
        assert not_ready.json()["status"] == "not ready"
        assert not_ready.json()["checks"]["image_store"] == {"ok": False, "detail": "not writable (ENOENT)"}
        assert str(store) not in not_ready.text and str(tmp_path) not in not_ready.text
        # The path is in the log instead, once while the check keeps failing.
        logged = [r.getMessage() for r in caplog.records if str(store) in r.getMessage()]
        assert len(logged) == 1 and logged[0].startswith(f"not ready: the image store {store.as_uri()} is not writable")
        assert client.get("/healthz").status_code == 200  # up, just not ready


class _RefusingEngine:
    """An engine whose connections fail as a database that went away fails them."""

    class dialect:
        name = "postgresql"

    def connect(self):
        raise OperationalError("SELECT 1", {}, OSError("connection to /run/postgresql/.s.PGSQL.5432 refused"))


async def _no_depth() -> int:
    return 0


def test_readiness_names_a_failing_database_and_writes_without_their_errors(tmp_path, caplog):
    health = HealthService(
        _RefusingEngine(),
        write_failure=lambda: "disk I/O error at /srv/myflix/data/myflix.db",
        image_store=LocalImageStore(tmp_path),
        provider=LocalProvider(latency_ms=0, jitter_ms=0),
        metrics=Metrics(),
        queue_depth=_no_depth,
        work_queue_failure=lambda: "ConnectionRefusedError: 10.0.0.7:5432",
    )
    with caplog.at_level(logging.WARNING, logger="myflix.health"):
        checks = asyncio.run(health.readiness())
    assert {name: check.ok for name, check in checks.items()} == {
        "database": False,
        "writes": False,
        "image_store": True,
        "provider": True,
        "work_queue": False,
    }
    assert checks["database"].detail == "unreachable"
    assert "/" not in " ".join(check.detail for check in checks.values() if not check.ok)
    assert any("/run/postgresql/.s.PGSQL.5432 refused" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_metrics_show_a_job_in_flight_and_its_outcome(live_server):
    with live_server(LOCAL_LATENCY_MS=600, GENERATION_MAX_WORKERS=2) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="measured", num_images=4)
        seen: list = []
        follower = threading.Thread(
            target=lambda: read_stream(
                server.client(), job_id, params={"access_token": token}, stop=lambda e: seen.append(e) or False
            )
        )
        follower.start()
        wait_until(lambda: len(seen) >= 6, what="two images running")  # 4 queued + 2 running
        during = _samples(client)
        assert during[("myflix_busy_workers", ())] == 2
        assert during[("myflix_queued_images", ())] == 2
        assert during[("myflix_open_streams", ())] == 1
        follower.join(timeout=30)

        after = _samples(client)
        done = {("outcome", "succeeded"), ("provider", "local")}
        assert after[("myflix_jobs_total", tuple(sorted(done)))] == 1
        assert after[("myflix_images_total", tuple(sorted(done)))] == 4
        assert after[("myflix_ttfi_seconds_count", tuple(sorted(done)))] == 1
        assert after[("myflix_batch_seconds_count", tuple(sorted(done)))] == 1
        assert after[("myflix_image_latency_seconds_count", tuple(sorted(done)))] == 4
        assert after[("myflix_busy_workers", ())] == 0
        assert after[("myflix_open_streams", ())] == 0
        assert after[("myflix_event_loop_lag_seconds_count", ())] > 0  # the probe runs


def test_retries_are_progress_events_and_counted(live_server, fake_replicate):
    fake_replicate.push_create_fault(Fault(status=429, retry_after=0))
    with (
        live_server(
            IMAGE_PROVIDER="replicate",
            REPLICATE_API_TOKEN=fake_replicate.token,
            REPLICATE_BASE_URL=fake_replicate.base_url,
        ) as server,
        server.client() as client,
    ):
        token = login(client)
        job_id = create_job(client, token, prompt="retried", num_images=1)
        events = read_stream(client, job_id, params={"access_token": token})
        samples = _samples(client)
    statuses = [e.data["status"] for e in events if e.event == "progress"]
    assert statuses == ["queued", "running", "retrying", "succeeded"]
    retry = next(e.data for e in events if e.data.get("status") == "retrying")
    assert retry["attempt"] == 1 and retry["delay_ms"] == 0 and "429" in retry["error"]
    assert samples[("myflix_provider_retries_total", (("provider", "replicate"),))] == 1


def test_openapi_documents_the_stream_events_examples_and_tags(live_server):
    with live_server() as server, server.client() as client:
        schema = client.get("/openapi.json").json()
    stream = schema["paths"]["/api/generate/{job_id}/stream"]["get"]
    event_refs = stream["responses"]["200"]["content"]["text/event-stream"]["schema"]["oneOf"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in event_refs} == {
        "ProgressEvent",
        "DoneEvent",
        "ErrorEvent",
        "KeepaliveEvent",
    }
    for name in ("ProgressEvent", "DoneEvent", "ErrorEvent"):
        assert "job_id" in schema["components"]["schemas"][name]["properties"]
    assert "`done`" in stream["responses"]["200"]["description"]
    assert schema["components"]["schemas"]["GenerateRequest"]["examples"]
    assert schema["components"]["schemas"]["LoginRequest"]["examples"]
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            assert operation.get("tags"), f"{method.upper()} {path} has no tag"
