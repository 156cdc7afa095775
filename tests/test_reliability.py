"""Faults and abuse: provider failures injected through the fake Replicate server, streams
dropped by the hundred, slow readers, password guessing, forged tokens, secrets in logs."""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import threading
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

from tests.conftest import ALICE, BOB, TEST_JWT_SECRET, create_job, login, read_stream, wait_until
from tests.fake_replicate import Fault, Rule


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def _replicate(live_server, fake, **overrides):
    return live_server(
        IMAGE_PROVIDER="replicate",
        REPLICATE_API_TOKEN=fake.token,
        REPLICATE_BASE_URL=fake.base_url,
        REPLICATE_POLL_INTERVAL=0.05,
        REPLICATE_MAX_RETRIES=3,
        GENERATION_MAX_WORKERS=4,
        **overrides,
    )


def _pool_is_idle(server) -> bool:
    metrics = server.client().get("/metrics").text
    return "myflix_busy_workers 0.0" in metrics and "myflix_queued_images 0.0" in metrics


def _image_threads() -> int:
    return sum(thread.name.startswith("image") for thread in threading.enumerate())


# Each fault: how to inject it, the job's outcome, and words the user reads.
FAULTS = {
    "429 burst within the retries": (
        lambda f: [f.push_create_fault(Fault(status=429, retry_after=0)) for _ in range(3)],
        "succeeded",
        None,
    ),
    "429 burst beyond the retries": (
        lambda f: [f.push_create_fault(Fault(status=429, retry_after=0)) for _ in range(4)],
        "failed",
        "Replicate is unavailable",
    ),
    "500": (lambda f: f.push_create_fault(Fault(status=500)), "succeeded", None),
    "502": (lambda f: f.push_create_fault(Fault(status=502)), "succeeded", None),
    "503": (lambda f: f.push_create_fault(Fault(status=503)), "succeeded", None),
    "connection reset on create": (lambda f: f.push_create_fault(Fault(reset=True)), "failed", "Lost the connection"),
    "connection reset while polling": (
        lambda f: (setattr(f, "wait_cap", 0.05), f.push_get_fault(Fault(reset=True))),
        "succeeded",
        None,
    ),
    "not JSON": (
        lambda f: f.push_create_fault(Fault(status=201, raw_body=b"<html>proxy error</html>")),
        "failed",
        "not JSON",
    ),
    "aborted": (lambda f: f.add_rule(Rule(match="", status="aborted")), "failed", "aborted"),
    "output 404": (lambda f: f.add_rule(Rule(match="", output_http_status=404)), "failed", "HTTP 404"),
    "output not an image": (lambda f: f.add_rule(Rule(match="", output_body=b"plain text")), "failed", "not a PNG"),
    "failed prediction": (
        lambda f: f.add_rule(Rule(match="", fail_error="CUDA out of memory")),
        "failed",
        "CUDA out of memory",
    ),
    "fewer outputs than asked (NSFW)": (lambda f: f.add_rule(Rule(match="", outputs=0)), "failed", "no image"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_provider_faults_end_the_job_with_a_reason_and_free_the_pool(live_server, fake_replicate, fault):
    inject, outcome, words = FAULTS[fault]
    inject(fake_replicate)
    with _replicate(live_server, fake_replicate) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="faulty", num_images=1)
        done = read_stream(client, job_id, params={"access_token": token})[-1]
        assert done.event == "done"
        assert done.data["status"] == outcome
        if words:
            assert words in done.data["images"][0]["error"]
        wait_until(lambda: _pool_is_idle(server), timeout=10, what="the worker pool to be idle")
        assert _image_threads() <= server.settings.GENERATION_MAX_WORKERS


@pytest.mark.slow
def test_connection_refused_fails_the_image_after_bounded_retries(live_server):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with (
        live_server(
            IMAGE_PROVIDER="replicate",
            REPLICATE_API_TOKEN="r8_x",
            REPLICATE_BASE_URL=f"http://127.0.0.1:{port}",
            REPLICATE_MAX_RETRIES=2,
        ) as server,
        server.client() as client,
    ):
        token = login(client)
        events = read_stream(
            client, create_job(client, token, prompt="x", num_images=1), params={"access_token": token}
        )
    retries = [e.data for e in events if e.data.get("status") == "retrying"]
    assert [r["attempt"] for r in retries] == [1, 2]
    assert events[-1].data["status"] == "failed"
    assert "Replicate is unavailable" in events[-1].data["images"][0]["error"]


@pytest.mark.slow
def test_a_prediction_that_never_finishes_times_out_and_is_canceled(live_server, fake_replicate):
    fake_replicate.wait_cap = 0.05
    fake_replicate.add_rule(Rule(match="", never_finish=True))
    with _replicate(live_server, fake_replicate, IMAGE_TIMEOUT_SECONDS=1) as server, server.client() as client:
        token = login(client)
        done = read_stream(client, create_job(client, token, prompt="x", num_images=2), params={"access_token": token})[
            -1
        ]
        assert done.data["status"] == "failed"
        assert all("within 1 s" in image["error"] for image in done.data["images"])
        fake_replicate.wait_for(lambda f: all(p["status"] == "canceled" for p in f.predictions.values()))
        wait_until(lambda: _pool_is_idle(server), timeout=10, what="the worker pool to be idle")


def _crowd_that_drops(base_url: str, job_id: str, token: str, clients: int = 200) -> None:
    """`clients` subscribers at once, each gone after its first event."""

    async def drop_after_first_event(http: httpx.AsyncClient) -> None:
        async with http.stream("GET", f"/api/generate/{job_id}/stream", params={"access_token": token}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    return

    async def crowd() -> None:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as http:
            await asyncio.gather(*(drop_after_first_event(http) for _ in range(clients)))

    asyncio.run(crowd())


@pytest.mark.slow
def test_two_hundred_dropped_streams_leave_no_task_or_connection(live_server):
    with live_server(LOCAL_LATENCY_MS=60_000) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="watched by many", num_images=1)
        _crowd_that_drops(server.base_url, job_id, token)
        uvicorn_state = server._server.server_state
        wait_until(lambda: "myflix_open_streams 0.0" in client.get("/metrics").text, what="streams to close")
        wait_until(lambda: len(uvicorn_state.connections) <= 1, what="connections to close")  # ours
        assert len(uvicorn_state.tasks) <= 1
        # The job itself was never disturbed.
        assert client.get(f"/api/generate/{job_id}", headers=_auth(token)).json()["status"] == "running"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_dropped_streams_leave_the_server_memory_flat(service_process):
    service = service_process(IMAGE_PROVIDER="local", LOCAL_LATENCY_MS=60_000)
    with service.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="watched by many", num_images=1)
        _crowd_that_drops(service.base_url, job_id, token)  # warms up pools, caches, buffers
        wait_until(lambda: "myflix_open_streams 0.0" in client.get("/metrics").text, what="streams to close")
        before = _rss_kib(service.process.pid)
        for _ in range(3):
            _crowd_that_drops(service.base_url, job_id, token)
        wait_until(lambda: "myflix_open_streams 0.0" in client.get("/metrics").text, what="streams to close")
        growth_mib = (_rss_kib(service.process.pid) - before) / 1024
    assert growth_mib < 10, f"RSS grew {growth_mib:.1f} MiB over 600 dropped streams"


@pytest.mark.slow
def test_a_reader_that_stops_reading_is_cut_off_without_stalling_anyone(live_server):
    settings = dict(LOCAL_LATENCY_MS=1500, SSE_KEEPALIVE_SECONDS=0.0005, SSE_SEND_TIMEOUT_SECONDS=1)
    with live_server(**settings) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="slow reader", num_images=1)
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(f"GET /api/generate/{job_id}/stream?access_token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        try:
            # Meanwhile a normal subscriber gets the whole job, keepalive flood and all.
            events = read_stream(client, job_id, params={"access_token": token})
            assert events[-1].event == "done"
            # The stalled one was disconnected once a send waited longer than 1 s.
            wait_until(
                lambda: "myflix_open_streams 0.0" in client.get("/metrics").text,
                timeout=15,
                what="the stalled stream to be cut off",
            )
        finally:
            stalled.close()


@pytest.mark.slow
def test_failed_logins_are_throttled_per_account_and_client(live_server):
    with live_server(LOGIN_MAX_FAILURES=3) as server, server.client() as client:
        for _ in range(3):
            assert client.post("/api/auth/login", json={"email": ALICE[0], "password": "guess"}).status_code == 401
        throttled = client.post("/api/auth/login", json={"email": ALICE[0], "password": ALICE[1]})
        assert throttled.status_code == 429
        assert 0 < int(throttled.headers["retry-after"]) <= 300
        assert "Too many failed sign-ins" in throttled.json()["detail"]
        # Another account from the same client is not locked out.
        assert client.post("/api/auth/login", json={"email": BOB[0], "password": BOB[1]}).status_code == 200


def _hs256_by_hand(claims: dict, key: bytes) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


def test_rs256_and_confused_algorithm_tokens_are_refused(live_server):
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with live_server() as server, server.client() as client:
        # A real session, so that only the algorithm and the key are wrong.
        session = jwt.get_unverified_claims(login(client))["sid"]
        claims = {"sub": ALICE[0], "sid": session, "exp": datetime.now(UTC) + timedelta(minutes=5)}
        tokens = {
            "RS256": jwt.encode(claims, private_pem.decode(), algorithm="RS256"),
            # The classic confusion: HS256 keyed with the public key (jose itself refuses to make one).
            "HS256 with a public key": _hs256_by_hand({"sub": ALICE[0], "sid": session, "exp": 4102444800}, public_pem),
        }
        for kind, token in tokens.items():
            assert client.get("/api/auth/me", headers=_auth(token)).status_code == 401, kind
        assert client.get("/api/auth/me", headers=_auth(jwt.encode(claims, TEST_JWT_SECRET))).status_code == 200


def test_security_headers(live_server):
    with live_server() as server, server.client() as client:
        api = client.get("/api/auth/me", headers=_auth(login(client)))
        page = client.get("/")
        docs = client.get("/docs")
    for response in (api, page, docs):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-frame-options"] == "DENY"
    assert api.headers["cache-control"] == "no-store"
    assert api.headers["content-security-policy"].startswith("default-src 'none'")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "script-src 'self' 'sha256-" in docs.headers["content-security-policy"]  # its one inline script, by hash


@pytest.mark.parametrize(
    ("prompt", "status"),
    [
        ("a cat\x00", 422),
        ("bell\x07", 422),
        ("esc \x1b[31m red", 422),
        ("line\nbreaks\tand tabs", 202),
        ("日本の猫 🐈 café", 202),
        ("\u202eright-to-left", 202),
    ],
)
def test_prompts_any_language_yes_control_characters_no(live_server, prompt, status):
    with live_server() as server, server.client() as client:
        response = client.post("/api/generate/", json={"prompt": prompt, "num_images": 1}, headers=_auth(login(client)))
    assert response.status_code == status
    if status == 422:
        assert "control characters" in response.text


@pytest.mark.slow
def test_no_secret_reaches_the_logs_or_an_error_body(live_server, fake_replicate, caplog):
    caplog.set_level(logging.DEBUG)
    replicate_token = "r8_this_is_the_replicate_secret"
    fake_replicate.token = replicate_token
    fake_replicate.push_create_fault(Fault(status=500))
    bodies = []
    with _replicate(live_server, fake_replicate) as server, server.client() as client:
        bodies.append(client.post("/api/auth/login", json={"email": ALICE[0], "password": "wrong-password"}).text)
        token = login(client)
        job_id = create_job(client, token, prompt="secretive", num_images=1)
        events = read_stream(client, job_id, params={"access_token": token})
        bodies.append(client.get("/api/auth/me", headers=_auth(token + "x")).text)
        bodies += [e.data.__repr__() for e in events]
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    for secret in (token, replicate_token, ALICE[1], "wrong-password", TEST_JWT_SECRET):
        assert secret not in logged
        assert all(secret not in body for body in bodies)


def test_deeply_nested_json_is_a_400_not_a_500(live_server):
    nested = b'{"prompt": "x", "num_images": 1, "extra": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}"
    with live_server() as server, server.client() as client:
        response = client.post(
            "/api/generate/",
            content=nested,
            headers={**_auth(login(client)), "Content-Type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json() == {"detail": "There was an error parsing the body"}
