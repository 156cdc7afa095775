"""The curl scripts in scripts/ against a running service."""

import os
import shutil
import subprocess

import pytest

from app.core.config import PROJECT_ROOT
from tests.conftest import parse_sse

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_demo_script_logs_in_creates_a_job_and_follows_it(live_server):
    with live_server() as server:
        result = subprocess.run(
            ["scripts/demo.sh", "a scripted sunset", "2"],
            check=False,
            cwd=PROJECT_ROOT,
            env={**os.environ, "MYFLIX_URL": server.base_url},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    events = list(parse_sse(iter(result.stdout.splitlines())))
    assert events[-1].event == "done"
    assert events[-1].data["status"] == "succeeded"
    assert len(events[-1].data["images"]) == 2
