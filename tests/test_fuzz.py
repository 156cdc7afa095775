"""Schema fuzzing: schemathesis drives every operation of the service's own /openapi.json,
as a signed-in demo user: no 5xx, and every answer matches what the schema documents."""

import tempfile
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from main import create_app
from tests.conftest import LiveServer, make_settings

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 25
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    settings_ = make_settings(
        tmp_path_factory.mktemp("fuzz") / "data",
        LOCAL_LATENCY_MS=0,
        MAX_ACTIVE_JOBS_PER_USER=1000,
        SSE_KEEPALIVE_SECONDS=0.5,
    )
    with LiveServer(settings_) as server:
        login = httpx.post(
            f"{server.base_url}/api/auth/login", json={"email": "alice@myflix.dev", "password": "alice-wonderland"}
        )
        server.token = login.json()["access_token"]
        yield server


# The schema does not depend on settings, so it can be read from an app that never starts
# (schemathesis' lazy fixture loader does not work with this pytest).
schema = schemathesis.openapi.from_dict(create_app(make_settings(Path(tempfile.gettempdir()))).openapi())


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
def test_every_operation_answers_as_documented(case, fuzzed_server):
    case.call_and_validate(
        base_url=fuzzed_server.base_url,
        headers={"Authorization": f"Bearer {fuzzed_server.token}"},
        checks=CHECKS,
        timeout=10,
    )
