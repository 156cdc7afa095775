"""A real service process stopped mid-job (SIGTERM, SIGKILL) and started again: the job ends,
and a stream that resumes with Last-Event-ID gets the rest with no duplicate and no gap."""

import signal
import threading

import httpx
import pytest

from tests.conftest import create_job, login, query_database, read_stream, wait_until
from tests.fake_replicate import FakeReplicate

pytestmark = pytest.mark.slow  # every test here starts processes


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def _resume_after_restart(service, job_id, head):
    """Reconnect with the last id seen before the restart; check the rest fits the head exactly.
    Returns (the rest, the whole stream replayed)."""
    with service.client() as client:
        token = login(client)
        rest = read_stream(client, job_id, headers={**_auth(token), "Last-Event-ID": head[-1].id})
        whole = read_stream(client, job_id, headers=_auth(token))
    ids = [int(e.id) for e in head + rest]
    assert ids == list(range(1, len(ids) + 1)), "a gap or a duplicate across the restart"
    assert [(e.id, _unsigned(e.data)) for e in head + rest] == [(e.id, _unsigned(e.data)) for e in whole]
    assert rest[-1].event == "done"
    return rest, whole


def _unsigned(data: dict) -> dict:
    """The event without its links' signatures: a link is signed when it is sent, so two sends
    on either side of an expiry window's edge (every hour at most) carry different ones."""

    def strip(url: str | None) -> str | None:
        return None if url is None else url.split("?", 1)[0]

    images = [{**image, "url": strip(image.get("url"))} for image in data.get("images", [])]
    return {**data, "url": strip(data.get("url")), **({"images": images} if images else {})}


def _running_before_stop(events):
    return {e.data["index"] for e in events if e.event == "progress" and e.data["status"] == "running"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_local_images_run_again_after_a_restart(service_process, database_url, sig):
    env = dict(
        DATABASE_URL=database_url,
        IMAGE_PROVIDER="local",
        LOCAL_LATENCY_MS=1500,
        LOCAL_LATENCY_JITTER_MS=0,
        GENERATION_MAX_WORKERS=2,
        SHUTDOWN_GRACE_SECONDS=0,
    )
    service = service_process(**env)
    with service.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="survives restarts", num_images=4)
        head = read_stream(client, job_id, headers=_auth(token), stop=lambda e: e.data.get("status") == "running")
    service.stop(sig)

    service.start()
    rest, whole = _resume_after_restart(service, job_id, head)
    done = rest[-1].data
    assert done["status"] == "succeeded"
    # TTFI is the first success's, even when that came before the restart.
    first_success = min(
        e.data["elapsed_ms"] for e in whole if e.event == "progress" and e.data["status"] == "succeeded"
    )
    assert done["ttfi_ms"] == first_success
    with service.client() as client:
        token = login(client)
        snapshot = client.get(f"/api/generate/{job_id}", headers=_auth(token)).json()
        for image in snapshot["images"]:
            assert client.get(image["url"]).status_code == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_replicate_predictions_are_reattached_not_created_again(service_process, database_url, sig):
    with FakeReplicate(latency=2.0, wait_cap=0.05) as fake:
        service = service_process(
            DATABASE_URL=database_url,
            IMAGE_PROVIDER="replicate",
            REPLICATE_API_TOKEN=fake.token,
            REPLICATE_BASE_URL=fake.base_url,
            REPLICATE_POLL_INTERVAL=0.05,
            SHUTDOWN_GRACE_SECONDS=0,
        )
        with service.client() as client:
            token = login(client)
            job_id = create_job(client, token, prompt="paid once", num_images=3)
            # The prediction ids are stored as soon as Replicate answers the creates.
            stored = f"SELECT count(*) FROM images WHERE job_id = '{job_id}' AND prediction_id IS NOT NULL"
            wait_until(lambda: query_database(database_url, stored) == [(3,)], what="prediction ids stored")
            head = read_stream(
                client,
                job_id,
                headers=_auth(token),
                stop=lambda e: e.event == "progress" and e.id == str(6),  # 3 queued, 3 running
            )
        service.stop(sig)
        assert len(fake.created()) == 3

        service.start()
        rest, _ = _resume_after_restart(service, job_id, head)
        assert rest[-1].data["status"] == "succeeded"
        assert len(fake.created()) == 3, "a prediction was created twice"
        assert all(p["status"] == "succeeded" for p in fake.predictions.values())


def test_sigterm_lets_running_images_finish_and_ends_open_streams(service_process, tmp_path):
    service = service_process(
        IMAGE_PROVIDER="local",
        LOCAL_LATENCY_MS=1500,
        LOCAL_LATENCY_JITTER_MS=0,
        GENERATION_MAX_WORKERS=2,
        SHUTDOWN_GRACE_SECONDS=20,
    )
    open_stream: list = []
    with service.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="graceful", num_images=4)

        def follow():
            with service.client() as own:
                try:
                    read_stream(own, job_id, headers=_auth(token), stop=open_stream.append)
                except httpx.RemoteProtocolError:
                    pass  # the server closed the stream mid-chunk: the client's cue to reconnect

        follower = threading.Thread(target=follow)
        follower.start()
        # 4 queued, then 2 running (two workers): the stream is live and two images are busy.
        wait_until(lambda: len(open_stream) >= 6, what="both workers to be busy")
        running = _running_before_stop(open_stream)
        assert len(running) == 2
        # uvicorn shuts down gracefully, then re-raises the signal, as a supervisor expects.
        assert service.stop(signal.SIGTERM) == -signal.SIGTERM
        assert "Application shutdown complete" in service.log_path.read_text()
        follower.join(timeout=5)
        assert not follower.is_alive()
    # The open stream was ended for the client to reconnect, not with a `done`.
    assert open_stream[-1].event != "done"

    database = f"sqlite:///{tmp_path / 'data' / 'myflix.db'}"
    statuses = dict(query_database(database, f"SELECT \"index\", status FROM images WHERE job_id = '{job_id}'"))
    assert {index for index, status in statuses.items() if status == "succeeded"} == running
    assert {index for index, status in statuses.items() if status == "queued"} == {0, 1, 2, 3} - running

    service.start()
    with service.client() as client:
        token = login(client)
        events = read_stream(client, job_id, headers=_auth(token))
    assert events[-1].data["status"] == "succeeded"
    runs = [e.data["index"] for e in events if e.event == "progress" and e.data["status"] == "running"]
    assert sorted(runs) == [0, 1, 2, 3], "an image that finished during the grace period ran again"
