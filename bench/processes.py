"""Starting the service (and its fakes) in processes of their own, on loopback."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.core.config import async_database_url

PROJECT_ROOT = Path(__file__).resolve().parents[1]
USERS = (("alice@myflix.dev", "alice-wonderland"), ("bob@myflix.dev", "bob-builder"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


class ServerProcess:
    """`<app>` on a free port under the service's own server configuration (`python -m
    bench.serve`), with settings given as environment variables (which beat any .env.local),
    stopped with SIGTERM. `open_file_limit`: the process's RLIMIT_NOFILE, soft and hard."""

    def __init__(
        self,
        app: str,
        env: dict[str, str],
        data_dir: Path,
        worker: bool = False,
        open_file_limit: int | None = None,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "DATA_DIR": str(data_dir),
            "DATABASE_URL": "",
            "IMAGE_STORE_DIR": "",
            "REPLICATE_API_TOKEN": "",
            "PUBLIC_BASE_URL": "",
            "LOG_LEVEL": "WARNING",
            **env,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WORKER_METRICS_PORT": str(self.port),
        }
        command = ["-m", "app.worker"] if worker else ["-m", "bench.serve", app, "--no-access-log"]
        if open_file_limit is not None and not worker:
            command += ["--open-file-limit", str(open_file_limit)]
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "process.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, *command],
                cwd=PROJECT_ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if worker:
            self._wait_until_logged("worker ready")
        else:
            self._wait_until_serving()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_until_serving(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.base_url}/openapi.json", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.base_url} did not come up")

    def _wait_until_logged(self, line: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class FakeReplicateProcess:
    """The tests' fake Replicate API, in its own process so its timing is not the client's.
    `create_rate_per_minute` (0: none) and `create_burst`: its throttle of prediction creates
    (429 with Retry-After above it), as Replicate's; `stats()` reads its counters."""

    def __init__(
        self, latency: float, token: str = "r8_bench", create_rate_per_minute: float = 0, create_burst: int = 1
    ) -> None:
        self.token = token
        command = [sys.executable, "-m", "tests.fake_replicate", "--latency", str(latency), "--token", token]
        if create_rate_per_minute:
            command += ["--create-rate-per-minute", str(create_rate_per_minute), "--create-burst", str(create_burst)]
        self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
        self.base_url = self.process.stdout.readline().strip()
        if not self.base_url:
            raise RuntimeError(f"the fake Replicate API exited with {self.process.wait(timeout=30)}")

    def stats(self) -> dict:
        """The fake's counters (`FakeReplicate.stats`): creates accepted, per wall-clock second
        and each one's time; creates throttled with 429."""
        response = httpx.get(f"{self.base_url}/_fake/stats", timeout=10)
        response.raise_for_status()
        return response.json()

    def __enter__(self) -> "FakeReplicateProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


class ScaledDeployment:
    """API replicas and `python -m app.worker` processes over Redis and a PostgreSQL database
    of their own (created here, dropped at the end), sharing one image store."""

    def __init__(
        self,
        settings: dict[str, str],
        data_dir: Path,
        database_url: str,
        redis_url: str,
        replicas: int = 2,
        workers: int = 2,
    ) -> None:
        self.admin_url = async_database_url(database_url)
        self.database = f"myflix_bench_{uuid.uuid4().hex[:8]}"
        self.redis_url, self.prefix = redis_url, f"bench-{uuid.uuid4().hex[:8]}"
        asyncio.run(self._sql(f"CREATE DATABASE {self.database}"))
        env = {
            **settings,
            "DATABASE_URL": self.admin_url.rsplit("/", 1)[0] + f"/{self.database}",
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": self.prefix,
            "IMAGE_STORE_DIR": str(data_dir / "images"),
            "RUN_WORK_IN_API": "false",
            # Every process signs and checks tokens with one key (each has a data directory
            # of its own, so none may make its own).
            "JWT_SECRET_KEY": f"bench-{uuid.uuid4().hex}{uuid.uuid4().hex}",
        }
        self.replicas: list[ServerProcess] = []
        self.workers: list[ServerProcess] = []
        try:
            for n in range(replicas):
                self.replicas.append(ServerProcess("main:app", env, data_dir / f"replica-{n}"))
            for n in range(workers):
                # INFO: the worker says when it is ready.
                worker_env = {**env, "LOG_LEVEL": "INFO"}
                self.workers.append(ServerProcess("main:app", worker_env, data_dir / f"worker-{n}", worker=True))
        except BaseException:
            self.stop()
            raise

    @property
    def base_urls(self) -> list[str]:
        return [replica.base_url for replica in self.replicas]

    async def _sql(self, statement: str) -> None:
        engine = create_async_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                await connection.execute(text(statement))
        finally:
            await engine.dispose()

    def stop(self) -> None:
        for process in [*self.replicas, *self.workers]:
            process.stop()
        asyncio.run(self._sql(f"DROP DATABASE IF EXISTS {self.database}"))
        client = redis.Redis.from_url(self.redis_url)
        keys = list(client.scan_iter(f"{self.prefix}:*"))
        if keys:
            client.delete(*keys)

    def __enter__(self) -> "ScaledDeployment":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
