"""Shared fixtures: settings for a test, a real uvicorn server on a free port, SSE reading."""

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from sse_starlette.sse import AppStatus

from app.core.config import Settings
from main import create_app
from tests.fake_replicate import FakeReplicate

TEST_JWT_SECRET = "test-secret-0123456789abcdef0123456789abcdef"
ALICE = ("alice@myflix.dev", "alice-wonderland")
BOB = ("bob@myflix.dev", "bob-builder")


def make_settings(data_dir: Path, **overrides) -> Settings:
    values = dict(
        DATA_DIR=data_dir,
        IMAGE_PROVIDER="local",
        LOCAL_LATENCY_MS=50,
        LOCAL_LATENCY_JITTER_MS=0,
        SSE_KEEPALIVE_SECONDS=15,
        LOG_LEVEL="INFO",
        LOG_FORMAT="text",
        REPLICATE_API_TOKEN=None,
        PUBLIC_BASE_URL=None,
        JWT_SECRET_KEY=TEST_JWT_SECRET,
        DATABASE_URL=None,
        IMAGE_STORE_DIR=None,
    )
    values.update(overrides)
    # Init arguments win over the environment and the dotenv files.
    return Settings(**values)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


class LiveServer:
    """The app under a real uvicorn in a background thread, so streams go over real HTTP."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_config=None, lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        wait_until(lambda: self._server.started, what="uvicorn to start")
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


@dataclass
class SseEvent:
    event: str
    data: dict
    id: str | None


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    fields: dict[str, list[str]] = {}
    for line in lines:
        if line == "":
            if "data" in fields or "event" in fields:
                yield SseEvent(
                    event=fields.get("event", ["message"])[0],
                    data=json.loads("\n".join(fields.get("data", ["null"]))),
                    id=fields.get("id", [None])[0],
                )
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)


def read_stream(
    client: httpx.Client,
    job_id: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    stop: Callable[[SseEvent], bool] | None = None,
) -> list[SseEvent]:
    """Read the job's stream until the server ends it (or `stop` says so)."""
    events = []
    with client.stream("GET", f"/api/generate/{job_id}/stream", headers=headers, params=params) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in parse_sse(response.iter_lines()):
            events.append(event)
            if stop is not None and stop(event):
                break
    return events


def login(client: httpx.Client, user: tuple[str, str] = ALICE) -> str:
    response = client.post("/api/auth/login", json={"email": user[0], "password": user[1]})
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def create_job(client: httpx.Client, token: str, **body) -> str:
    response = client.post("/api/generate/", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


@pytest.fixture(autouse=True)
def _reset_sse_exit_flag() -> Iterator[None]:
    # sse-starlette keeps a process-wide "server is exiting" flag that nothing resets.
    AppStatus.should_exit = False
    yield
    AppStatus.should_exit = False


@pytest.fixture
def live_server(tmp_path: Path) -> Callable[..., LiveServer]:
    """Start a server with settings overrides: `with live_server(LOCAL_LATENCY_MS=10) as s:`."""
    return lambda **overrides: LiveServer(make_settings(tmp_path / "data", **overrides))


@pytest.fixture
def fake_replicate() -> Iterator[FakeReplicate]:
    with FakeReplicate(latency=0.05).start() as fake:
        yield fake
