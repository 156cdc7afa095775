"""The provider edge: outputs are fetched from the provider's hosts only, within one deadline;
a timed-out or canceled image frees its worker at once (its create, poll or download is cut
short); a job whose insert fails never reaches the provider."""

import base64
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

import httpx
import pytest

from app.db.journal import Journal
from app.providers.base import ImageRequest, ImageStopped, StopSignal
from app.providers.downloads import ImageFetcher, ImageFetchError, host_allowed
from app.providers.replicate import ReplicateProvider
from app.services.jobs.runner import timeout_message
from tests.conftest import BOB, create_job, login, read_stream, wait_until
from tests.fake_replicate import FakeReplicate, Fault, Rule
from tests.test_downloads import PNG, Origin, serving


class _SlowOrigin(Origin):
    """Redirects anywhere, and bodies that trickle or never come."""

    def do_GET(self) -> None:
        if self.path.startswith("/redirect?to="):
            self.server.requests.append((self.path, self.client_address[1]))
            self._reply(302, b"", {"Location": self.path.removeprefix("/redirect?to=")})
        elif self.path == "/trickle":
            self.server.requests.append((self.path, self.client_address[1]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            for byte in PNG:  # a byte every 0.1 s: about 7 s in all
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                self.server.answering.set()
                if self.server.stopping.wait(0.1):
                    return
        elif self.path == "/silence":
            self.server.requests.append((self.path, self.client_address[1]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG[:8])
            self.wfile.flush()
            self.server.answering.set()
            self.server.stopping.wait(30)
        elif self.path == "/trickle-then-silence":
            self.server.requests.append((self.path, self.client_address[1]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            for byte in PNG[:15]:  # 1.5 s of a byte every 0.1 s, then nothing
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if self.server.stopping.wait(0.1):
                    return
            self.server.stopping.wait(30)
        elif self.path == "/no-answer":
            self.server.requests.append((self.path, self.client_address[1]))
            self.server.answering.set()  # the request is in: the client waits for the headers
            self.server.stopping.wait(30)
        else:
            super().do_GET()


@contextmanager
def _origin() -> Iterator[tuple[str, int, ThreadingHTTPServer]]:
    with serving(_SlowOrigin) as server:
        server.stopping, server.answering = threading.Event(), threading.Event()
        try:
            port = server.server_address[1]
            yield f"http://127.0.0.1:{port}", port, server
        finally:
            server.stopping.set()  # before the server's shutdown, which waits for its handlers


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch):
    for scheme in ("HTTP", "HTTPS", "ALL", "NO"):
        monkeypatch.delenv(f"{scheme}_PROXY", raising=False)
        monkeypatch.delenv(f"{scheme.lower()}_proxy", raising=False)


# Which hosts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://replicate.delivery/xezq/a/out-0.webp", True),
        ("https://pbxt.replicate.delivery/a/out-0.webp", True),  # a subdomain
        ("https://PBXT.Replicate.Delivery./a.png", True),  # names are case-insensitive, the root dot aside
        ("https://evilreplicate.delivery/a.png", False),  # not a subdomain
        ("https://replicate.delivery.evil.example/a.png", False),
        ("http://127.0.0.1:8000/files/a.png", True),  # host and port of the entry
        ("http://127.0.0.1:6379/", False),  # the same host on another port
        ("http://127.0.0.2:8000/files/a.png", False),
        ("http://1.127.0.0.1:8000/a.png", False),  # an address has no subdomains
        ("http://files.example/a.png", True),  # port 80: the entry's port
        ("https://files.example/a.png", False),  # port 443
    ],
)
def test_a_host_is_allowed_with_its_subdomains_and_a_port_when_one_is_given(url, allowed):
    hosts = [("replicate.delivery", None), ("127.0.0.1", 8000), ("files.example", 80)]
    assert host_allowed(httpx.URL(url), hosts) is allowed


def test_an_output_on_a_host_not_allowed_is_never_requested():
    with _origin() as (base, port, server):
        fetcher = ImageFetcher([("127.0.0.1", port + 1)])
        with pytest.raises(ImageFetchError) as refused:
            fetcher.fetch(f"{base}/image.png")
        assert server.requests == []
    assert str(refused.value) == f"The provider's output is at a host that is not allowed: 127.0.0.1:{port}"


def test_every_redirect_hop_is_checked_before_it_is_requested():
    with _origin() as (base, port, _), _origin() as (internal, internal_port, internal_service):
        fetcher = ImageFetcher([("127.0.0.1", port)])
        assert fetcher.fetch(f"{base}/redirect?to=/image.png") == (PNG, "image/png")
        with pytest.raises(ImageFetchError) as refused:
            fetcher.fetch(f"{base}/redirect?to={internal}/image.png")
        assert internal_service.requests == []
        with pytest.raises(ImageFetchError, match="not an http"):
            fetcher.fetch(f"{base}/redirect?to=file:///etc/passwd")
    assert str(refused.value) == f"The provider's output is at a host that is not allowed: 127.0.0.1:{internal_port}"


def test_data_urls_need_no_host():
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert ImageFetcher([]).fetch(url) == (PNG, "image/png")


# One deadline for the whole download ----------------------------------------------------


def test_a_trickling_download_fails_at_its_deadline_not_at_a_read_timeout():
    with _origin() as (base, port, _):
        started = time.monotonic()
        with pytest.raises(ImageFetchError, match=r"^Could not download the image: it timed out\.$"):
            ImageFetcher([("127.0.0.1", port)], timeout=0.5).fetch(f"{base}/trickle")
        assert time.monotonic() - started < 1.5  # every read came within 0.1 s


@pytest.mark.slow
def test_the_deadline_holds_within_a_read_too():
    # Each read is bounded by the time left when the request went out (2 s), so the read after
    # the last byte, 1.5 s in, would end 3.5 s in: the deadline cuts it at 2 s.
    with _origin() as (base, port, _):
        started = time.monotonic()
        with pytest.raises(ImageFetchError, match=r"^Could not download the image: it timed out\.$"):
            ImageFetcher([("127.0.0.1", port)], timeout=2.0).fetch(f"{base}/trickle-then-silence")
        assert 2.0 <= time.monotonic() - started < 2.8


@pytest.mark.parametrize("path", ["/trickle", "/silence", "/no-answer"])
def test_a_stop_cuts_a_download_short_mid_read(path):
    stop = StopSignal()
    outcome: list[object] = []
    with _origin() as (base, port, server):
        fetcher = ImageFetcher([("127.0.0.1", port)])

        def fetch() -> None:
            try:
                outcome.append(fetcher.fetch(f"{base}{path}", stop))
            except ImageStopped as exc:
                outcome.append(exc)

        worker = threading.Thread(target=fetch)
        worker.start()
        # Past the request, the only way out of a silent read is the socket being shut down.
        assert server.answering.wait(5)
        stopped_at = time.monotonic()
        stop.cancel()
        worker.join(timeout=5)
        assert not worker.is_alive()
        assert time.monotonic() - stopped_at < 1.0
        assert [type(item) for item in outcome] == [ImageStopped]
        # The thread's client is usable again afterwards.
        assert fetcher.fetch(f"{base}/image.png") == (PNG, "image/png")


# Replicate: a poll in progress is cut short ---------------------------------------------


def test_a_cancel_cuts_a_hanging_poll_short_and_cancels_the_prediction(fake_replicate):
    fake_replicate.add_rule(Rule(match="forever", never_finish=True))
    fake_replicate.wait_cap = 0.05
    fake_replicate.push_get_fault(Fault(hang=30))
    provider = ReplicateProvider(
        fake_replicate.token, "black-forest-labs/flux-schnell", fake_replicate.base_url, {}, 3, 0.05
    )
    request = ImageRequest(job_id="job_test", index=0, prompt="forever", seed=None)
    outcome: list[object] = []

    def generate() -> None:
        try:
            outcome.append(provider.generate(request))
        except ImageStopped as exc:
            outcome.append(exc)

    worker = threading.Thread(target=generate)
    worker.start()
    fake_replicate.wait_for(lambda fake: bool(fake.requests_to("/v1/predictions/", method="GET")))
    stopped_at = time.monotonic()
    request.stop.cancel()
    worker.join(timeout=5)
    assert time.monotonic() - stopped_at < 1.0, "the 30 s hanging poll was waited out"
    assert [type(item) for item in outcome] == [ImageStopped]
    [prediction] = fake_replicate.created()
    assert fake_replicate.predictions[prediction["id"]]["status"] == "canceled"
    provider.close()


# The whole service: a stopped image's worker takes the next image -----------------------


def _replicate_service(live_server, fake: FakeReplicate, **overrides):
    settings = dict(
        IMAGE_PROVIDER="replicate",
        REPLICATE_API_TOKEN=fake.token,
        REPLICATE_BASE_URL=fake.base_url,
        REPLICATE_INPUT='{"output_format": "png"}',
        REPLICATE_POLL_INTERVAL=0.05,
        GENERATION_MAX_WORKERS=1,
        IMAGE_TIMEOUT_SECONDS=2,
    )
    return live_server(**{**settings, **overrides})


def _created_at(fake: FakeReplicate, prompt: str) -> float:
    creates = [r for r in fake.requests_to("/v1/models/", method="POST") if r.json["input"]["prompt"] == prompt]
    assert len(creates) == 1, f"{len(creates)} predictions for {prompt!r}"
    return creates[0].at


def _second_job_runs_at_once(client: httpx.Client, fake: FakeReplicate, first: str, freed_at: float) -> None:
    """Bob's job, posted while Alice's image holds the only worker, is made (its prediction
    created within a second or so of the moment the worker was to be freed)."""
    bob = login(client, BOB)
    second = create_job(client, bob, prompt="a second job", num_images=1)
    done = read_stream(client, second, params={"access_token": bob})[-1].data
    assert done["status"] == "succeeded"
    waited = _created_at(fake, "a second job") - freed_at
    assert waited < 1.5, f"the second job's image started {waited:.1f} s after the worker was to be freed"


@pytest.mark.slow
def test_a_trickling_download_times_out_and_its_worker_takes_the_next_image(live_server, fake_replicate):
    fake_replicate.add_rule(Rule(match="trickle", output_trickle=0.5))
    with _replicate_service(live_server, fake_replicate) as server, server.client() as client:
        alice = login(client)
        first = create_job(client, alice, prompt="a trickle", num_images=1)
        wait_until(lambda: fake_replicate.trickled > 0, what="the download to start")
        freed_at = _created_at(fake_replicate, "a trickle") + 2
        _second_job_runs_at_once(client, fake_replicate, first, freed_at)
        done = read_stream(client, first, params={"access_token": alice})[-1].data
        assert done["status"] == "failed"
        assert done["images"][0]["error"] == timeout_message(2)
        # The download was really abandoned: its connection was closed, not left to trickle.
        wait_until(lambda: fake_replicate.trickles_cut > 0, timeout=3, what="the download to be cut")


@pytest.mark.slow
def test_a_create_held_in_prefer_wait_times_out_and_its_worker_takes_the_next_image(live_server, fake_replicate):
    fake_replicate.add_rule(Rule(match="stuck", never_finish=True))
    with _replicate_service(live_server, fake_replicate) as server, server.client() as client:
        alice = login(client)
        first = create_job(client, alice, prompt="stuck for good", num_images=1)
        wait_until(lambda: bool(fake_replicate.created()), what="the prediction to be created")
        _second_job_runs_at_once(client, fake_replicate, first, _created_at(fake_replicate, "stuck for good") + 2)
        done = read_stream(client, first, params={"access_token": alice})[-1].data
        assert done["images"][0]["error"] == timeout_message(2)
        stuck = next(p for p in fake_replicate.created() if p["input"]["prompt"] == "stuck for good")
        wait_until(lambda: fake_replicate.predictions[stuck["id"]]["status"] == "canceled", timeout=3, what="cancel")


@pytest.mark.slow
def test_a_canceled_jobs_download_is_abandoned_and_its_worker_takes_the_next_image(live_server, fake_replicate):
    fake_replicate.add_rule(Rule(match="trickle", output_trickle=0.5))
    with (
        _replicate_service(live_server, fake_replicate, IMAGE_TIMEOUT_SECONDS=60) as server,
        server.client() as client,
    ):
        alice = login(client)
        first = create_job(client, alice, prompt="a trickle", num_images=1)
        wait_until(lambda: fake_replicate.trickled > 0, what="the download to start")
        canceled_at = time.monotonic()
        assert (
            client.post(f"/api/generate/{first}/cancel", headers={"Authorization": f"Bearer {alice}"}).status_code
            == 202
        )
        _second_job_runs_at_once(client, fake_replicate, first, canceled_at)
        wait_until(lambda: fake_replicate.trickles_cut > 0, timeout=3, what="the download to be cut")


# A job whose insert fails never reaches the provider ------------------------------------


@pytest.mark.slow
def test_a_job_the_database_does_not_store_creates_no_prediction(live_server, fake_replicate, monkeypatch):
    refusing = threading.Event()
    write = Journal._write

    async def failing_write(self, batch):
        if refusing.is_set():
            raise OSError(5, "Input/output error")  # a passing fault: retried until the write bound
        await write(self, batch)

    monkeypatch.setattr(Journal, "_write", failing_write)
    with (
        _replicate_service(live_server, fake_replicate, DB_WRITE_TIMEOUT_SECONDS=1) as server,
        server.client() as client,
    ):
        alice = login(client)
        refusing.set()
        refused = client.post(
            "/api/generate/",
            json={"prompt": "never stored", "num_images": 2},
            headers={"Authorization": f"Bearer {alice}"},
        )
        assert refused.status_code == 503, refused.text
        refusing.clear()
        # The service takes writes again: a job posted now is made, and is the only one that was.
        wait_until(lambda: client.get("/readyz").status_code == 200, what="the service to be ready again")
        stored = create_job(client, alice, prompt="stored", num_images=1)
        assert read_stream(client, stored, params={"access_token": alice})[-1].data["status"] == "succeeded"
    assert [p["input"]["prompt"] for p in fake_replicate.created()] == ["stored"]


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_an_output_redirected_to_another_host_fails_the_image_with_a_reason(live_server, fake_replicate):
    port = _unused_port()
    fake_replicate.add_rule(Rule(match="moved", output_redirect=f"http://127.0.0.1:{port}/"))
    with _replicate_service(live_server, fake_replicate) as server, server.client() as client:
        alice = login(client)
        job = create_job(client, alice, prompt="moved away", num_images=1)
        done = read_stream(client, job, params={"access_token": alice})[-1].data
    assert done["status"] == "failed"
    assert done["images"][0]["error"] == f"The provider's output is at a host that is not allowed: 127.0.0.1:{port}"
