"""Health, readiness, Prometheus metrics during a job, retries as events, and the OpenAPI docs."""

import shutil
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

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


def test_health_and_readiness(live_server, tmp_path):
    with live_server() as server, server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready"
        assert set(body["checks"]) == {"database", "image_store", "provider"}
        assert body["checks"]["database"] == {"ok": True, "detail": "sqlite"}
        assert body["checks"]["provider"]["detail"].startswith("local")

        shutil.rmtree(server.settings.image_store_dir)
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["checks"]["image_store"]["ok"] is False
        assert client.get("/healthz").status_code == 200  # up, just not ready


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
