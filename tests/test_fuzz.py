"""Schema fuzzing: schemathesis drives every operation of the service's own /openapi.json
(the image endpoint and its query parameters too), as a signed-in demo user, on SQLite and on
PostgreSQL: no 5xx, every status documented, every answer as the schema says (body, content
type, headers), 405 for a method the path does not have, and `Allow` naming its methods.

The random inputs never hit a real job or a validly signed image link, so the answers for
those are checked the same way on a job made for the purpose."""

import base64
import json
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import HookContext
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.checks import allow_header_conformance, unsupported_method

from main import create_app
from tests.conftest import LiveServer, create_job, login, make_settings, postgres_url, read_stream

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    # The coverage phase sends each path the methods it does not have: 405 with `Allow`.
    unsupported_method,
    # An OPTIONS answer's `Allow` names exactly the methods the schema has for the path.
    allow_header_conformance,
]
EXAMPLES_PER_OPERATION = 25
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzzed_server(request, tmp_path_factory):
    database = {"DATABASE_URL": postgres_url()} if request.param == "postgresql" else {}
    settings_ = make_settings(
        tmp_path_factory.mktemp("fuzz") / "data",
        LOCAL_LATENCY_MS=0,
        MAX_ACTIVE_JOBS_PER_USER=1000,
        SSE_KEEPALIVE_SECONDS=0.5,
        **database,
    )
    with LiveServer(settings_) as server, server.client() as client:
        server.token = login(client)
        yield server


# The schema does not depend on settings, so it can be read from an app that never starts
# (schemathesis' lazy fixture loader does not work with this pytest).
schema = schemathesis.openapi.from_dict(create_app(make_settings(Path(tempfile.gettempdir()))).openapi())


# Random keys are refused before their signature is looked at (404): half the image cases get
# a key of the right shape, so that `expires` and `signature` are fuzzed too.
WELL_FORMED_IMAGE_KEY = "job_0123456789abcdef01234567-0.png"


@schema.hook
def flatmap_path_parameters(context: HookContext, path_parameters: dict) -> st.SearchStrategy:
    if context.operation is None or context.operation.path != "/api/images/{key}":
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, "key": WELL_FORMED_IMAGE_KEY}])


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
def test_every_operation_answers_as_documented(case, fuzzed_server):
    token = fuzzed_server.token
    if case.operation.path == "/api/auth/logout":
        # It ends the session it is called with: not the one the other cases share.
        with fuzzed_server.client() as client:
            token = login(client)
    case.call_and_validate(
        base_url=fuzzed_server.base_url,
        headers={"Authorization": f"Bearer {token}"},
        checks=CHECKS,
        timeout=10,
    )


def _validate(server: LiveServer, path: str, method: str, **parts) -> int:
    case = schema[path][method].Case(**parts)
    return case.call_and_validate(base_url=server.base_url, checks=CHECKS, timeout=10).status_code


def test_a_real_job_and_its_image_answer_as_documented(fuzzed_server):
    with fuzzed_server.client(fuzzed_server.token) as client:
        job_id = create_job(client, fuzzed_server.token, prompt="fuzzed", num_images=1)
        events = read_stream(client, job_id)
        job = client.get(f"/api/generate/{job_id}").json()
    auth = {"Authorization": f"Bearer {fuzzed_server.token}"}
    on_job = {"path_parameters": {"job_id": job_id}, "headers": auth}
    assert _validate(fuzzed_server, "/api/generate/{job_id}", "GET", **on_job) == 200
    assert _validate(fuzzed_server, "/api/generate/{job_id}/stream", "GET", **on_job) == 200
    resumed = {"path_parameters": {"job_id": job_id}, "headers": {**auth, "Last-Event-ID": events[-1].id}}
    assert _validate(fuzzed_server, "/api/generate/{job_id}/stream", "GET", **resumed) == 204
    assert _validate(fuzzed_server, "/api/generate/{job_id}/cancel", "POST", **on_job) == 409
    assert _validate(fuzzed_server, "/api/generate/", "GET", headers=auth, query={"limit": 1}) == 200

    link = urlsplit(job["images"][0]["url"])
    key = link.path.rsplit("/", 1)[1]
    query = {name: values[0] for name, values in parse_qs(link.query).items()}
    image = {"path_parameters": {"key": key}}
    assert _validate(fuzzed_server, "/api/images/{key}", "GET", **image, query=query) == 200
    etag = httpx.get(job["images"][0]["url"]).headers["etag"]
    cached = {**image, "query": query, "headers": {"If-None-Match": etag}}
    assert _validate(fuzzed_server, "/api/images/{key}", "GET", **cached) == 304
    expired = parse_qs(fuzzed_server.app.state.image_url_signer.query(key, 1))
    expired_query = {name: values[0] for name, values in expired.items()}
    assert _validate(fuzzed_server, "/api/images/{key}", "GET", **image, query=expired_query) == 403
    for signature in ("é", "0" * 64, ""):
        tampered = {"expires": query["expires"], "signature": signature}
        assert _validate(fuzzed_server, "/api/images/{key}", "GET", **image, query=tampered) in (403, 422)

    # Deleted: the job, its stream and its image are gone, as documented.
    assert _validate(fuzzed_server, "/api/generate/{job_id}", "DELETE", **on_job) == 204
    assert _validate(fuzzed_server, "/api/generate/{job_id}", "GET", **on_job) == 404
    assert _validate(fuzzed_server, "/api/generate/{job_id}/stream", "GET", **on_job) == 404
    assert _validate(fuzzed_server, "/api/images/{key}", "GET", **image, query=query) == 404
    assert _validate(fuzzed_server, "/api/generate/{job_id}", "DELETE", **on_job) == 404


def _cursor(created_at: str, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode().rstrip("=")


def test_the_inputs_that_once_gave_500_answer_as_documented(fuzzed_server):
    """Issue 14's list, on each database: the fuzzer reaches some only now and then."""
    auth = {"Authorization": f"Bearer {fuzzed_server.token}"}
    nul_login = {"email": "alice\x00@myflix.dev", "password": "alice-wonderland"}
    assert _validate(fuzzed_server, "/api/auth/login", "POST", body=nul_login, media_type="application/json") < 500
    for path, method in [
        ("/api/generate/{job_id}", "GET"),
        ("/api/generate/{job_id}", "DELETE"),
        ("/api/generate/{job_id}/cancel", "POST"),
        ("/api/generate/{job_id}/stream", "GET"),
    ]:
        assert _validate(fuzzed_server, path, method, path_parameters={"job_id": "job_\x00"}, headers=auth) < 500
    job_id = "job_0123456789abcdef01234567"
    for cursor in ("a\x00", _cursor("0001-01-01T00:00:00+00:00", job_id), _cursor("9999-12-31T23:59:59+00:00", job_id)):
        assert _validate(fuzzed_server, "/api/generate/", "GET", query={"cursor": cursor}, headers=auth) < 500
    long_host = {**auth, "Host": "h" * 600}
    body = {"prompt": "a long host", "num_images": 1}
    assert (
        _validate(fuzzed_server, "/api/generate/", "POST", body=body, media_type="application/json", headers=long_host)
        < 500
    )
