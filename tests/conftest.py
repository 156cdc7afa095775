"""Shared fixtures: settings for a test, a real uvicorn server on a free port, SSE reading."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis
import uvicorn
from httpx_sse import EventSource
from pgqueuer.queries import Queries
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine
from sse_starlette.sse import AppStatus

from app.core.config import PROJECT_ROOT, Settings, async_database_url
from app.core.http_server import server_config
from app.db.engine import plain_postgres_url
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
        IMAGE_STORE_URL=None,
        IMAGE_LINKS="proxy",
        AWS_ENDPOINT_URL=None,
        AWS_ACCESS_KEY_ID=None,
        AWS_SECRET_ACCESS_KEY=None,
        # Tests make more images than a day's default; tests/test_quotas.py sets its own.
        DAILY_IMAGE_QUOTA=0,
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
        config = server_config(self.app, settings, log_config=None, lifespan="on", timeout_graceful_shutdown=5)
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
    """The events of the lines of a text/event-stream (curl's output, say)."""
    stream = httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=(f"{line}\n".encode() for line in lines)
    )
    yield from _events(EventSource(stream))


def _events(source: EventSource) -> Iterator[SseEvent]:
    """httpx-sse's events, with ids as they are on the wire: httpx-sse carries the last id on
    to an event sent without one (as the standard says), and ids here only grow, so a repeated
    one was not sent. A message without data (`retry:` alone) is no event here."""
    last_id = ""
    for event in source.iter_sse():
        if event.data:
            yield SseEvent(event=event.event, data=event.json(), id=event.id if event.id != last_id else None)
        last_id = event.id


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
        for event in _events(EventSource(response)):
            events.append(event)
            if stop is not None and stop(event):
                break
    return events


def login(client: httpx.Client, user: tuple[str, str] = ALICE) -> str:
    """An access token for a demo user of the service `client` talks to, from its login."""
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


# Databases ------------------------------------------------------------------------------

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_TABLES = (
    "job_events",
    "images",
    "jobs",
    "daily_usage",
    "refresh_tokens",
    "auth_sessions",
    "users",
    "chore_leases",
    "alembic_version",
)
# The work queue's (PgQueuer's) schema, installed by the scaled work queue at its start.
_QUEUE_SCHEMA = (
    "DROP TABLE IF EXISTS pgqueuer, pgqueuer_log, pgqueuer_schedules, pgqueuer_statistics CASCADE",
    "DROP FUNCTION IF EXISTS fn_pgqueuer_changed CASCADE",
    "DROP TYPE IF EXISTS pgqueuer_status, pgqueuer_statistics_status CASCADE",
)


def _unavailable(reason: str) -> None:
    """Skip with the reason; under CI, where the server must be there, fail instead."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this must not be skipped)")
    pytest.skip(reason)


def postgres_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        _unavailable("TEST_DATABASE_URL is not set: PostgreSQL tests skipped")
    url = async_database_url(url)

    async def reset() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as connection:
                for table in _TABLES:
                    await connection.execute(text(f"DROP TABLE IF EXISTS {table} CASCADE"))
                for statement in _QUEUE_SCHEMA:
                    await connection.execute(text(statement))
        finally:
            await engine.dispose()

    try:
        asyncio.run(reset())
    except (OSError, SQLAlchemyError) as exc:
        _unavailable(f"PostgreSQL at TEST_DATABASE_URL is unreachable: {exc}")
    return url


def redis_url() -> str:
    url = os.environ.get("TEST_REDIS_URL")
    if not url:
        _unavailable("TEST_REDIS_URL is not set: scale-out tests skipped")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis at TEST_REDIS_URL is unreachable: {exc}")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """Each storage test runs on a fresh SQLite file, and on PostgreSQL when configured."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'myflix.db'}"
    return postgres_url()


def query_database(url: str, sql: str) -> list[tuple]:
    async def run() -> list[tuple]:
        engine = create_async_engine(async_database_url(url))
        try:
            async with engine.connect() as connection:
                return [tuple(row) for row in await connection.execute(text(sql))]
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class RedisServer:
    """A redis-server of the test's own, on a free port of loopback (or on `host`:`port`), to
    stop and start again."""

    def __init__(self, tmp_path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            _unavailable("redis-server is not installed: the Redis restart tests are skipped")
        self.binary, self.dir, self.host = binary, tmp_path, host
        self.port = port or _free_port(host)
        self.url = f"redis://{host}:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                # No password: off loopback, protected mode would refuse every client.
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, what="redis-server to answer")
        return self

    def _answers(self) -> bool:
        try:
            return redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.2).ping()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def enqueue_work(url: str, payload: object, priority: int = 0) -> None:
    """An item in the scaled work queue, as its PgQueuer puts one there (payload: as JSON)."""

    async def run() -> None:
        connection = await asyncpg.connect(plain_postgres_url(url))
        try:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            await Queries.from_asyncpg_connection(connection).enqueue("image", data, priority)
        finally:
            await connection.close()

    asyncio.run(run())


# A service in its own process, to stop with SIGTERM or SIGKILL and start again ------------


# A shell starts a background job with SIGINT ignored, and children inherit that: a suite
# started with `... &` would start children that Ctrl-C (or a test's SIGINT) cannot stop. The
# command is started through this, which sets SIGINT back to its default and execs it (in the
# same process, so its pid is the command's); a `preexec_fn` would do it between fork and exec,
# which is not safe in a process with threads, as the tests' is.
_DEFAULT_SIGINT_THEN_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"
)


def with_default_sigint(command: list[str]) -> list[str]:
    """`command`, to run with SIGINT at its default whatever the tests' own disposition."""
    return [sys.executable, "-c", _DEFAULT_SIGINT_THEN_EXEC, *command]


class ServiceProcess:
    """The API as deployed, `python run.py`; with `worker=True`, `python -m app.worker`."""

    def __init__(self, env: dict[str, str], log_path: Path, worker: bool = False) -> None:
        self.log_path = log_path
        self.worker = worker
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        # Every setting given explicitly: environment variables beat a developer's .env.local.
        self.env = {
            **os.environ,
            "ENVIRONMENT": "development",
            "JWT_SECRET_KEY": TEST_JWT_SECRET,
            "REPLICATE_API_TOKEN": "",
            "PUBLIC_BASE_URL": "",
            "IMAGE_STORE_DIR": "",
            "IMAGE_STORE_URL": "",
            "IMAGE_LINKS": "",
            "AWS_ENDPOINT_URL": "",
            "AWS_ACCESS_KEY_ID": "",
            "AWS_SECRET_ACCESS_KEY": "",
            "LOG_LEVEL": "INFO",
            "DAILY_IMAGE_QUOTA": "0",  # as make_settings: a test that wants a quota sets one
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WORKER_METRICS_PORT": str(self.port),  # a worker serves its metrics there
            **env,
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServiceProcess":
        self._starts_before = self.log_path.read_text().count("worker ready") if self.log_path.exists() else 0
        command = ["-m", "app.worker"] if self.worker else ["run.py"]
        with open(self.log_path, "ab") as log:  # a file, not a pipe nobody drains
            self.process = subprocess.Popen(
                with_default_sigint([sys.executable, *command]),
                cwd=PROJECT_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._serving, timeout=30, what="the service process to serve")
        return self

    def _serving(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"service exited: {self.log_path.read_text()[-3000:]}")
        if self.worker:
            return self.log_path.read_text().count("worker ready") > self._starts_before
        try:
            return httpx.get(f"{self.base_url}/openapi.json", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


@pytest.fixture
def service_process(tmp_path):
    """Start services in their own processes: `service_process(IMAGE_PROVIDER="local", ...)`."""
    started: list[ServiceProcess] = []

    def start(worker: bool = False, **env: str) -> ServiceProcess:
        service = ServiceProcess(
            {"DATA_DIR": str(tmp_path / "data"), **{k: str(v) for k, v in env.items()}},
            tmp_path / f"{'worker' if worker else 'service'}-{len(started)}.log",
            worker=worker,
        )
        started.append(service)
        return service.start()

    yield start
    for service in started:
        if service.process is not None and service.process.poll() is None:
            service.process.kill()
            service.process.wait()


# An S3-compatible store -------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Starting SeaweedFS takes seconds: what needs it is left out of the fast loop.
    for item in items:
        if "s3" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One SeaweedFS for the session; each test takes a prefix of its own (`s3.env()`)."""
    from tests.s3_server import SeaweedS3  # it imports this module

    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
