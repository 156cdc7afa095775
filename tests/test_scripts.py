"""The curl scripts in scripts/ against a running service."""

import os
import shutil
import subprocess

import pytest

from app.core.config import PROJECT_ROOT
from tests.conftest import ALICE, create_job, login, parse_sse, read_stream

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]


def run_script(
    base_url: str, *command: str, token: str | None = None, pipe_to: str = "cat"
) -> subprocess.CompletedProcess:
    """scripts/<command>, its output piped into `pipe_to`; exit code: the script's."""
    env = {**os.environ, "MYFLIX_URL": base_url}
    if token is not None:
        env["TOKEN"] = token
    return subprocess.run(
        ["bash", "-c", f'scripts/{command[0]} "$@" | {pipe_to}; exit "${{PIPESTATUS[0]}}"', "bash", *command[1:]],
        check=False,
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_refused(result: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit code not 0, the reason on stderr, nothing on stdout, and no traceback."""
    assert result.returncode != 0, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr


def test_demo_script_logs_in_creates_a_job_and_follows_it(live_server):
    with live_server() as server:
        result = run_script(server.base_url, "demo.sh", "a scripted sunset", "2")
    assert result.returncode == 0, result.stderr
    events = list(parse_sse(iter(result.stdout.splitlines())))
    assert events[-1].event == "done"
    assert events[-1].data["status"] == "succeeded"
    assert len(events[-1].data["images"]) == 2


def test_the_scripts_print_the_services_reason_and_exit_non_zero(live_server):
    with live_server() as server, server.client() as client:
        url = server.base_url
        wrong = client.post("/api/auth/login", json={"email": ALICE[0], "password": "not-hers"}).json()["detail"]
        assert_refused(run_script(url, "login.sh", ALICE[0], "not-hers"), f"error: 401 Unauthorized: {wrong}")

        token = login(client)
        missing = client.get("/api/generate/job_0", headers={"Authorization": f"Bearer {token}"}).json()["detail"]
        assert_refused(run_script(url, "stream.sh", "job_0", token=token), f"error: 404 Not Found: {missing}")
        assert_refused(run_script(url, "generate.sh", "a cat", "2", token="not-a-token"), "error: 401 Unauthorized: ")
        assert_refused(run_script(url, "generate.sh", "a cat", "99", token=token), "error: 422 ", "num_images")
        assert_refused(run_script(url, "generate.sh", "a cat", "two", token=token), "NUM_IMAGES is a number")
        assert_refused(run_script(url, "demo.sh", "a cat", "99"), "error: 422 ", "num_images")

        job_id = create_job(client, token, prompt="resumed", num_images=1)
        last = read_stream(client, job_id, params={"access_token": token})[-1].id
        resumed = run_script(url, "stream.sh", job_id, last, token=token)
        assert (resumed.returncode, resumed.stdout, resumed.stderr) == (0, "", ""), "204: nothing more to send"
        first = run_script(url, "stream.sh", job_id, token=token)
        assert first.returncode == 0, first.stderr
        assert [e.id for e in parse_sse(iter(first.stdout.splitlines()))][-1] == last
        # A reader that goes away early (`| head`) is no error of the script's to report.
        closed = run_script(url, "stream.sh", job_id, token=token, pipe_to="true")
        assert "Traceback" not in closed.stderr

    gone = run_script(url, "login.sh")
    assert_refused(gone, f"error: no answer from {url}")
    assert gone.returncode == 3
