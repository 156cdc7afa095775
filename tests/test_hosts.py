"""The deployment of compose.yaml across separate hosts: 2 API replicas and 2 workers, each in a
network namespace of its own with its own working and data directories, reaching PostgreSQL,
Redis and the S3 image store (SeaweedFS) over veth links only, never a shared filesystem.

Each process runs the api or worker service's command and environment from compose.yaml,
resolved as `docker compose` resolves them (variables from the shell, the image's ENV from
the Dockerfile): the file cannot drift from what is tested. Needs root (`ip netns`), the
PostgreSQL of TEST_DATABASE_URL, redis-server and `weed` (skipped without, failed under CI).
"""

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy.engine import make_url

from app.core.config import PROJECT_ROOT
from tests.conftest import TEST_JWT_SECRET, RedisServer, _unavailable, login, postgres_url, read_stream, wait_until
from tests.faults import PgSandbox
from tests.hosts import GATEWAY, Hosts, TcpForwarder, cannot_make_hosts, compose_services, environment_of
from tests.s3_server import SeaweedS3

pytestmark = pytest.mark.slow  # a deployment of six servers

# What an operator's shell would give `docker compose up`.
SHELL = {
    "JWT_SECRET_KEY": TEST_JWT_SECRET,
    "LOCAL_LATENCY_MS": "1500",
    "WORKER_CLAIM_TIMEOUT_SECONDS": "2",
    "SEED_DEMO_USERS": "true",  # the test signs in as a demo user
}
APIS, WORKERS = ["api-1", "api-2"], ["worker-1", "worker-2"]


def _image_environment() -> dict[str, str]:
    """The Dockerfile's ENV lines."""
    text = (PROJECT_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            found.update(re.findall(r"(\w+)=(\S+)", line))
    return found


class HostProcess:
    """A compose service's command, with its environment, on a host of its own: the image's
    /app is this checkout, its /data a directory of this host's."""

    def __init__(self, hosts: Hosts, host: str, service: dict, root: Path) -> None:
        self.hosts, self.host, self.root = hosts, host, root
        (root / "data").mkdir(parents=True)
        container_paths = {"/app": str(PROJECT_ROOT), "/data": str(root / "data")}
        environment = {**_image_environment(), **environment_of(service)}
        self.env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            **{name: container_paths.get(value, value) for name, value in environment.items()},
        }
        command = service["command"]
        assert command[0] == "python"
        self.argv = [sys.executable, *command[1:]]
        self.port = int(self.env["WORKER_METRICS_PORT"] if "app.worker" in command else self.env["PORT"])
        self.base_url = f"http://{hosts.address[host]}:{self.port}"
        self.log_path = root / "log.txt"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "HostProcess":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.hosts.command(self.host, self.argv), cwd=self.root, env=self.env, stdout=log, stderr=log
            )
        wait_until(self.ready, timeout=60, what=f"{self.host} to be ready")
        return self

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.host} exited: {self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def busy(self) -> bool:
        try:
            return "\nmyflix_busy_workers 1.0" in httpx.get(f"{self.base_url}/metrics", timeout=2).text
        except httpx.TransportError:
            return False

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)


class Deployment:
    def __init__(self, apis: list[HostProcess], workers: list[HostProcess], redis: RedisServer, pg: PgSandbox):
        self.apis, self.workers, self.redis, self.pg = apis, workers, redis, pg

    def holder(self) -> HostProcess:
        """The worker making the one image in progress."""
        holders: list[HostProcess] = []
        wait_until(lambda: bool(holders.extend(w for w in self.workers if w.busy()) or holders), what="a holder")
        (holder,) = holders
        return holder


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    reason = cannot_make_hosts()
    if reason is not None:
        _unavailable(f"{reason}: the test across hosts is skipped")
    admin_url = postgres_url()
    services = compose_services(PROJECT_ROOT / "compose.yaml", SHELL)
    shared = environment_of(services["api"])
    database = make_url(shared["DATABASE_URL"])
    s3_endpoint = urlsplit(shared["AWS_ENDPOINT_URL"])
    bucket = urlsplit(shared["IMAGE_STORE_URL"]).netloc
    aliases = [database.host, urlsplit(shared["REDIS_URL"]).hostname, s3_endpoint.hostname]
    pg = PgSandbox(admin_url, database.database).create()
    admin = make_url(admin_url)
    processes: list[HostProcess] = []
    try:
        with (
            Hosts([*APIS, *WORKERS], aliases) as hosts,
            TcpForwarder((GATEWAY, database.port or 5432), (admin.host, admin.port or 5432)),
            SeaweedS3(
                tmp_path / "s3",
                ip=GATEWAY,
                s3_port=s3_endpoint.port,
                bucket=bucket,
                keys=(shared["AWS_ACCESS_KEY_ID"], shared["AWS_SECRET_ACCESS_KEY"]),
            ),
        ):
            (tmp_path / "redis").mkdir()
            redis = RedisServer(tmp_path / "redis", host=GATEWAY, port=urlsplit(shared["REDIS_URL"]).port or 6379)
            try:
                redis.start()
                for name in [*APIS, *WORKERS]:
                    service = services["api" if name in APIS else "worker"]
                    processes.append(HostProcess(hosts, name, service, tmp_path / name).start())
                yield Deployment(processes[:2], processes[2:], redis, pg)
            finally:
                for process in processes:
                    process.kill()
                if redis.process is not None and redis.process.poll() is None:
                    redis.kill()
    finally:
        pg.drop()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _create(client: httpx.Client, token: str, prompt: str, num_images: int) -> str:
    posted = client.post("/api/generate/", json={"prompt": prompt, "num_images": num_images}, headers=_auth(token))
    assert posted.status_code == 202, posted.text
    return posted.json()["job_id"]


def _done(client: httpx.Client, job_id: str, token: str) -> dict:
    events = read_stream(client, job_id, headers=_auth(token))
    assert events[-1].event == "done", [e.event for e in events]
    return events[-1].data


def test_the_compose_deployment_across_hosts_survives_a_killed_and_a_paused_worker_and_a_redis_restart(deployment):
    a, b = deployment.apis
    with a.client() as on_a, b.client() as on_b:
        token = login(on_a)

        # Made on A, streamed from B; its images read through either.
        done = _done(on_b, _create(on_a, token, "across hosts", 4), token)
        assert done["status"] == "succeeded"
        for image in done["images"]:
            link = urlsplit(image["url"])
            path = f"{link.path}?{link.query}"
            assert on_a.get(path).content == on_b.get(path).content != b""

        # A worker killed mid-image: the other takes it over.
        job_id = _create(on_a, token, "a worker dies", 1)
        killed = deployment.holder()
        killed.kill()
        assert _done(on_b, job_id, token)["status"] == "succeeded"
        (survivor,) = [w for w in deployment.workers if w is not killed]
        assert "took over an image" in survivor.log_path.read_text()
        killed.start()

        # A worker paused for twice the claim timeout while it holds an image.
        job_id = _create(on_a, token, "a worker sleeps", 2)
        running = f"SELECT count(*) FROM images WHERE job_id = '{job_id}' AND status = 'running'"
        wait_until(lambda: deployment.pg.query(running) == [(2,)], what="both workers to start an image")
        paused = deployment.workers[0]
        paused.signal(signal.SIGSTOP)
        paused_at = time.monotonic()
        try:
            assert _done(on_b, job_id, token)["status"] == "succeeded"
            time.sleep(max(0.0, 2 * 2 - (time.monotonic() - paused_at)))  # the pause's length
        finally:
            paused.signal(signal.SIGCONT)
        wait_until(paused.ready, what="the paused worker to be ready again")
        assert _done(on_a, job_id, token)["status"] == "succeeded"

        # Redis restarted empty: jobs are still taken meanwhile, and every stream ends.
        deployment.redis.kill()
        during = _create(on_a, token, "while redis is away", 1)
        deployment.redis.start()
        wait_until(lambda: a.ready() and b.ready(), timeout=15, what="the replicas to see Redis again")
        assert _done(on_b, during, token)["status"] == "succeeded"
        assert _done(on_a, _create(on_b, token, "after redis", 1), token)["status"] == "succeeded"
