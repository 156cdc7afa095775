"""`python -m app.users`: an operator creates, disables, enables accounts and resets
passwords on the service's database, and the service sees it."""

import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from app.core.config import PROJECT_ROOT
from main import create_app
from tests.conftest import ALICE, TEST_JWT_SECRET, make_settings

pytestmark = pytest.mark.slow  # every test starts the command as a process


@pytest.fixture
def users(tmp_path):
    env = {
        **os.environ,
        "DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": "",
        "JWT_SECRET_KEY": TEST_JWT_SECRET,
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "text",
    }

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "app.users", *args],
            check=False,
            cwd=PROJECT_ROOT,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


@pytest.fixture
def service(tmp_path):
    with TestClient(create_app(make_settings(tmp_path / "data"))) as client:
        yield client


def _login(service, email: str, password: str) -> int:
    return service.post("/api/auth/login", json={"email": email, "password": password}).status_code


def test_an_operator_creates_an_admin_who_can_sign_in(users, service):
    made = users(
        "create", " Ops@Example.com ", "--admin", "--full-name", "Ops", "--password-stdin", stdin="ops-password-1\n"
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "created ops@example.com (admin)"
    # Logged with who did it.
    assert "admin action: create user" in made.stderr and "actor=cli:" in made.stderr
    token = service.post("/api/auth/login", json={"email": "ops@example.com", "password": "ops-password-1"}).json()
    me = service.get("/api/auth/me", headers={"Authorization": f"Bearer {token['access_token']}"}).json()
    assert me == {"email": "ops@example.com", "full_name": "Ops", "role": "admin"}


def test_refusals_exit_1_with_a_reason(users, service):
    assert users("create", "ops@example.com", "--password-stdin", stdin="ops-password-1\n").returncode == 0
    taken = users("create", "OPS@example.com", "--password-stdin", stdin="another-one-1\n")
    assert taken.returncode == 1 and "exists already" in taken.stderr
    weak = users("create", "new@example.com", "--password-stdin", stdin="short\n")
    assert weak.returncode == 1 and "8 to 72 bytes" in weak.stderr
    nobody = users("disable", "nobody@example.com")
    assert nobody.returncode == 1 and "No user nobody@example.com" in nobody.stderr
    empty = users("reset-password", ALICE[0], "--password-stdin", stdin="")
    assert empty.returncode == 2 and "no password on standard input" in empty.stderr
    bad = users("frobnicate", ALICE[0])
    assert bad.returncode == 2


def test_disable_enable_and_reset_password(users, service):
    assert _login(service, *ALICE) == 200
    disabled = users("disable", ALICE[0])
    assert disabled.returncode == 0 and "disabled" in disabled.stdout
    assert _login(service, *ALICE) == 403
    assert users("enable", ALICE[0]).returncode == 0
    assert _login(service, *ALICE) == 200
    reset = users("reset-password", ALICE[0], "--password-stdin", stdin="a-brand-new-password\n")
    assert reset.returncode == 0, reset.stderr
    assert _login(service, *ALICE) == 401
    assert _login(service, ALICE[0], "a-brand-new-password") == 200


def test_the_password_is_asked_twice_without_stdin(users):
    # No terminal here: getpass reads the two answers from standard input, and they must agree.
    differ = users("create", "ops@example.com", stdin="first-password\nsecond-password\n")
    assert differ.returncode == 2 and "the two passwords differ" in differ.stderr
    same = users("create", "ops@example.com", stdin="same-password-1\nsame-password-1\n")
    assert same.returncode == 0, same.stderr
