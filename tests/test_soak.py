"""The bounded soak (bench/soak.py): a minute in CI, a few seconds on a developer's machine
(SOAK_SECONDS overrides); by hand, run it for ten minutes."""

import os
import subprocess
import sys

import pytest

from app.core.config import PROJECT_ROOT
from tests.conftest import IN_CI

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60" if IN_CI else "10"))
pytestmark = pytest.mark.slow


def test_a_soak_loses_no_event_answers_no_5xx_and_keeps_memory_flat():
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", str(SOAK_SECONDS)],
        check=False,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=SOAK_SECONDS + 120,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5xx answers                         0" in result.stdout
    assert "jobs with a lost or repeated event  0" in result.stdout
