"""The command-line client run as a user runs it, `python -m app.cli ...` in a subprocess,
against a real server: sign in, generate, list and delete jobs, failures, a dropped stream,
Ctrl-C."""

import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app import cli
from app.core.config import PROJECT_ROOT
from tests.conftest import ALICE, BOB, login, read_stream, wait_until, with_default_sigint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
APPLIED = re.compile(r"\[(\d+)\] image (\d+): (.*)")


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("MYFLIX_", "XDG_"))}
    env["MYFLIX_TOKEN_FILE"] = str(tmp_path / "config" / "token.json")
    return env


def run_cli(
    env: dict[str, str], *args: str, cwd: Path = PROJECT_ROOT, stdin: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        with_default_sigint([sys.executable, "-m", "app.cli", *args]),
        check=False,
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def sign_in(env: dict[str, str], base_url: str) -> subprocess.CompletedProcess:
    result = run_cli(env, "--base-url", base_url, "login", "--email", ALICE[0], "--password", ALICE[1])
    assert result.returncode == 0, result.stderr
    return result


def job_id_of(stdout: str) -> str:
    return re.match(r"job (job_\w+):", stdout).group(1)


def job_id_of_line(line: str) -> str:
    return re.search(r"\bjob_\w+", line).group(0)


class BackgroundCli:
    """The CLI in the background; a thread reads its output so a test can wait for a line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        # Ctrl-C stops it even when the tests run with SIGINT ignored.
        self.process = subprocess.Popen(
            with_default_sigint([sys.executable, "-m", "app.cli", *args]),
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"the CLI exited: {self.lines} {self.process.stderr.read()}"
            self.lines.append(line)
            if predicate(line):
                return line

    def finish(self, timeout: float = 60) -> tuple[int, list[str], str]:
        """Exit code, every stdout line, and stderr."""
        code = self.process.wait(timeout=timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code, self.lines, self.process.stderr.read()


@pytest.mark.slow
def test_login_generate_save_images_and_list_jobs(live_server, cli_env, tmp_path):
    with live_server(LOCAL_LATENCY_MS=50, LOCAL_LATENCY_JITTER_MS=0) as server:
        url = server.base_url
        assert "Signed in to" in sign_in(cli_env, url).stdout

        out = tmp_path / "images"
        result = run_cli(
            cli_env, "--base-url", url, "generate", "a lighthouse", "-n", "3", "--seed", "7", "--out", str(out)
        )
        assert result.returncode == 0, result.stderr
        job_id = job_id_of(result.stdout)
        saved = sorted(out.iterdir())
        assert [path.name for path in saved] == [f"{job_id}-{index}.png" for index in range(3)]
        assert all(path.read_bytes().startswith(PNG_MAGIC) for path in saved)
        assert re.search(r"TTFI: \d+\.\d\d s +batch time: \d+\.\d\d s", result.stdout)
        assert all(str(path) in result.stdout for path in saved)
        assert "\x1b" not in result.stdout, "control codes on a pipe"

        # MYFLIX_URL instead of --base-url, and the default ./myflix-<job_id>/ (here in tmp_path).
        elsewhere = {**cli_env, "MYFLIX_URL": url, "PYTHONPATH": str(PROJECT_ROOT)}
        second = run_cli(elsewhere, "generate", "a second job", "-n", "1", cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        second_id = job_id_of(second.stdout)
        assert (tmp_path / f"myflix-{second_id}" / f"{second_id}-0.png").read_bytes().startswith(PNG_MAGIC)

        history = run_cli(cli_env, "--base-url", url, "jobs").stdout.splitlines()
        assert [job_id_of_line(line) for line in history] == [second_id, job_id]
        assert re.search(r"succeeded +3 img +TTFI +\d+\.\d\d s +batch +\d+\.\d\d s +a lighthouse$", history[1])
        newest = run_cli(cli_env, "--base-url", url, "jobs", "--limit", "1").stdout.splitlines()
        assert [job_id_of_line(line) for line in newest] == [second_id]

    gone = run_cli(cli_env, "--base-url", url, "generate", "nobody home", "--out", str(out))
    assert gone.returncode == 3
    assert "cannot reach the service" in gone.stderr


def test_the_token_file_is_the_users_with_mode_0600(monkeypatch, tmp_path):
    monkeypatch.delenv("MYFLIX_TOKEN_FILE", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.token_path() == tmp_path / "home" / ".config" / "myflix" / "token.json"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "xdg" / "myflix" / "token.json"
    assert cli.token_path() == path
    assert not path.is_relative_to(PROJECT_ROOT)

    path.parent.mkdir(parents=True)
    path.write_text("{}")
    path.chmod(0o644)
    assert cli.save_session({"access_token": "secret"}) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "an existing file is made private too"


@pytest.mark.slow
def test_generate_jobs_and_delete_need_a_login(cli_env):
    for command in (["generate", "a cat"], ["jobs"], ["delete", "job_0123456789abcdef01234567"]):
        result = run_cli(cli_env, "--base-url", "http://127.0.0.1:9", *command)
        assert result.returncode == 2
        assert "not signed in: run `python -m app.cli login`" in result.stderr


@pytest.mark.slow
def test_delete_removes_a_running_job_and_an_unknown_one_exits_1(live_server, cli_env):
    with live_server(LOCAL_LATENCY_MS=10_000, SHUTDOWN_GRACE_SECONDS=0) as server:
        url = server.base_url
        sign_in(cli_env, url)
        with server.client() as alice, server.client() as bob:
            alice.headers["Authorization"] = f"Bearer {login(alice, ALICE)}"
            bob.headers["Authorization"] = f"Bearer {login(bob, BOB)}"
            job_id = alice.post("/api/generate/", json={"prompt": "short-lived", "num_images": 2}).json()["job_id"]
            bobs_job = bob.post("/api/generate/", json={"prompt": "not hers", "num_images": 1}).json()["job_id"]
            wait_until(
                lambda: alice.get(f"/api/generate/{job_id}").json()["images"][0]["status"] == "running",
                what="the job to run",
            )

            deleted = run_cli(cli_env, "--base-url", url, "delete", job_id)
            assert deleted.returncode == 0, deleted.stderr
            assert deleted.stdout == f"job {job_id} deleted\n"
            assert alice.get(f"/api/generate/{job_id}").status_code == 404
            assert alice.get(f"/api/generate/{job_id}/stream").status_code == 404
            assert run_cli(cli_env, "--base-url", url, "jobs").stdout == "no jobs yet\n"

            # Deleted already, never there, someone else's: the same refusal, and nothing deleted.
            for missing in (job_id, "job_0123456789abcdef01234567", "not-a-job-id", bobs_job):
                again = run_cli(cli_env, "--base-url", url, "delete", missing)
                assert again.returncode == 1, again.stderr
                assert again.stderr == (
                    f"error: job {missing} not found: it was deleted already, or it is not one of yours\n"
                )
                assert again.stdout == ""
            assert bob.get(f"/api/generate/{bobs_job}").status_code == 200

    usage = run_cli(cli_env, "--base-url", url, "delete", "")
    assert usage.returncode == 2
    assert "not a job id: ''" in usage.stderr
    gone = run_cli(cli_env, "--base-url", url, "delete", job_id)
    assert gone.returncode == 3
    assert "cannot reach the service" in gone.stderr


@pytest.mark.slow
def test_a_wrong_password_and_a_throttled_sign_in_exit_2(live_server, cli_env):
    with live_server(LOGIN_MAX_FAILURES=1) as server:
        signing_in = ("--base-url", server.base_url, "login", "--email", ALICE[0])
        wrong = run_cli(cli_env, *signing_in, "--password", "not-hers")
        assert wrong.returncode == 2, wrong.stderr
        assert "login failed: incorrect email or password" in wrong.stderr
        throttled = run_cli(cli_env, *signing_in, "--password", ALICE[1])
    assert throttled.returncode == 2, throttled.stderr
    assert re.search(r"login failed: 429 Too Many Requests: .+ \(Retry-After: \d+ s\)", throttled.stderr)
    assert "Traceback" not in wrong.stderr + throttled.stderr
    assert not Path(cli_env["MYFLIX_TOKEN_FILE"]).exists()


@pytest.mark.slow
def test_password_stdin_reads_one_line(live_server, cli_env):
    with live_server() as server:
        signing_in = ("--base-url", server.base_url, "login", "--email", ALICE[0], "--password-stdin")
        signed_in = run_cli(cli_env, *signing_in, stdin=f"{ALICE[1]}\nthe next line is not the password\n")
        assert signed_in.returncode == 0, signed_in.stderr
        assert "Signed in to" in signed_in.stdout
        assert "Password:" not in signed_in.stdout + signed_in.stderr, "no prompt when the password is piped"
        crlf = run_cli(cli_env, *signing_in, stdin=f"{ALICE[1]}\r\n")
        assert crlf.returncode == 0, crlf.stderr
        empty = run_cli(cli_env, *signing_in, stdin="")
        assert empty.returncode == 2
        assert "no password on stdin" in empty.stderr
        both = run_cli(cli_env, *signing_in, "--password", ALICE[1], stdin=ALICE[1])
        assert both.returncode == 2
        assert "not allowed with argument" in both.stderr


def test_an_expired_session_exits_2(cli_env):
    cli_env_path = Path(cli_env["MYFLIX_TOKEN_FILE"])
    cli_env_path.parent.mkdir(parents=True)
    expired = {"base_url": "http://127.0.0.1:9", "access_token": "t", "expires_at": "2026-01-01T00:00:00+00:00"}
    cli_env_path.write_text(json.dumps(expired))
    result = run_cli(cli_env, "--base-url", "http://127.0.0.1:9", "jobs")
    assert result.returncode == 2
    assert "the session has expired: run `python -m app.cli login`" in result.stderr


@pytest.mark.slow
def test_a_job_whose_images_all_fail_exits_1_with_the_reason(live_server, fake_replicate, cli_env, tmp_path):
    with live_server(
        IMAGE_PROVIDER="replicate", REPLICATE_API_TOKEN="r8_wrong", REPLICATE_BASE_URL=fake_replicate.base_url
    ) as server:
        sign_in(cli_env, server.base_url)
        result = run_cli(cli_env, "--base-url", server.base_url, "generate", "a cat", "-n", "2", "--out", str(tmp_path))
        with server.client() as client:
            auth = {"Authorization": f"Bearer {login(client)}"}
            job = client.get(f"/api/generate/{job_id_of(result.stdout)}", headers=auth).json()
    assert result.returncode == 1
    assert re.search(r"job job_\w+ failed: 0 of 2 images saved", result.stdout)
    failures = [line for line in result.stderr.splitlines() if line.startswith("image ")]
    # Each image's reason, as the service gives it (a refused token is the operator's to fix).
    assert failures == [f"image {image['index']} failed: {image['error']}" for image in job["images"]]
    assert all(image["error"] for image in job["images"])


@pytest.mark.slow
def test_a_dropped_stream_is_resumed_and_no_event_is_applied_twice(service_process, cli_env, tmp_path):
    service = service_process(
        IMAGE_PROVIDER="local",
        LOCAL_LATENCY_MS=1500,
        LOCAL_LATENCY_JITTER_MS=0,
        GENERATION_MAX_WORKERS=1,
        SHUTDOWN_GRACE_SECONDS=0,
    )
    sign_in(cli_env, service.base_url)
    out = tmp_path / "images"
    cli_run = BackgroundCli(
        cli_env, "--base-url", service.base_url, "generate", "survives", "-n", "3", "--out", str(out)
    )
    cli_run.wait_for_line(lambda line: ": done → " in line)
    service.stop(signal.SIGKILL)
    service.start()

    code, lines, stderr = cli_run.finish()
    assert code == 0, stderr
    assert any(line.startswith("connection lost") for line in lines), "the stream was not dropped"
    job_id = job_id_of(lines[0])
    applied = [match for match in map(APPLIED.match, lines) if match]
    with service.client() as client:
        token = login(client)
        stream = read_stream(client, job_id, headers={"Authorization": f"Bearer {token}"})
    # Every progress event of the job, each once, in order: none lost, none applied twice.
    assert [int(match[1]) for match in applied] == [int(e.id) for e in stream if e.event == "progress"]
    assert sorted(int(match[2]) for match in applied if match[3].startswith("done")) == [0, 1, 2]
    saved = sorted(out.iterdir())
    assert [path.name for path in saved] == [f"{job_id}-{index}.png" for index in range(3)]
    assert all(path.read_bytes().startswith(PNG_MAGIC) for path in saved)


@pytest.mark.slow
def test_ctrl_c_prints_the_job_id_and_exits_130(live_server, cli_env, tmp_path):
    with live_server(LOCAL_LATENCY_MS=10_000, SHUTDOWN_GRACE_SECONDS=0) as server:
        sign_in(cli_env, server.base_url)
        cli_run = BackgroundCli(
            cli_env, "--base-url", server.base_url, "generate", "slow", "-n", "1", "--out", str(tmp_path)
        )
        job_id = job_id_of(cli_run.wait_for_line(lambda line: line.startswith("job ")))
        cli_run.wait_for_line(lambda line: line.endswith(": running"))
        cli_run.process.send_signal(signal.SIGINT)
        code, _, stderr = cli_run.finish()
    assert code == 130
    assert job_id in stderr


# Accounts and sessions --------------------------------------------------------------------

NEW_USER = ("carol@example.org", "carol-password-1", "Carol Example")
# The daily quota of images per user (app/core/config.py).
QUOTA_SETTING = "DAILY_IMAGE_QUOTA"


def saved_session(env: dict[str, str]) -> dict[str, str]:
    return json.loads(Path(env["MYFLIX_TOKEN_FILE"]).read_text())


def register(env: dict[str, str], base_url: str, user=NEW_USER, *extra: str) -> subprocess.CompletedProcess:
    email, password, full_name = user
    return run_cli(
        env, "--base-url", base_url, "register", "--email", email, "--full-name", full_name, "--password-stdin",
        *extra, stdin=f"{password}\n",
    )  # fmt: skip


def refreshed(server, refresh_token: str):
    with server.client() as client:
        return client.post("/api/auth/refresh", json={"refresh_token": refresh_token})


@pytest.mark.slow
def test_register_signs_in_and_is_refused_when_taken_weak_or_turned_off(live_server, cli_env):
    with live_server(SIGNUP_ENABLED=True) as server:
        url = server.base_url
        created = register(cli_env, url)
        assert created.returncode == 0, created.stderr
        email, password, full_name = NEW_USER
        assert f"Registered and signed in to {url} as {full_name} <{email}>" in created.stdout
        assert "Password:" not in created.stdout + created.stderr
        session = saved_session(cli_env)
        assert session["email"] == email and session["refresh_token"] and session["access_token"]
        listed = run_cli(cli_env, "--base-url", url, "jobs")
        assert (listed.returncode, listed.stdout) == (0, "no jobs yet\n"), listed.stderr
        # The account is a real one: its password signs in.
        signed_in = run_cli(cli_env, "--base-url", url, "login", "--email", email, "--password", password)
        assert signed_in.returncode == 0, signed_in.stderr

        taken = register(cli_env, url, (email, "another-password", "Someone Else"))
        assert taken.returncode == 1, taken.stderr
        assert re.search(r"^error: sign-up refused: .+; sign in with `login`$", taken.stderr, re.MULTILINE)
        for weak in ("short", "Dave@Example.org"):  # too short; the email itself
            refused = register(cli_env, url, ("dave@example.org", weak, "Dave"))
            assert refused.returncode == 2, refused.stderr
            assert refused.stderr.startswith("error: 422 Unprocessable"), refused.stderr
        assert "Traceback" not in taken.stderr + refused.stderr

    Path(cli_env["MYFLIX_TOKEN_FILE"]).unlink()
    with live_server() as server:  # sign-up is off by default
        with server.client() as client:
            assert client.get("/api/auth/settings").json() == {"signup_enabled": False}
        off = register(cli_env, server.base_url, ("erin@example.org", "erin-password-1", "Erin"))
    assert off.returncode == 1, off.stderr
    assert re.fullmatch(r"error: sign-up refused: .+\n", off.stderr), off.stderr
    assert not Path(cli_env["MYFLIX_TOKEN_FILE"]).exists()


@pytest.mark.slow
def test_logout_ends_the_session_at_the_service_and_forgets_it(live_server, cli_env):
    token_file = Path(cli_env["MYFLIX_TOKEN_FILE"])
    with live_server() as server:
        url = server.base_url
        sign_in(cli_env, url)
        session = saved_session(cli_env)
        out = run_cli(cli_env, "--base-url", url, "logout")
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"Signed out of {url}; {token_file} deleted\n"
        assert not token_file.exists()
        # The session is over: its refresh token at once, its access token within 30 s.
        assert refreshed(server, session["refresh_token"]).status_code == 401
        with server.client(session["access_token"]) as old:
            wait_until(lambda: old.get("/api/auth/me").status_code == 401, timeout=35, what="the token to end")
        after = run_cli(cli_env, "--base-url", url, "jobs")
        assert after.returncode == 2 and "not signed in" in after.stderr
        again = run_cli(cli_env, "--base-url", url, "logout")
        assert (again.returncode, again.stdout) == (0, "not signed in: nothing to sign out of\n")

        # Ended elsewhere (here: the service refuses both tokens): the file goes all the same.
        sign_in(cli_env, url)
        session = saved_session(cli_env)
        with server.client(session["access_token"]) as client:
            assert client.post("/api/auth/logout").status_code == 204
        token_file.write_text(json.dumps({**session, "access_token": "not-a-token"}))
        ended = run_cli(cli_env, "--base-url", url, "logout")
        assert ended.returncode == 0, ended.stderr
        assert ended.stdout == f"the service had ended this session already; {token_file} deleted\n"
        assert not token_file.exists()

        sign_in(cli_env, url)
        session = saved_session(cli_env)
        elsewhere = run_cli(cli_env, "--base-url", "http://127.0.0.1:9", "logout")
        assert elsewhere.returncode == 2
        assert f"run `python -m app.cli --base-url {url} logout`" in elsewhere.stderr
        assert token_file.exists(), "another service's session is not touched"

    # The service is gone: the session is forgotten here, and the CLI says it lives on there.
    unreachable = run_cli(cli_env, "--base-url", url, "logout")
    assert unreachable.returncode == 3, unreachable.stderr
    assert "cannot reach the service" in unreachable.stderr
    assert f"{token_file} deleted, but the session stays valid at the service until" in unreachable.stderr
    assert not token_file.exists()


@pytest.mark.slow
def test_a_refused_access_token_is_renewed_once_and_the_rotated_pair_saved(live_server, cli_env, tmp_path):
    token_file = Path(cli_env["MYFLIX_TOKEN_FILE"])
    with live_server() as server:
        url = server.base_url
        sign_in(cli_env, url)
        first = saved_session(cli_env)
        token_file.write_text(json.dumps({**first, "access_token": "garbage"}))

        listed = run_cli(cli_env, "--base-url", url, "jobs")
        assert (listed.returncode, listed.stdout) == (0, "no jobs yet\n"), listed.stderr
        second = saved_session(cli_env)
        assert second["access_token"] not in ("garbage", first["access_token"])
        assert second["refresh_token"] != first["refresh_token"], "the refresh token rotates"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        with server.client(second["access_token"]) as client:
            assert client.get("/api/auth/me").json()["email"] == ALICE[0]

        # An access token past its time, as the file says: a job is created and followed all
        # the same (the stream too is opened with the renewed token).
        expired = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        token_file.write_text(json.dumps({**second, "access_token": "garbage", "expires_at": expired}))
        made = run_cli(cli_env, "--base-url", url, "generate", "renewed", "-n", "1", "--out", str(tmp_path / "out"))
        assert made.returncode == 0, made.stderr
        third = saved_session(cli_env)
        assert third["refresh_token"] != second["refresh_token"]

        # CLIs renewing at once share one refresh: the service would end the whole session
        # if they sent the same refresh token twice.
        token_file.write_text(json.dumps({**third, "access_token": "garbage"}))
        renewing = [BackgroundCli(cli_env, "--base-url", url, "jobs") for _ in range(3)]
        for background in renewing:
            code, lines, stderr = background.finish()
            assert code == 0, stderr
            assert len(lines) == 1 and "renewed" in lines[0]
        fourth = saved_session(cli_env)
        assert refreshed(server, fourth["refresh_token"]).status_code == 200, "the session is still alive"

        # A refresh token sent twice ends the session: the CLI says so and asks for a login.
        token_file.write_text(json.dumps({**third, "access_token": "garbage"}))
        reused = run_cli(cli_env, "--base-url", url, "jobs")
    assert reused.returncode == 2, reused.stderr
    assert reused.stderr == "error: the session has ended or expired: run `python -m app.cli login`\n"


def test_a_session_past_its_refresh_token_exits_2(cli_env):
    token_file = Path(cli_env["MYFLIX_TOKEN_FILE"])
    token_file.parent.mkdir(parents=True)
    now = datetime.now(UTC)
    session = {
        "base_url": "http://127.0.0.1:9",
        "email": ALICE[0],
        "access_token": "t",
        "expires_at": (now - timedelta(minutes=20)).isoformat(),
        "refresh_token": "r",
        "refresh_expires_at": (now - timedelta(minutes=1)).isoformat(),
    }
    token_file.write_text(json.dumps(session))
    result = run_cli(cli_env, "--base-url", "http://127.0.0.1:9", "usage")
    assert result.returncode == 2
    assert "the session has expired: run `python -m app.cli login`" in result.stderr
    # Nothing to end at the service: logout only forgets it.
    out = run_cli(cli_env, "--base-url", "http://127.0.0.1:9", "logout")
    assert (out.returncode, out.stdout) == (0, f"the session had expired already; {token_file} deleted\n")
    assert not token_file.exists()


@pytest.mark.slow
def test_usage_counts_the_days_images_and_a_job_over_the_quota_is_refused(live_server, cli_env, tmp_path):
    with live_server(**{QUOTA_SETTING: 3}) as server:
        url = server.base_url
        sign_in(cli_env, url)
        before = run_cli(cli_env, "--base-url", url, "usage")
        assert before.returncode == 0, before.stderr
        lines = before.stdout.splitlines()
        assert lines[:2] == ["images today: 0", "quota: 3 a day, 3 left"]
        assert re.fullmatch(r"resets at: \d{4}-\d\d-\d\d \d\d:\d\d .*", lines[2]), lines
        with server.client(saved_session(cli_env)["access_token"]) as client:
            usage = client.get("/api/usage").json()
        resets_at = datetime.fromisoformat(usage["resets_at"])
        assert lines[2].startswith(f"resets at: {resets_at.astimezone():%Y-%m-%d %H:%M}")

        made = run_cli(cli_env, "--base-url", url, "generate", "two", "-n", "2", "--out", str(tmp_path))
        assert made.returncode == 0, made.stderr
        after = run_cli(cli_env, "--base-url", url, "usage").stdout.splitlines()
        assert after[:2] == ["images today: 2", "quota: 3 a day, 1 left"]

        over = run_cli(cli_env, "--base-url", url, "generate", "too many", "-n", "2", "--out", str(tmp_path))
        assert over.returncode == 1
        assert re.fullmatch(r"error: 429 Too Many Requests: .+ \(Retry-After: \d+ s\)\n", over.stderr), over.stderr
        assert over.stdout == ""
        assert run_cli(cli_env, "--base-url", url, "usage").stdout.splitlines()[:2] == after[:2]

    with live_server() as server:  # no quota by default
        sign_in(cli_env, server.base_url)
        unlimited = run_cli(cli_env, "--base-url", server.base_url, "usage").stdout.splitlines()
    assert unlimited[1] == "quota: unlimited"
