"""Starting the service (and its fakes) in processes of their own, on loopback."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

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
    """`python -m uvicorn <app>` on a free port, with settings given as environment variables
    (which beat any .env.local), stopped with SIGTERM."""

    def __init__(self, app: str, env: dict[str, str], data_dir: Path) -> None:
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
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(self.port),
             "--no-access-log", "--log-level", "warning"],
            cwd=PROJECT_ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
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
    """The tests' fake Replicate API, in its own process so its timing is not the client's."""

    def __init__(self, latency: float, token: str = "r8_bench") -> None:
        self.token = token
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_replicate", "--latency", str(latency), "--token", token],
            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
        )
        self.base_url = self.process.stdout.readline().strip()

    def __enter__(self) -> "FakeReplicateProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
