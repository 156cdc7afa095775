"""Tests of tests/fake_replicate.py, driven by the real ``replicate`` 1.0.7 client."""

from __future__ import annotations

import io
import re
import threading
import time

import httpx
import pydantic.v1
import pytest
import replicate
from PIL import Image
from replicate.exceptions import ModelError, ReplicateError

try:  # tests/ is a package (tests/__init__.py)
    from tests.fake_replicate import FLUX_SCHNELL, FakeReplicate, Fault, Rule
except ImportError:  # tests/ on sys.path as a plain directory
    from fake_replicate import FLUX_SCHNELL, FakeReplicate, Fault, Rule

MODEL = FLUX_SCHNELL


@pytest.fixture
def fake():
    with FakeReplicate() as f:
        yield f
    assert f.errors == []


def make_client(fake: FakeReplicate, token: str | None = "r8_test", **kwargs) -> replicate.Client:
    client = replicate.Client(api_token=token, base_url=fake.base_url, **kwargs)
    client.poll_interval = 0.02
    return client


def status_of(pid: str):
    return lambda f: f.predictions[pid]["status"]


def create_requests(fake: FakeReplicate):
    return [r for r in fake.requests if r.method == "POST" and r.path.endswith("/predictions")]


# ---------------------------------------------------------------------------
# Happy paths
# ---------------------------------------------------------------------------


def test_sync_create_succeeds_within_wait(fake):
    client = make_client(fake)
    pred = client.models.predictions.create(
        model=MODEL, input={"prompt": "a red fox", "num_outputs": 2, "output_format": "png"}, wait=True
    )
    assert pred.status == "succeeded"
    assert re.fullmatch(r"[a-z0-9]{26}", pred.id)
    assert pred.model == MODEL
    assert pred.error is None
    assert isinstance(pred.output, list) and len(pred.output) == 2
    for i, url in enumerate(pred.output):
        assert url == f"{fake.base_url}/files/{pred.id}/out-{i}.png"
    assert pred.created_at.endswith("Z") and pred.completed_at.endswith("Z") and pred.started_at.endswith("Z")
    assert set(pred.metrics) >= {"predict_time", "total_time"}
    assert set(pred.urls) == {"get", "cancel", "web"}
    assert fake.created()[0]["id"] == pred.id
    assert fake.predictions[pred.id]["status"] == "succeeded"


def test_run_returns_plain_str_urls_for_http_outputs(fake):
    client = make_client(fake)
    out = client.run(MODEL, input={"prompt": "a cat"})
    # http:// URLs are not wrapped in FileOutput by the client (only https:/data:)
    assert isinstance(out, list) and len(out) == 1 and type(out[0]) is str
    assert out[0].startswith(fake.base_url + "/files/")


def test_raw_create_shape_and_headers(fake):
    with httpx.Client(base_url=fake.base_url, headers={"Authorization": "Token r8_test"}) as http:
        r = http.post(f"/v1/models/{MODEL}/predictions", json={"input": {"prompt": "x"}}, headers={"Prefer": "wait=5"})
        assert r.status_code == 201
        assert r.headers["preference-applied"] == "wait=5"
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["status"] == "succeeded"
        assert body["logs"].startswith("running quantized prediction")
        assert body["data_removed"] is False and body["error"] is None
        assert all(isinstance(v, str) for v in body["urls"].values())

        # Without Prefer: 201 "starting", no output yet.
        r = http.post(f"/v1/models/{MODEL}/predictions", json={"input": {"prompt": "y"}})
        assert r.status_code == 201 and "preference-applied" not in r.headers
        body = r.json()
        assert body["status"] == "starting" and body.get("output") is None
        assert "completed_at" not in body and "metrics" not in body

        # Keep-alive: all of the above went over a single connection without trouble.
        assert http.get("/v1/webhooks/default/secret").json()["key"].startswith("whsec_")
        r = http.get("/v1/nope")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


def test_prediction_outlasting_wait_is_polled_with_reload():
    with FakeReplicate(wait_cap=0.05) as fake:
        fake.add_rule(Rule(match="slow", latency=0.6, starting=0.3))
        client = make_client(fake)
        t0 = time.monotonic()
        pred = client.models.predictions.create(model=MODEL, input={"prompt": "slow boat"}, wait=True)
        assert time.monotonic() - t0 < 0.3  # held only wait_cap seconds
        assert pred.status == "starting" and pred.output is None
        assert create_requests(fake)[0].headers["prefer"] == "wait"

        fake.wait_for(lambda f: status_of(pred.id)(f) == "processing")
        pred.reload()
        assert pred.status == "processing" and pred.started_at and pred.completed_at is None

        fake.wait_for(lambda f: status_of(pred.id)(f) == "succeeded")
        pred.reload()
        assert pred.status == "succeeded"
        assert len(pred.output) == 1
        assert pred.metrics["total_time"] == pytest.approx(0.6, abs=0.01)
        assert pred.metrics["predict_time"] == pytest.approx(0.3, abs=0.01)
        gets = [r for r in fake.requests if r.method == "GET" and r.path == f"/v1/predictions/{pred.id}"]
        assert len(gets) == 2


def test_run_polls_until_done_when_wait_expires():
    with FakeReplicate(wait_cap=0.05, latency=0.3) as fake:
        client = make_client(fake)
        out = client.run(MODEL, input={"prompt": "a dog"})
        assert len(out) == 1 and out[0].startswith(fake.base_url)
        assert any(r.method == "GET" and r.path.startswith("/v1/predictions/") for r in fake.requests)


def test_prediction_wait_true_int_is_sent_and_capped():
    with FakeReplicate(wait_cap=0.05) as fake:
        fake.add_rule(Rule(match="forever", never_finish=True, starting=0))
        client = make_client(fake)
        pred = client.models.predictions.create(model=MODEL, input={"prompt": "forever"}, wait=3)
        # A sync reply in "processing" is final for the client (issue #385): output stays None.
        assert pred.status == "processing"
        assert create_requests(fake)[0].headers["prefer"] == "wait=3"


# ---------------------------------------------------------------------------
# Cancel
# ---------------------------------------------------------------------------


def test_cancel(fake):
    fake.add_rule(Rule(match="forever", never_finish=True))
    client = make_client(fake)
    pred = client.models.predictions.create(model=MODEL, input={"prompt": "forever young"}, wait=False)
    assert pred.status == "starting"
    fake.wait_for(lambda f: status_of(pred.id)(f) == "processing")

    canceled = client.predictions.cancel(pred.id)
    assert canceled.status == "canceled" and canceled.output is None
    assert canceled.completed_at is not None
    pred.reload()
    assert pred.status == "canceled"
    cancel_reqs = [r for r in fake.requests if r.path == f"/v1/predictions/{pred.id}/cancel"]
    assert len(cancel_reqs) == 1 and cancel_reqs[0].method == "POST" and cancel_reqs[0].json is None

    # Cancelling a terminal prediction leaves it unchanged.
    done = client.models.predictions.create(model=MODEL, input={"prompt": "quick"}, wait=True)
    assert done.status == "succeeded"
    again = client.predictions.cancel(done.id)
    assert again.status == "succeeded" and again.output == done.output


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_unauthenticated_without_token(fake, monkeypatch):
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    client = make_client(fake, token=None)
    with pytest.raises(ReplicateError) as ei:
        client.models.predictions.create(model=MODEL, input={"prompt": "x"}, wait=True)
    assert ei.value.status == 401 and ei.value.title == "Unauthenticated"
    assert "authorization" not in fake.requests[-1].headers
    assert fake.created() == []


def test_unauthenticated_with_wrong_token(fake):
    client = make_client(fake, token="r8_wrong")
    with pytest.raises(ReplicateError) as ei:
        client.predictions.get("whatever")
    assert ei.value.status == 401
    assert ei.value.detail == "You did not pass a valid authentication token"
    assert fake.requests[-1].headers["authorization"] == "Bearer r8_wrong"


def test_429_on_create_is_not_retried(fake):
    fake.push_create_fault(Fault(status=429, retry_after=7))
    client = make_client(fake)
    with pytest.raises(ReplicateError) as ei:
        client.models.predictions.create(model=MODEL, input={"prompt": "x"}, wait=True)
    assert ei.value.status == 429
    assert ei.value.detail == "Request was throttled. Expected available in 7 seconds."
    assert len(create_requests(fake)) == 1 and fake.created() == []
    # The fault was one-shot.
    assert client.models.predictions.create(model=MODEL, input={"prompt": "x"}, wait=True).status == "succeeded"


def test_429_raw_headers(fake):
    fake.push_create_fault(Fault(status=429, retry_after=3))
    r = httpx.post(
        f"{fake.base_url}/v1/models/{MODEL}/predictions",
        json={"input": {"prompt": "x"}},
        headers={"Authorization": "Bearer r8_test"},
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json() == {
        "title": "Too Many Requests",
        "detail": "Request was throttled. Expected available in 3 seconds.",
        "status": 429,
    }


def test_get_faults_503_retried_500_and_html_not(fake):
    client = make_client(fake)
    pred = client.models.predictions.create(model=MODEL, input={"prompt": "x"}, wait=True)
    fake.push_get_fault(Fault(status=503, retry_after=0))
    fake.push_get_fault(Fault(status=429, retry_after=0))
    assert client.predictions.get(pred.id).status == "succeeded"  # RetryTransport retried twice
    assert len([r for r in fake.requests if r.path == f"/v1/predictions/{pred.id}"]) == 3

    fake.push_get_fault(Fault(status=500))
    with pytest.raises(ReplicateError) as ei:
        client.predictions.get(pred.id)
    assert ei.value.status == 500

    fake.push_get_fault(Fault(raw_body=b"<html>bad gateway</html>"))
    with pytest.raises(ReplicateError) as ei:
        client.predictions.get(pred.id)
    assert ei.value.status == 502 and ei.value.detail is None


def test_reset_and_hang_faults(fake):
    client = make_client(fake, timeout=httpx.Timeout(0.3))
    pred = client.models.predictions.create(model=MODEL, input={"prompt": "x"}, wait=True)

    fake.push_get_fault(Fault(reset=True))
    with pytest.raises(httpx.TransportError):
        client.predictions.get(pred.id)

    fake.push_get_fault(Fault(hang=2.0))
    with pytest.raises(httpx.ReadTimeout):
        client.predictions.get(pred.id)

    fake.push_create_fault(Fault(reset=True))
    with pytest.raises(httpx.TransportError):
        client.models.predictions.create(model=MODEL, input={"prompt": "x"}, wait=False)
    assert len(fake.created()) == 1
    assert client.predictions.get(pred.id).status == "succeeded"  # server still healthy


def test_validation_error_422(fake):
    client = make_client(fake)
    with pytest.raises(ReplicateError) as ei:
        client.models.predictions.create(model=MODEL, input={"num_inference_steps": 9}, wait=True)
    e = ei.value
    assert e.status == 422 and e.title == "Input validation failed"
    assert e.detail == "- input: prompt is required\n- input.num_inference_steps: Must be less than or equal to 4\n"
    r = httpx.post(
        f"{fake.base_url}/v1/models/{MODEL}/predictions",
        json={"input": {"prompt": "x", "output_format": "gif"}},
        headers={"Authorization": "Bearer r8_test"},
    )
    assert r.status_code == 422
    assert r.json()["invalid_fields"] == [
        {
            "type": "enum",
            "field": "input.output_format",
            "description": 'output_format must be one of the following: "webp", "jpg", "png"',
        }
    ]
    assert fake.created() == []


def test_unknown_model_404(fake):
    client = make_client(fake)
    with pytest.raises(ReplicateError) as ei:
        client.models.predictions.create(model="nobody/nothing", input={"prompt": "x"}, wait=True)
    assert ei.value.status == 404


def test_failed_prediction_raises_model_error(fake):
    fake.add_rule(Rule(match="explode", fail_error="CUDA out of memory"))
    client = make_client(fake)
    with pytest.raises(ModelError) as ei:
        client.run(MODEL, input={"prompt": "please explode"})
    assert str(ei.value) == "CUDA out of memory"
    assert ei.value.prediction.status == "failed" and ei.value.prediction.output is None


def test_aborted_status_breaks_client_validation(fake):
    fake.add_rule(Rule(match="abort", status="aborted", latency=0.05))
    client = make_client(fake)
    with pytest.raises(pydantic.v1.ValidationError):
        client.run(MODEL, input={"prompt": "abort"})
    assert fake.created()[0]["status"] == "aborted"


# ---------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------


def test_download_output_png(fake):
    client = make_client(fake)
    pred = client.models.predictions.create(model=MODEL, input={"prompt": "a", "num_outputs": 2}, wait=True)
    images = []
    with httpx.Client() as http:  # no auth: the file host does not require it
        for url in pred.output:
            r = http.get(url)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            img = Image.open(io.BytesIO(r.content))
            img.load()
            assert img.format == "PNG" and img.size == (64, 64)
            images.append(r.content)
    assert images[0] != images[1]
    # The replicate client's own httpx client (sends the Bearer token) works too.
    assert client._client.get(pred.output[0]).content == images[0]
    assert fake.requests[-1].headers["authorization"] == "Bearer r8_test"
    # Before success, and for unknown ids, files are 404.
    assert httpx.get(f"{fake.base_url}/files/{'x' * 26}/out-0.png").status_code == 404


def test_output_rules(fake):
    fake.add_rule(Rule(match="gone", output_http_status=404))
    fake.add_rule(Rule(match="junk", output_body=b"not an image"))
    fake.add_rule(Rule(match="nsfw", outputs=0))
    client = make_client(fake)
    gone = client.run(MODEL, input={"prompt": "gone"})
    assert httpx.get(gone[0]).status_code == 404
    junk = client.run(MODEL, input={"prompt": "junk"})
    r = httpx.get(junk[0])
    assert r.content == b"not an image" and r.headers["content-type"].startswith("text/plain")
    assert client.run(MODEL, input={"prompt": "nsfw", "num_outputs": 2}) == []


def test_data_output_mode():
    with FakeReplicate(output_mode="data") as fake:
        client = make_client(fake)
        out = client.run(MODEL, input={"prompt": "a"})
        assert isinstance(out[0], replicate.helpers.FileOutput)
        assert out[0].url.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(out[0].read()))
        assert img.format == "PNG"
        assert not any(r.path.startswith("/files/") for r in fake.requests)


# ---------------------------------------------------------------------------
# Request log, version path, concurrency, shutdown
# ---------------------------------------------------------------------------


def test_request_log(fake):
    client = make_client(fake)
    pred = client.models.predictions.create(
        model=MODEL, input={"prompt": "log me", "seed": 42}, wait=True, webhook="https://example.com/hook"
    )
    pred.reload()
    methods_paths = [(r.method, r.path) for r in fake.requests]
    assert methods_paths == [
        ("POST", f"/v1/models/{MODEL}/predictions"),
        ("GET", f"/v1/predictions/{pred.id}"),
    ]
    create = fake.requests[0]
    assert create.json == {"input": {"prompt": "log me", "seed": 42}, "webhook": "https://example.com/hook"}
    assert create.headers["authorization"] == "Bearer r8_test"
    assert create.headers["prefer"] == "wait"
    assert create.headers["user-agent"] == "replicate-python/1.0.7"
    assert create.headers["content-type"] == "application/json"
    assert fake.requests[1].json is None
    assert fake.created()[0]["input"] == {"prompt": "log me", "seed": 42}
    assert fake.created()[0]["webhook"] == "https://example.com/hook"
    assert "Using seed: 42" in pred.logs


def test_version_create_path(fake):
    client = make_client(fake)
    pred = client.predictions.create(version="abc123", input={"prompt": "v"}, wait=True)
    assert pred.status == "succeeded" and pred.version == "abc123"
    assert fake.requests[0].path == "/v1/predictions"
    assert fake.requests[0].json == {"input": {"prompt": "v"}, "version": "abc123"}
    out = client.run(f"{MODEL}:abc123", input={"prompt": "v"})
    assert len(out) == 1
    assert any(r.path == f"/v1/models/{MODEL}/versions/abc123" for r in fake.requests)


def test_concurrent_runs_share_one_client(fake):
    client = make_client(fake)
    _ = client._client  # build the lazily-created httpx client before threading
    results: list = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        out = client.run(MODEL, input={"prompt": f"p{i}"})
        with lock:
            results.append(out)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert len(results) == 12 and len(fake.created()) == 12
    assert len({r[0] for r in results}) == 12


def test_stop_releases_held_wait_requests():
    fake = FakeReplicate().start()
    fake.add_rule(Rule(match="forever", never_finish=True))
    client = make_client(fake)
    outcome: dict = {}

    def hold() -> None:
        try:
            outcome["pred"] = client.models.predictions.create(model=MODEL, input={"prompt": "forever"}, wait=True)
        except Exception as exc:
            outcome["exc"] = exc

    t = threading.Thread(target=hold)
    t.start()
    fake.wait_for(lambda f: len(f.created()) == 1)
    t0 = time.monotonic()
    fake.stop()
    t.join(timeout=3)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 1.5
    if "pred" in outcome:
        assert outcome["pred"].status in ("starting", "processing")
    with pytest.raises(httpx.ConnectError):
        httpx.get(fake.base_url + "/v1/webhooks/default/secret", timeout=1)


def test_wait_for_times_out(fake):
    with pytest.raises(TimeoutError):
        fake.wait_for(lambda f: False, timeout=0.05)
