"""`python -m app.images migrate`: a local image store into a real S3-compatible bucket
(SeaweedFS), run as a deployment runs it, in a process of its own."""

import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import obstore
import pytest
from obstore.store import S3Store
from PIL import Image

from app.core.config import PROJECT_ROOT, S3Location
from app.services.image_store import LocalImageStore
from app.services.image_store_s3 import S3ImageStore
from tests.conftest import TEST_JWT_SECRET, wait_until
from tests.s3_server import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedS3

COUNTS = re.compile(r"copied (\d+), skipped (\d+) \(already there\), failed (\d+)")
# Never in any output: the command must not print the credentials it is given.
SECRETS = (SECRET_KEY, TEST_JWT_SECRET)


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory) -> Iterator[SeaweedS3]:
    """One server for the module (it takes seconds to start); each test has a prefix of its own."""
    with SeaweedS3(tmp_path_factory.mktemp("migrate-s3")) as server:
        yield server


def png(number: int) -> bytes:
    """A real PNG, of its own bytes and size."""
    out = io.BytesIO()
    Image.new("RGB", (4 + number, 4), (number * 37 % 256, 90, 160)).save(out, "PNG")
    return out.getvalue()


def add_images(directory: Path, keys: list[str]) -> dict[str, bytes]:
    """Images saved as the service saves them."""
    store = LocalImageStore(directory)
    images = {key: png(len(key) + index) for index, key in enumerate(keys)}
    for key, content in images.items():
        store.save(key, content)
    return images


def command_env(tmp_path: Path, source: Path | None, endpoint: str, **overrides: str) -> dict[str, str]:
    """Every setting the command reads, given explicitly: environment variables beat a
    developer's .env.local."""
    return {
        **os.environ,
        "ENVIRONMENT": "development",
        "JWT_SECRET_KEY": TEST_JWT_SECRET,
        "REDIS_URL": "",
        "DATABASE_URL": "",
        "IMAGE_LINKS": "proxy",
        "DATA_DIR": str(tmp_path / "data"),
        "IMAGE_STORE_DIR": "",
        "IMAGE_STORE_URL": source.as_uri() if source is not None else "",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
        **overrides,
    }


def migrate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.images", "migrate", *args]


def migrate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        migrate_command(*args), env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    for secret in SECRETS:
        assert secret not in output
    return result


def counts(stdout: str) -> tuple[int, int, int]:
    """(copied, skipped, failed) of the summary, the last line."""
    last = stdout.strip().splitlines()[-1]
    found = COUNTS.search(last)
    assert found is not None, stdout
    copied, skipped, failed = (int(group) for group in found.groups())
    return copied, skipped, failed


def objects_in(s3: SeaweedS3, prefix: str) -> dict[str, int]:
    """Every object under the prefix (not only images), with its size."""
    config = {"endpoint": s3.endpoint, "region": "us-east-1"}
    config |= {"access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY}
    store = S3Store(BUCKET, prefix=prefix, config=config, client_options={"allow_http": True})
    return {meta["path"]: meta["size"] for batch in obstore.list(store) for meta in batch}


def assert_in_bucket(s3: SeaweedS3, prefix: str, images: dict[str, bytes]) -> None:
    """The bucket holds these images, byte for byte, and nothing else, as the service reads them."""
    assert objects_in(s3, prefix) == {key: len(content) for key, content in images.items()}
    store = S3ImageStore(S3Location(BUCKET, prefix), s3.endpoint, ACCESS_KEY, SECRET_KEY, "us-east-1")

    async def read_all(key: str) -> bytes:
        content = await store.read(key)
        return b"".join([chunk async for chunk in content.chunks])

    async def read_every() -> dict[str, bytes]:
        return {key: await read_all(key) for key in images}

    assert asyncio.run(read_every()) == images


class HoldingProxy:
    """A TCP proxy in front of the S3 server that watches the requests go by: it lets the
    first `let_through` uploads of images (`PUT <path>…`) pass and holds every later one until
    `release()`; it cuts the connection of any upload of the key `refuse`."""

    def __init__(self, upstream: str, path: str, let_through: int | None = None, refuse: str | None = None) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self._upload = f"PUT {path}".encode()
        self._refused = f"PUT {path}{refuse}".encode() if refuse else None
        self.let_through = let_through
        self.uploads_seen = 0
        self.holding = 0
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._upstream)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        # The end of the chunk before: a request line may be cut in two.
        upload_tail = refused_tail = b""
        try:
            while chunk := source.recv(65536):
                if requests:
                    seen = upload_tail + chunk
                    upload_tail = seen[-len(self._upload) + 1 :]
                    if self._refused is not None:
                        if self._refused in refused_tail + chunk:
                            return
                        refused_tail = (refused_tail + chunk)[-len(self._refused) + 1 :]
                    for _ in range(seen.count(self._upload)):
                        self._pass_or_hold()
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def _pass_or_hold(self) -> None:
        with self._lock:
            self.uploads_seen += 1
            hold = self.let_through is not None and self.uploads_seen > self.let_through
            if hold:
                self.holding += 1
        if hold:
            self._released.wait()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self._listener.close()
        for end in self._sockets:
            end.close()


@pytest.fixture
def proxies() -> Iterator[list[HoldingProxy]]:
    made: list[HoldingProxy] = []
    yield made
    for proxy in made:
        proxy.close()


class Run:
    """The command in the background, its output in files (not pipes nobody drains)."""

    def __init__(self, env: dict[str, str], tmp_path: Path, *args: str) -> None:
        self.stdout_path, self.stderr_path = tmp_path / "run.out", tmp_path / "run.err"
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            command = migrate_command(*args)
            self.process = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=stdout, stderr=stderr)

    def alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the command exited early: {self.stdout()}{self.stderr()}")
        return True

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def wait(self) -> int:
        code = self.process.wait(timeout=60)
        output = self.stdout() + self.stderr()
        assert "Traceback" not in output, output
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.kill()


def new_prefix() -> str:
    return f"migrate-{uuid.uuid4().hex[:10]}"


@pytest.mark.slow
def test_the_images_and_nothing_else_are_copied_then_skipped(seaweed, tmp_path):
    source = tmp_path / "images"
    images = add_images(source, ["job_a-0.png", "job_a-1.png", "job_b-0.webp", "job_c-3.jpg"])
    # Not images: a save in progress, a probe, a stray file, a directory.
    (source / ".incoming-x").write_bytes(png(1)[:20])
    (source / ".probe-0123").write_bytes(b"probe")
    (source / "notes.txt").write_text("not an image")
    (source / "job_d-0.png").mkdir()
    prefix = new_prefix()
    target = f"s3://{BUCKET}/{prefix}"
    env = command_env(tmp_path, source, seaweed.endpoint)

    first = migrate(env, "--to", target)  # from the configured store
    assert first.returncode == 0, first.stderr
    assert counts(first.stdout) == (4, 0, 0)
    assert f"Copied to {target}: copied 4" in first.stdout
    assert "left out: 4 entries that are not images" in first.stdout
    assert_in_bucket(seaweed, prefix, images)

    # The service made more while the first copy ran; the store is switched to the bucket,
    # the source is named: only the new ones are copied.
    images |= add_images(source, ["job_e-0.png", "job_e-1.png"])
    switched = command_env(tmp_path, None, seaweed.endpoint, IMAGE_STORE_URL=target)
    second = migrate(switched, "--to", target, "--from", str(source))
    assert second.returncode == 0, second.stderr
    assert counts(second.stdout) == (2, 4, 0)
    assert_in_bucket(seaweed, prefix, images)

    again = migrate(switched, "--to", target, "--from", source.as_uri())
    assert again.returncode == 0, again.stderr
    assert counts(again.stdout) == (0, 6, 0)


@pytest.mark.slow
def test_a_run_interrupted_mid_way_is_finished_by_the_next(seaweed, tmp_path, proxies, runs):
    source = tmp_path / "images"
    images = add_images(source, [f"job_many-{index}.png" for index in range(16)])
    prefix = new_prefix()
    target = f"s3://{BUCKET}/{prefix}"
    # Three uploads go through, the next ones wait at the proxy: the interrupt comes mid-way.
    proxy = HoldingProxy(seaweed.endpoint, f"/{BUCKET}/{prefix}/job_", let_through=3)
    proxies.append(proxy)
    run = Run(command_env(tmp_path, source, proxy.endpoint), tmp_path, "--to", target)
    runs.append(run)
    wait_until(lambda: run.alive() and proxy.holding > 0, timeout=60, what="an upload to be held")

    run.interrupt()
    wait_until(lambda: run.alive() and "Stopping" in run.stderr(), timeout=30, what="the command to stop")
    proxy.release()  # the uploads under way finish, and count
    assert run.wait() == 130
    copied, skipped, failed = counts(run.stdout())
    assert "Interrupted:" in run.stdout() and "run the same command again" in run.stdout()
    # The three let through and the held ones (at most eight in flight): not all sixteen.
    assert 4 <= copied < 16 and (skipped, failed) == (0, 0), run.stdout()
    assert len(objects_in(seaweed, prefix)) == copied

    resumed = migrate(command_env(tmp_path, source, seaweed.endpoint), "--to", target)
    assert resumed.returncode == 0, resumed.stderr
    assert counts(resumed.stdout) == (16 - copied, copied, 0)
    assert_in_bucket(seaweed, prefix, images)


@pytest.mark.slow
def test_a_second_interrupt_quits_at_once_and_the_next_run_finishes(seaweed, tmp_path, proxies, runs):
    source = tmp_path / "images"
    images = add_images(source, [f"job_stuck-{index}.png" for index in range(12)])
    prefix = new_prefix()
    target = f"s3://{BUCKET}/{prefix}"
    proxy = HoldingProxy(seaweed.endpoint, f"/{BUCKET}/{prefix}/job_", let_through=0)  # every upload hangs
    proxies.append(proxy)
    run = Run(command_env(tmp_path, source, proxy.endpoint), tmp_path, "--to", target)
    runs.append(run)
    wait_until(lambda: run.alive() and proxy.holding > 0, timeout=60, what="an upload to be held")

    run.interrupt()
    wait_until(lambda: run.alive() and "Stopping" in run.stderr(), timeout=30, what="the command to stop")
    run.interrupt()  # the uploads are still held: it does not wait for them
    assert run.wait() == 130
    assert counts(run.stdout()) == (0, 0, 0)
    assert re.search(r"; [1-8] uploads under way abandoned; 12 not done", run.stdout()), run.stdout()

    proxy.close()  # what it held goes on, or not: the next run copies what is not there whole
    resumed = migrate(command_env(tmp_path, source, seaweed.endpoint), "--to", target)
    assert resumed.returncode == 0, resumed.stderr
    copied, skipped, failed = counts(resumed.stdout)
    assert copied + skipped == 12 and failed == 0
    assert_in_bucket(seaweed, prefix, images)


@pytest.mark.slow
def test_an_image_that_cannot_be_copied_is_named_and_fails_the_run(seaweed, tmp_path, proxies):
    source = tmp_path / "images"
    images = add_images(source, ["job_ok-0.png", "job_bad-0.png", "job_ok-1.png"])
    prefix = new_prefix()
    target = f"s3://{BUCKET}/{prefix}"
    proxy = HoldingProxy(seaweed.endpoint, f"/{BUCKET}/{prefix}/", refuse="job_bad-0.png")
    proxies.append(proxy)

    broken = migrate(command_env(tmp_path, source, proxy.endpoint), "--to", target)
    assert broken.returncode == 1
    assert counts(broken.stdout) == (2, 0, 1)
    reason = "The image could not be kept: the store failed the request or could not be reached."
    assert f"job_bad-0.png: failed: {reason}" in broken.stderr
    assert "Not all copied" in broken.stdout

    retried = migrate(command_env(tmp_path, source, seaweed.endpoint), "--to", target)
    assert retried.returncode == 0, retried.stderr
    assert counts(retried.stdout) == (1, 2, 0)
    assert_in_bucket(seaweed, prefix, images)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "file:///x"], "--to must be an S3 bucket, s3://bucket or s3://bucket/prefix, not 'file:///x'"),
        (["--to", "s3://Not_A_Bucket/x"], "--to must be an S3 bucket"),
        (["--to", f"s3://{BUCKET}/x", "--from", "/nonexistent/images"], "/nonexistent/images, is not a directory"),
        (["--to", f"s3://{BUCKET}/x", "--from", f"s3://{BUCKET}/y"], "--from must be a local directory"),
        (["--from", "/tmp"], "the following arguments are required: --to"),
        (["--to", f"s3://{BUCKET}/x", "--jobs", "0"], "--jobs: must be a whole number from 1 to 64"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(tmp_path, args, message):
    (tmp_path / "images").mkdir()
    result = migrate(command_env(tmp_path, tmp_path / "images", f"http://127.0.0.1:{_closed_port()}"), *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_without_from_a_configured_bucket_is_no_source(tmp_path):
    env = command_env(tmp_path, None, f"http://127.0.0.1:{_closed_port()}", IMAGE_STORE_URL=f"s3://{BUCKET}/live")
    result = migrate(env, "--to", f"s3://{BUCKET}/x")
    assert result.returncode == 2
    assert f"the configured image store is s3://{BUCKET}/live, not a local directory" in result.stderr
    assert "--from" in result.stderr


def test_invalid_settings_end_it_with_the_reason_and_no_secret(tmp_path):
    (tmp_path / "images").mkdir()
    env = command_env(tmp_path, tmp_path / "images", "ftp://not-http")
    result = migrate(env, "--to", f"s3://{BUCKET}/x")  # checks that no secret is printed
    assert result.returncode == 2
    assert "Invalid settings:" in result.stderr
    assert "AWS_ENDPOINT_URL must be an http:// or https:// URL" in result.stderr


@pytest.mark.slow
def test_refused_credentials_end_it_before_any_image(seaweed, tmp_path):
    source = tmp_path / "images"
    add_images(source, ["job_a-0.png"])
    wrong = "not-the-secret-0123456789"
    env = command_env(tmp_path, source, seaweed.endpoint, AWS_SECRET_ACCESS_KEY=wrong)
    result = migrate(env, "--to", f"s3://{BUCKET}/{new_prefix()}")
    assert result.returncode == 3
    assert "cannot be used: not writable: the store refused the credentials" in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_an_unreachable_target_ends_it_before_any_image(tmp_path):
    source = tmp_path / "images"
    add_images(source, ["job_a-0.png"])
    result = migrate(command_env(tmp_path, source, f"http://127.0.0.1:{_closed_port()}"), "--to", f"s3://{BUCKET}/x")
    assert result.returncode == 3
    reason = "not writable: the store failed the request or could not be reached"
    assert f"The target s3://{BUCKET}/x cannot be used: {reason}" in result.stderr
    assert "AWS_ENDPOINT_URL" in result.stderr  # where to look
    assert "failed:" not in result.stderr  # no image was tried
