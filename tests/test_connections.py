"""Connections that cannot be hoarded: request headers and bodies are due within a bound, a
process holds a bounded number of connections (and keeps file descriptors for its own work),
and a user holds a bounded number of streams. Over real sockets."""

import asyncio
import json
import select
import socket
import threading
import time
import uuid

import httpx
import pytest

from app.core.http_server import UVICORN_BACKLOG, connection_budget
from app.core.redis_link import RedisLink
from app.services.stream_slots import RedisStreamSlots, StreamSlot, TooManyStreamsError
from bench.processes import ServerProcess
from tests.conftest import (
    BOB,
    TEST_JWT_SECRET,
    create_job,
    login,
    make_settings,
    read_stream,
    redis_url,
    wait_until,
)

SECURITY_HEADERS = ("x-content-type-options", "referrer-policy", "x-frame-options")
# The server's loop reads its clock once per turn (uvloop, in milliseconds): a deadline it
# measures from a turn's start may end a little before one measured here from the send.
CLOCK_SLACK = 0.1


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def _is_json_error(raw: bytes, status: int) -> dict:
    code, headers, body = _parse_response(raw)
    assert code == status, raw
    assert headers["content-type"].startswith("application/json")
    assert headers["connection"] == "close"
    for header in SECURITY_HEADERS:
        assert header in headers, header
    detail = json.loads(body)["detail"]
    assert isinstance(detail, str) and detail
    return headers


def _trickle_until_closed(sock: socket.socket, line: bytes, every: float, give_up: float) -> tuple[bytes, float, int]:
    """Send `line` every `every` seconds (the waits are the reads) until the server closes the
    connection: what it sent, when it closed (seconds), and how many lines went."""
    started = time.monotonic()
    received, lines = b"", 0
    sock.settimeout(every)
    while time.monotonic() - started < give_up:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            try:
                sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                break
            lines += 1
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received, time.monotonic() - started, lines


@pytest.mark.slow
def test_headers_that_trickle_in_are_cut_off_at_the_deadline_with_a_json_408(live_server):
    with live_server(HTTP_HEADER_TIMEOUT_SECONDS=1) as server, _connect(server.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        received, closed_after, lines = _trickle_until_closed(sock, b"X-Slow: 1\r\n", every=0.3, give_up=10)
    assert 1 - CLOCK_SLACK <= closed_after < 2.5
    assert lines >= 3  # it was sending all along
    _is_json_error(received, 408)


@pytest.mark.slow
def test_a_connection_that_sends_nothing_is_closed_at_the_header_deadline(live_server):
    with live_server(HTTP_HEADER_TIMEOUT_SECONDS=1) as server, _connect(server.port) as sock:
        started = time.monotonic()
        assert sock.recv(65536) == b""
        assert 1 - CLOCK_SLACK <= time.monotonic() - started < 2.5


def _read_for(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends within `seconds` (the wait is the read)."""
    received, until = b"", time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        received += chunk
    return received


def _read_response(sock: socket.socket) -> bytes:
    """One whole answer that declares its length."""
    sock.settimeout(5)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    _, headers, body = _parse_response(received)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "closed mid-answer"
        received += chunk
        body += chunk
    return received


@pytest.mark.slow
def test_an_idle_keep_alive_connection_is_not_cut_by_the_header_deadline_and_its_next_request_has_its_own(
    live_server,
):
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with live_server(HTTP_HEADER_TIMEOUT_SECONDS=0.5) as server, _connect(server.port) as sock:
        sock.sendall(request)
        assert _parse_response(_read_response(sock))[0] == 200
        # Idle for twice the header deadline, within uvicorn's keep-alive timeout (5 s).
        assert _read_for(sock, 1.0) == b""
        sock.sendall(request)
        assert _parse_response(_read_response(sock))[0] == 200
        # The next request's headers are due half a second after its own first byte.
        assert _read_for(sock, 1.0) == b""
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        received, closed_after, _ = _trickle_until_closed(sock, b"X-Slow: 1\r\n", every=0.1, give_up=5)
    assert 0.5 - CLOCK_SLACK <= closed_after < 1.5
    _is_json_error(received, 408)


@pytest.mark.slow
def test_a_declared_body_that_never_completes_is_closed_at_its_bound(live_server):
    with live_server(HTTP_HEADER_TIMEOUT_SECONDS=5, HTTP_BODY_TIMEOUT_SECONDS=1) as server:
        with server.client() as client:
            token = login(client)
        with _connect(server.port) as sock:
            sock.sendall(
                b"POST /api/generate/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n".encode()
                + b'{"prompt": "never'
            )
            received, closed_after, lines = _trickle_until_closed(sock, b" ", every=0.3, give_up=10)
    assert 1 - CLOCK_SLACK <= closed_after < 2.5
    assert lines >= 3
    # The request was handed to the service, which may not answer a body that never came.
    assert not received.startswith(b"HTTP/1.1 2")


@pytest.mark.slow
def test_a_body_that_arrives_in_parts_within_its_bound_is_served(live_server):
    # Longer than the header deadline in all, but the headers came at once: the body has its own bound.
    with live_server(HTTP_HEADER_TIMEOUT_SECONDS=0.5, HTTP_BODY_TIMEOUT_SECONDS=3) as server:
        with server.client() as client:
            token = login(client)
        body = json.dumps({"prompt": "in three parts", "num_images": 1}).encode()
        with _connect(server.port) as sock:
            sock.sendall(
                b"POST /api/generate/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            )
            for part in (body[:5], body[5:10]):
                assert _read_for(sock, 0.4) == b""  # the service waits for the rest
                sock.sendall(part)
            assert _read_for(sock, 0.4) == b""
            sock.sendall(body[10:])
            sock.settimeout(5)
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
    code, _, _ = _parse_response(received)
    assert code == 202, received


@pytest.mark.slow
def test_a_long_stream_is_not_cut_by_the_request_deadlines(live_server):
    settings = dict(HTTP_HEADER_TIMEOUT_SECONDS=0.5, HTTP_BODY_TIMEOUT_SECONDS=0.5, LOCAL_LATENCY_MS=1500)
    with live_server(**settings) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="slower than the deadlines", num_images=2)
        started = time.monotonic()
        events = read_stream(client, job_id, headers=_auth(token))
        assert time.monotonic() - started >= 1.4
    assert events[-1].event == "done"
    assert events[-1].data["status"] == "succeeded"


def _open_stream(server, token: str, job_id: str) -> tuple[httpx.Client, httpx.Response]:
    client = server.client(token)
    response = client.send(client.build_request("GET", f"/api/generate/{job_id}/stream"), stream=True)
    return client, response


def test_a_user_holds_at_most_max_streams_and_a_closed_one_frees_its_slot(live_server):
    with live_server(MAX_STREAMS_PER_USER=2, LOCAL_LATENCY_MS=30_000) as server, server.client() as client:
        alice, bob = login(client), login(client, BOB)
        alice_job = create_job(client, alice, prompt="a long one", num_images=1)
        bob_job = create_job(client, bob, prompt="bob's", num_images=1)
        opened = [_open_stream(server, alice, alice_job) for _ in range(2)]
        try:
            assert [response.status_code for _, response in opened] == [200, 200]
            third = client.get(f"/api/generate/{alice_job}/stream", headers=_auth(alice))
            assert third.status_code == 429
            assert third.headers["content-type"].startswith("application/json")
            assert "stream" in third.json()["detail"]
            assert int(third.headers["retry-after"]) >= 1
            for header in SECURITY_HEADERS:
                assert header in third.headers

            # Another user's streams are not affected.
            bob_stream = _open_stream(server, bob, bob_job)
            opened.append(bob_stream)
            assert bob_stream[1].status_code == 200

            first_client, first_response = opened.pop(0)
            first_response.close()
            first_client.close()

            def a_stream_is_accepted() -> bool:
                stream = _open_stream(server, alice, alice_job)
                if stream[1].status_code == 200:
                    opened.append(stream)
                    return True
                assert stream[1].status_code == 429
                stream[1].close()
                stream[0].close()
                return False

            wait_until(a_stream_is_accepted, timeout=10, what="the closed stream's slot to be free")
        finally:
            for stream_client, response in opened:
                response.close()
                stream_client.close()
            for token, job in ((alice, alice_job), (bob, bob_job)):
                client.post(f"/api/generate/{job}/cancel", headers=_auth(token))


def test_a_stream_that_ends_with_done_gives_its_slot_back(live_server):
    with live_server(MAX_STREAMS_PER_USER=1, LOCAL_LATENCY_MS=50) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="quick", num_images=1)
        assert read_stream(client, job_id, headers=_auth(token))[-1].event == "done"

        def replayed_whole() -> bool:
            response = client.get(f"/api/generate/{job_id}/stream", headers=_auth(token))
            assert response.status_code in (200, 429), response.text
            return response.status_code == 200 and "event: done" in response.text

        # The slot is given back once the server has sent the end, a moment after the client reads it.
        wait_until(replayed_whole, timeout=5, what="the ended stream's slot to be free")


def test_over_the_cap_with_every_connection_busy_a_new_one_gets_a_json_503(live_server):
    with live_server(HTTP_MAX_CONNECTIONS=2, LOCAL_LATENCY_MS=30_000) as server:
        with server.client() as client:
            token = login(client)
            job_id = create_job(client, token, prompt="held open", num_images=1)
        opened = [_open_stream(server, token, job_id) for _ in range(2)]
        try:
            assert [response.status_code for _, response in opened] == [200, 200]
            with _connect(server.port) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                received = b""
                while chunk := sock.recv(65536):
                    received += chunk
            headers = _is_json_error(received, 503)
            assert int(headers["retry-after"]) >= 1
        finally:
            for stream_client, response in opened:
                response.close()
                stream_client.close()
            with server.client(token) as client:
                client.post(f"/api/generate/{job_id}/cancel")


def test_the_connection_cap_leaves_file_descriptors_for_the_process_own_work(tmp_path):
    settings = make_settings(tmp_path, HTTP_MAX_CONNECTIONS=1000, DB_POOL_SIZE=10, GENERATION_MAX_WORKERS=16)
    roomy = connection_budget(settings, open_files=20_000)
    assert roomy.max_connections == 1000
    assert roomy.backlog == UVICORN_BACKLOG

    tight = connection_budget(settings, open_files=512)
    # Every connection (and every one accepted in one burst before it can be refused) fits
    # beside what is kept for the database, images and provider calls of each worker.
    assert tight.max_connections + tight.backlog + tight.reserved <= 512
    assert tight.reserved >= 16 + 2 * 10
    assert tight.max_connections >= 100

    assert connection_budget(settings, open_files=None).max_connections == 1000


def _readable_or_closed(sockets: list[socket.socket]) -> set[socket.socket]:
    """The sockets the server has closed (EOF, a reset, or a final answer)."""
    if not sockets:
        return set()
    readable, _, _ = select.select(sockets, [], [], 0)
    return set(readable)


FLOOD_OPEN_FILES = 256


@pytest.mark.slow
def test_a_slow_connection_flood_neither_fails_a_job_in_flight_nor_keeps_requests_out(tmp_path, database_url):
    """A process allowed FLOOD_OPEN_FILES file descriptors, flooded with twice as many
    connections that each send a header line every 0.3 s while a job is running."""
    env = {
        "DATABASE_URL": database_url,
        "JWT_SECRET_KEY": TEST_JWT_SECRET,
        "IMAGE_PROVIDER": "local",
        "LOCAL_LATENCY_MS": "700",
        "LOCAL_LATENCY_JITTER_MS": "0",
        "GENERATION_MAX_WORKERS": "2",
        "HTTP_HEADER_TIMEOUT_SECONDS": "2",
        "LOG_LEVEL": "INFO",
    }
    with ServerProcess("main:app", env, tmp_path / "data", open_file_limit=FLOOD_OPEN_FILES) as server:
        client = httpx.Client(base_url=server.base_url, timeout=30)
        token = login(client)
        job_id = create_job(client, token, prompt="in flight during the flood", num_images=8)
        stream_open = threading.Event()
        events: list = []

        def follow() -> None:
            with httpx.Client(base_url=server.base_url, timeout=30) as stream_client:

                def note(event) -> bool:
                    stream_open.set()
                    return False

                events.extend(read_stream(stream_client, job_id, headers=_auth(token), stop=note))

        follower = threading.Thread(target=follow)
        follower.start()
        assert stream_open.wait(10)

        flood = []
        for _ in range(2 * FLOOD_OPEN_FILES):
            try:
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            except OSError:
                continue  # refused at once is as good as closed
            flood.append(sock)
        flood_started = time.monotonic()
        try:
            # While the flood holds every connection it can, a well-formed request is served.
            with httpx.Client(base_url=server.base_url, timeout=5) as newcomer:
                served = newcomer.get("/healthz")
                assert served.status_code == 200, (served.text, server.log_path.read_text()[-2000:])

            open_flood = list(flood)
            while open_flood and time.monotonic() - flood_started < 10:
                for sock in _readable_or_closed(open_flood):
                    open_flood.remove(sock)
                ready, _, _ = select.select(open_flood, [], [], 0.3)
                for sock in open_flood:
                    if sock not in ready:
                        try:
                            sock.sendall(b"X-Slow: 1\r\n")
                        except OSError:
                            pass
            # Cut off at the header deadline (2 s) at the latest.
            assert not open_flood, f"{len(open_flood)} slow connections still open"
            assert time.monotonic() - flood_started < 4
        finally:
            for sock in flood:
                sock.close()

        follower.join(timeout=60)
        assert not follower.is_alive()
        assert events[-1].event == "done", events[-5:]
        done = events[-1].data
        assert done["status"] == "succeeded", done
        assert [image["status"] for image in done["images"]] == ["succeeded"] * 8

        assert client.get("/healthz").status_code == 200
        client.close()
    log = (tmp_path / "data" / "process.log").read_text()
    assert "OSError" not in log and "Too many open files" not in log, log[-3000:]
    assert "connections at most" in log


@pytest.mark.slow
def test_the_benchmark_server_runs_the_same_server_configuration(tmp_path):
    env = {
        "IMAGE_PROVIDER": "local",
        "JWT_SECRET_KEY": TEST_JWT_SECRET,
        "HTTP_HEADER_TIMEOUT_SECONDS": "1",
        "LOG_LEVEL": "INFO",
    }
    with ServerProcess("main:app", env, tmp_path / "data") as server, _connect(server.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        received, closed_after, _ = _trickle_until_closed(sock, b"X-Slow: 1\r\n", every=0.3, give_up=10)
    assert closed_after < 2.5
    _is_json_error(received, 408)
    log = (tmp_path / "data" / "process.log").read_text()
    assert "connections at most" in log
    assert '"GET /healthz' not in log  # no access log in the benchmark


# Streams counted across replicas -------------------------------------------------------


async def _two_replicas(lease_seconds: float, per_user: int = 2):
    url = redis_url()
    prefix = f"stream-slots-{uuid.uuid4().hex[:8]}"
    links = [RedisLink(url, prefix), RedisLink(url, prefix)]
    return links, [RedisStreamSlots(link, per_user, lease_seconds) for link in links]


async def _clean(links: list[RedisLink], replicas: list[RedisStreamSlots]) -> None:
    for replica in replicas:
        await replica.close()
    keys = [key async for key in links[0].client.scan_iter(f"{links[0].prefix}:*")]
    if keys:
        await links[0].client.delete(*keys)
    for link in links:
        await link.client.aclose()


def _taken(replica: RedisStreamSlots, owner: str = "alice@myflix.dev"):
    async def take() -> StreamSlot | None:
        slot = replica.slot(owner)
        try:
            await slot.take()
        except TooManyStreamsError:
            return None
        return slot

    return take()


def test_streams_are_counted_across_replicas_and_a_slot_given_back_on_one_is_free_on_the_other():
    async def scenario() -> None:
        links, (first, second) = await _two_replicas(lease_seconds=30)
        try:
            held = [await _taken(first), await _taken(second)]
            assert all(held)
            assert await _taken(first) is None and await _taken(second) is None
            assert await _taken(second, owner="bob@myflix.dev") is not None  # another user's count
            await held[1].release()
            assert await _taken(first) is not None
        finally:
            await _clean(links, [first, second])

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.slow
def test_a_live_replica_keeps_its_slots_and_the_slots_of_one_that_died_lapse():
    lease = 0.6

    async def scenario() -> None:
        links, (alive, doomed) = await _two_replicas(lease_seconds=lease)
        try:
            assert await _taken(alive) is not None
            assert await _taken(doomed) is not None
            # The live one renews: over several leases, no slot lapses.
            until = time.monotonic() + 3 * lease
            while time.monotonic() < until:
                assert await _taken(alive) is None
                await asyncio.sleep(0.05)
            await doomed.close()  # it dies: it neither renews nor gives back
            started = time.monotonic()
            while await _taken(alive) is None:
                assert time.monotonic() - started < 3 * lease, "the dead replica's slot never lapsed"
                await asyncio.sleep(0.05)
            assert await _taken(alive) is None  # one lapsed, not both
        finally:
            await _clean(links, [alive, doomed])

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_without_redis_a_replica_still_bounds_the_streams_it_serves():
    async def scenario() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            nobody_listens = probe.getsockname()[1]
        link = RedisLink(f"redis://127.0.0.1:{nobody_listens}/0", "stream-slots-none")
        replica = RedisStreamSlots(link, per_user=2)
        try:
            held = [await _taken(replica), await _taken(replica)]
            assert all(held)
            assert await _taken(replica) is None
            await held[0].release()
            assert await _taken(replica) is not None
        finally:
            await link.client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 30))
