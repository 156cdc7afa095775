"""Jobs over real HTTP on the local provider: events, ids, resume, subscribers, isolation."""

import io
import threading

import pytest
from PIL import Image

from tests.conftest import BOB, create_job, login, read_stream


def _ids(events):
    return [int(e.id) for e in events if e.event != "keepalive"]


def test_a_job_streams_every_state_change_then_done(live_server):
    with live_server(LOCAL_LATENCY_MS=100) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="  a red fox in the snow  ", num_images=4, seed=7)
        events = read_stream(client, job_id, headers={"Authorization": f"Bearer {token}"})

        assert _ids(events) == list(range(1, len(events) + 1))
        progress = [e.data for e in events if e.event == "progress"]
        assert [e.event for e in events] == ["progress"] * 12 + ["done"]
        for index in range(4):
            statuses = [p["status"] for p in progress if p["index"] == index]
            assert statuses == ["queued", "running", "succeeded"]
        assert all(p["job_id"] == job_id and p["total"] == 4 for p in progress)
        assert [p["completed"] for p in progress if p["status"] == "succeeded"] == [1, 2, 3, 4]
        assert all("url" in p for p in progress if p["status"] == "succeeded")

        done = events[-1].data
        assert done["status"] == "succeeded"
        assert done["job_id"] == job_id
        assert 0 < done["ttfi_ms"] <= done["total_ms"]
        assert [image["index"] for image in done["images"]] == [0, 1, 2, 3]
        first_success = min(p["elapsed_ms"] for p in progress if p["status"] == "succeeded")
        assert done["ttfi_ms"] == first_success

        snapshot = client.get(f"/api/generate/{job_id}", headers={"Authorization": f"Bearer {token}"}).json()
        assert snapshot["status"] == "succeeded"
        assert snapshot["prompt"] == "a red fox in the snow"
        assert snapshot["images"] == done["images"]
        assert snapshot["ttfi_ms"] == done["ttfi_ms"] and snapshot["total_ms"] == done["total_ms"]

        # The URL loads with no headers at all, as an <img> tag would load it.
        pictures = []
        for image in done["images"]:
            response = client.get(image["url"], headers={"Authorization": ""})
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/png"
            picture = Image.open(io.BytesIO(response.content))
            assert picture.size[0] >= 512 and picture.size[1] >= 512
            pictures.append(response.content)
        assert len(set(pictures)) == 4  # seed + i: each image differs


@pytest.mark.slow
def test_images_run_concurrently_not_one_after_another(live_server):
    with live_server(LOCAL_LATENCY_MS=400, GENERATION_MAX_WORKERS=8) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="eight at once", num_images=8)
        done = read_stream(client, job_id, headers={"Authorization": f"Bearer {token}"})[-1].data
        assert done["status"] == "succeeded"
        assert all(image["latency_ms"] >= 400 for image in done["images"])
        # In sequence the batch would take 8 × 400 ms; in parallel about one image's time.
        assert done["total_ms"] < 4 * 400


def test_late_subscriber_gets_the_whole_stream(live_server):
    with live_server() as server, server.client() as client:
        token = login(client)
        headers = {"Authorization": f"Bearer {token}"}
        job_id = create_job(client, token, prompt="late", num_images=2)
        first = read_stream(client, job_id, headers=headers)
        late = read_stream(client, job_id, headers=headers)
        assert [(e.id, e.event, e.data) for e in late] == [(e.id, e.event, e.data) for e in first]
        assert late[-1].event == "done"


def test_last_event_id_resumes_exactly_after_that_event(live_server):
    with live_server(LOCAL_LATENCY_MS=200) as server, server.client() as client:
        token = login(client)
        headers = {"Authorization": f"Bearer {token}"}
        job_id = create_job(client, token, prompt="resume", num_images=3)
        # Drop the connection mid-job, after the first running event.
        head = read_stream(client, job_id, headers=headers, stop=lambda e: e.data.get("status") == "running")
        rest = read_stream(client, job_id, headers={**headers, "Last-Event-ID": head[-1].id})
        whole = read_stream(client, job_id, headers=headers)
        assert [(e.id, e.data) for e in head + rest] == [(e.id, e.data) for e in whole]
        assert rest[-1].event == "done"


@pytest.mark.parametrize("last_event_id", ["abc", "1.5", "", "-3", "9" * 40])
def test_a_last_event_id_we_never_sent_replays_from_the_start(live_server, last_event_id):
    with live_server() as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="x", num_images=1)
        headers = {"Authorization": f"Bearer {token}"}
        events = read_stream(client, job_id, headers={**headers, "Last-Event-ID": last_event_id})
        assert events[0].id == "1" and events[-1].event == "done"


@pytest.mark.slow
def test_a_subscriber_joining_mid_job_gets_the_past_then_the_rest_live(live_server):
    with live_server(LOCAL_LATENCY_MS=300, GENERATION_MAX_WORKERS=1) as server, server.client() as client:
        token = login(client)
        headers = {"Authorization": f"Bearer {token}"}
        job_id = create_job(client, token, prompt="joining", num_images=3)
        # Wait until the job is under way: the first image has finished, two remain.
        first = read_stream(client, job_id, headers=headers, stop=lambda e: e.data.get("status") == "succeeded")
        joined = read_stream(client, job_id, headers=headers)
        assert [(e.id, e.data) for e in joined[: len(first)]] == [(e.id, e.data) for e in first]
        assert joined[-1].event == "done" and len(joined) > len(first)
        snapshot = client.get(f"/api/generate/{job_id}", headers=headers).json()
        assert snapshot["status"] == "succeeded"


@pytest.mark.slow
def test_two_subscribers_at_once_each_get_every_event(live_server):
    with live_server(LOCAL_LATENCY_MS=300) as server, server.client() as client:
        token = login(client)
        headers = {"Authorization": f"Bearer {token}"}
        job_id = create_job(client, token, prompt="shared", num_images=4)
        results: dict[str, list] = {}

        def subscribe(name):
            with server.client() as own_client:
                results[name] = read_stream(own_client, job_id, headers=headers)

        threads = [threading.Thread(target=subscribe, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert results["a"][-1].event == "done"
        assert [(e.id, e.data) for e in results["a"]] == [(e.id, e.data) for e in results["b"]]
        assert len(results["a"]) == 13


@pytest.mark.slow
def test_jobs_belong_to_their_creator(live_server):
    with live_server() as server, server.client() as client:
        alice = login(client)
        bob = login(client, BOB)
        job_id = create_job(client, alice, prompt="mine", num_images=1)
        for target in (job_id, "job_doesnotexist"):
            snapshot = client.get(f"/api/generate/{target}", headers={"Authorization": f"Bearer {bob}"})
            stream = client.get(f"/api/generate/{target}/stream", params={"access_token": bob})
            assert snapshot.status_code == stream.status_code == 404
            assert snapshot.json() == stream.json() == {"detail": "Job not found"}


def test_stream_accepts_the_token_as_a_query_parameter(live_server):
    with live_server() as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="eventsource", num_images=1)
        events = read_stream(client, job_id, params={"access_token": token})
        assert events[-1].event == "done"
        unauthorized = client.get(f"/api/generate/{job_id}/stream", params={"access_token": "forged"})
        assert unauthorized.status_code == 401
        assert client.get(f"/api/generate/{job_id}/stream").status_code == 401


@pytest.mark.slow
def test_keepalive_is_sent_while_the_stream_is_quiet(live_server):
    with live_server(LOCAL_LATENCY_MS=700, SSE_KEEPALIVE_SECONDS=0.2) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="quiet", num_images=1)
        events = read_stream(client, job_id, params={"access_token": token})
        keepalives = [e for e in events if e.event == "keepalive"]
        assert keepalives, "no keepalive during 700 ms of silence at a 200 ms interval"
        assert all(e.id is None for e in keepalives)
        assert events[-1].event == "done"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": "   ", "num_images": 1}, "at least 1 character"),
        ({"prompt": "x" * 2001, "num_images": 1}, "at most 2000 characters"),
        ({"prompt": "ok", "num_images": 0}, "greater than or equal to 1"),
        ({"prompt": "ok", "num_images": 9}, "between 1 and 8"),
        ({"prompt": "ok", "num_images": "four"}, "valid integer"),
        ({"prompt": "ok", "num_images": "2"}, "valid integer"),
        ({"prompt": "ok", "num_images": True}, "valid integer"),
        ({"prompt": "ok", "num_images": 2.5}, "valid integer"),
        ({"prompt": "ok", "num_images": 1, "seed": -1}, "greater than or equal to 0"),
        ({"prompt": "ok", "num_images": 1, "colour": "red"}, "Extra inputs are not permitted"),
        ({"num_images": 1}, "Field required"),
    ],
)
def test_invalid_job_requests_are_422_with_a_message(live_server, body, fragment):
    with live_server() as server, server.client() as client:
        token = login(client)
        response = client.post("/api/generate/", json=body, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 422
        assert fragment in response.text


@pytest.mark.parametrize(
    "raw", [b'{"prompt": "ok", "num_images": 1e400}', b'{"prompt": "\\ud800", "num_images": 1}', b"[]", b"{"]
)
def test_odd_json_is_a_422_not_a_500(live_server, raw):
    with live_server() as server, server.client() as client:
        token = login(client)
        response = client.post(
            "/api/generate/",
            content=raw,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        assert response.status_code == 422, response.text


def test_creating_a_job_needs_a_token(live_server):
    with live_server() as server, server.client() as client:
        assert client.post("/api/generate/", json={"prompt": "x", "num_images": 1}).status_code == 401


def test_unknown_image_and_path_traversal_are_refused(live_server):
    with live_server() as server, server.client() as client:
        signed = {"expires": "4102444800", "signature": "0" * 64}
        assert client.get("/api/images/job_nothing-0.png", params=signed).status_code == 403
        assert client.get("/api/images/..%2F..%2Fetc%2Fpasswd", params=signed).status_code == 404
        assert client.get("/api/images/job_nothing-0.png").status_code == 422  # unsigned


def test_a_whole_number_written_as_2_0_is_the_integer_2(live_server):
    # JSON has one number type, and JSON Schema's `integer` takes 2.0: a client that sends it
    # (Python's json.dumps of a float, say) asked for two images.
    with live_server() as server, server.client() as client:
        token = login(client)
        body = {"prompt": "ok", "num_images": 2.0, "seed": 7.0}
        response = client.post("/api/generate/", json=body, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 202
        snapshot = client.get(response.headers["Location"], headers={"Authorization": f"Bearer {token}"}).json()
        assert snapshot["num_images"] == 2 and snapshot["seed"] == 7
