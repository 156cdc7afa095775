"""The suite passes when it is started in the background with SIGINT ignored, as a shell
starts `pytest &`: children inherit the ignored SIGINT, so those the tests stop with Ctrl-C
(the CLI) must be started with SIGINT at its default (tests/conftest.py's
`with_default_sigint`)."""

import subprocess
import sys

import pytest

from app.core.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

# The tests that send SIGINT to a child or start children, and one with a server in a thread.
SIGINT_SENSITIVE = [
    "tests/test_cli.py::test_ctrl_c_prints_the_job_id_and_exits_130",
    "tests/test_cli.py::test_an_expired_session_exits_2",
    "tests/test_observability.py::test_health_and_readiness",
]


def _with_sigint_ignored(command: list[str]) -> list[str]:
    # As `(trap '' INT; command) &` in a shell: ignored before exec, so inherited.
    return ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]


def test_the_runner_really_ignores_sigint():
    result = subprocess.run(
        _with_sigint_ignored([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT).name)"]),
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.strip() == "SIG_IGN"


def test_sigint_sensitive_tests_pass_with_sigint_ignored():
    result = subprocess.run(
        _with_sigint_ignored([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SIGINT_SENSITIVE]),
        check=False,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(SIGINT_SENSITIVE)} passed" in result.stdout
