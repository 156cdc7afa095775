"""Where odd clients land: every refusal is a 4xx JSON with the security headers, never a 500,
and nothing a client sends can forge a log line."""

import base64
import json
import logging

from tests.conftest import create_job, login, read_stream

SECURITY_HEADERS = ("x-content-type-options", "referrer-policy", "x-frame-options", "content-security-policy")


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _is_json_error(response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert isinstance(response.json()["detail"], str | list)
    for header in SECURITY_HEADERS:
        assert header in response.headers, header


def _cursor(created_at: str, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode().rstrip("=")


def test_what_no_route_takes_is_answered_in_json_with_every_method_of_the_path(live_server):
    with live_server() as server, server.client() as client:
        _is_json_error(client.get("/no/such/path"), 404)
        not_allowed = client.request("OPTIONS", "/api/generate/")
        _is_json_error(not_allowed, 405)
        assert not_allowed.headers["allow"] == "GET, POST"
        assert client.request("PUT", "/api/generate/job_x").headers["allow"] == "DELETE, GET"
        # A route pattern's `$` matches before a trailing newline: such a path names nothing.
        _is_json_error(client.get("/api/generate/%0A", headers=_auth(login(client))), 404)


def test_a_body_over_the_limit_is_a_json_413_whether_declared_or_not(live_server):
    with live_server() as server, server.client() as client:
        declared = client.post("/api/auth/login", content=b"{" + b" " * 70_000 + b"}")
        _is_json_error(declared, 413)

        def chunks():
            yield b'{"email": "'
            yield b"a" * 70_000
            yield b'"}'

        streamed = client.post("/api/auth/login", content=chunks(), headers={"Content-Type": "application/json"})
        _is_json_error(streamed, 413)


def test_a_bug_is_a_json_500_with_the_security_headers(live_server, monkeypatch):
    from app.services.jobs.service import JobService

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(JobService, "list_jobs", broken)
    with live_server() as server, server.client() as client:
        answer = client.get("/api/generate/", headers=_auth(login(client)))
        _is_json_error(answer, 500)
        assert answer.json() == {"detail": "Internal server error"}


def test_an_image_signature_that_is_not_hex_is_refused_not_a_crash(live_server):
    with live_server() as server, server.client() as client:
        _is_json_error(client.get("/api/images/x.png", params={"signature": "é", "expires": "1"}), 403)


def test_nul_bytes_and_foreign_cursors_are_4xx_on_every_database(live_server, database_url):
    with live_server(DATABASE_URL=database_url) as server, server.client() as client:
        token = login(client)
        _is_json_error(client.post("/api/auth/login", json={"email": "alice\x00@myflix.dev", "password": "x" * 8}), 401)
        _is_json_error(client.get("/api/generate/job_%00", headers=_auth(token)), 404)
        _is_json_error(client.get("/api/generate/job_%00/stream", headers=_auth(token)), 404)
        for cursor in (
            _cursor("2026-01-01T00:00:00+00:00", "job_\x00"),
            _cursor("0001-01-01T00:00:00+14:00", "job_" + "0" * 24),
            _cursor("not a time", "job_" + "0" * 24),
            "%%%",
        ):
            _is_json_error(client.get("/api/generate/", params={"cursor": cursor}, headers=_auth(token)), 422)
        job_id = create_job(client, token, prompt="a long host", num_images=1)
        long_host = client.get(f"/api/generate/{job_id}", headers={**_auth(token), "Host": "h" * 600})
        assert long_host.status_code == 200


def test_a_path_cannot_write_a_log_line_of_its_own(live_server, caplog):
    caplog.set_level(logging.INFO)
    with live_server(LOG_FORMAT="text") as server, server.client() as client:
        client.get("/api/generate/x%0a2026-12-01 ERROR myflix.auth: admin login succeeded")
    from app.core.logging import TextFormatter

    lines = [TextFormatter().format(record) for record in caplog.records if record.name == "myflix.request"]
    assert lines and all("\n" not in line for line in lines)
    assert any("\\n2026-12-01 ERROR" in line for line in lines)


def test_resuming_a_finished_stream_after_its_last_event_is_204_so_eventsource_stops(live_server):
    with live_server() as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="over", num_images=1)
        events = read_stream(client, job_id, headers=_auth(token))
        assert events[-1].event == "done"
        after_the_end = client.get(
            f"/api/generate/{job_id}/stream", headers={**_auth(token), "Last-Event-ID": events[-1].id}
        )
        assert after_the_end.status_code == 204
        assert after_the_end.content == b""
        before_the_end = read_stream(client, job_id, headers={**_auth(token), "Last-Event-ID": events[-2].id})
        assert [e.event for e in before_the_end] == ["done"]
