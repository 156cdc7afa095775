"""Settings precedence, run.py's checks, CORS and the log lines."""

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta

import httpx
import pytest

from app.core.config import PLACEHOLDER_JWT_SECRET, PROJECT_ROOT, Settings
from app.core.logging import JsonFormatter
from app.core.security import create_access_token
from tests.conftest import ALICE, create_job, read_stream, wait_until


def test_environment_overrides_env_local_which_overrides_env(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("LOG_LEVEL=DEBUG\nMAX_IMAGES_PER_JOB=5\nPORT=9001\n")
    (tmp_path / ".env.local").write_text("MAX_IMAGES_PER_JOB=6\nPORT=9002\n")
    monkeypatch.setenv("PORT", "9003")
    monkeypatch.delenv("LOG_LEVEL", raising=False)
    monkeypatch.delenv("MAX_IMAGES_PER_JOB", raising=False)
    settings = Settings(_env_file=(tmp_path / ".env", tmp_path / ".env.local"))
    assert (settings.LOG_LEVEL, settings.MAX_IMAGES_PER_JOB, settings.PORT) == ("DEBUG", 6, 9003)


def test_an_empty_value_in_a_dotenv_file_or_the_environment_is_unset(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("IMAGE_PROVIDER=local\n")
    (tmp_path / ".env.local").write_text("JWT_SECRET_KEY=\nREPLICATE_API_TOKEN=\nREDIS_URL=\nIMAGE_PROVIDER=\n")
    for name in ("JWT_SECRET_KEY", "REPLICATE_API_TOKEN", "REDIS_URL", "IMAGE_PROVIDER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", "")
    settings = Settings(_env_file=(tmp_path / ".env", tmp_path / ".env.local"))
    assert settings.JWT_SECRET_KEY.get_secret_value() == PLACEHOLDER_JWT_SECRET
    assert (settings.REPLICATE_API_TOKEN, settings.REDIS_URL, settings.DATABASE_URL) == (None, None, None)
    assert settings.IMAGE_PROVIDER == "local"  # an empty value in .env.local leaves .env's


def test_provider_defaults_to_replicate_only_with_a_token(monkeypatch):
    monkeypatch.delenv("IMAGE_PROVIDER", raising=False)
    assert Settings(REPLICATE_API_TOKEN=None).image_provider == "local"
    assert Settings(REPLICATE_API_TOKEN="r8_x").image_provider == "replicate"
    assert Settings(REPLICATE_API_TOKEN="r8_x", IMAGE_PROVIDER="local").image_provider == "local"


def test_comma_separated_cors_origins_and_json_replicate_input():
    settings = Settings(CORS_ORIGINS="http://a.test, http://b.test", REPLICATE_INPUT='{"aspect_ratio": "16:9"}')
    assert settings.CORS_ORIGINS == ["http://a.test", "http://b.test"]
    assert settings.REPLICATE_INPUT == {"aspect_ratio": "16:9"}
    with pytest.raises(ValueError, match="JSON object"):
        Settings(REPLICATE_INPUT="[1, 2]")


def _run_py(env_overrides: dict[str, str]) -> subprocess.Popen:
    # Environment variables beat a developer's .env.local, so every setting that matters here
    # is given explicitly.
    env = {
        **os.environ,
        "ENVIRONMENT": "development",
        "IMAGE_PROVIDER": "local",
        "REPLICATE_API_TOKEN": "",
        "JWT_SECRET_KEY": PLACEHOLDER_JWT_SECRET,
        **env_overrides,
    }
    return subprocess.Popen(
        [sys.executable, "run.py"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [(PLACEHOLDER_JWT_SECRET, "placeholder"), ("", "placeholder"), ("short", "at least 32 bytes")],
)
@pytest.mark.slow
def test_run_py_refuses_a_weak_secret_in_production(secret, complaint):
    process = _run_py({"ENVIRONMENT": "production", "JWT_SECRET_KEY": secret})
    try:
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode != 0
    assert "JWT_SECRET_KEY" in err and complaint in err


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ({"PORT": "x"}, "PORT: Input should be a valid integer"),
        # A check of the settings together, whose error pydantic would print with every value.
        ({"AWS_ENDPOINT_URL": "ftp://store.internal"}, "AWS_ENDPOINT_URL must be an http:// or https:// URL"),
    ],
)
@pytest.mark.slow
def test_run_py_names_an_invalid_setting_without_printing_any_value(setting, complaint):
    process = _run_py({**setting, "AWS_SECRET_ACCESS_KEY": "s3-secret-never-printed"})
    try:
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 2
    assert err.startswith("Invalid settings:") and complaint in err
    assert "s3-secret-never-printed" not in err and "store.internal" not in err


@pytest.mark.slow
def test_run_py_refuses_an_unknown_provider():
    process = _run_py({"IMAGE_PROVIDER": "dalle"})
    try:
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode != 0
    assert "unknown IMAGE_PROVIDER 'dalle'" in err


@pytest.mark.slow
def test_run_py_says_what_is_active_and_serves(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = _run_py({"PORT": str(port), "DATA_DIR": str(tmp_path), "ENVIRONMENT": "development"})
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "API docs" in line:
                break
        banner = "".join(lines)
        assert "image provider: local" in banner
        assert "alice@myflix.dev" in banner and "bob@myflix.dev" in banner
        assert "token key:      made for this data directory" in banner
        assert f":{port}" in banner
        url = f"http://127.0.0.1:{port}/api/auth/login"
        wait_until(lambda: _answers(url), timeout=30, what="run.py to serve")
        login = httpx.post(url, json={"email": "bob@myflix.dev", "password": "bob-builder"})
        assert login.status_code == 200
        # The key is this data directory's own, readable by its owner only; the published
        # placeholder signs nothing here.
        kept = tmp_path / "jwt-secret"
        assert kept.stat().st_mode & 0o777 == 0o600 and len(kept.read_text()) >= 32
        forged = create_access_token("bob@myflix.dev", "ses_any", PLACEHOLDER_JWT_SECRET, timedelta(days=365))
        me = f"http://127.0.0.1:{port}/api/auth/me"
        assert httpx.get(me, headers={"Authorization": f"Bearer {forged}"}).status_code == 401
        own = login.json()["access_token"]
        assert httpx.get(me, headers={"Authorization": f"Bearer {own}"}).status_code == 200
    finally:
        process.terminate()
        try:
            process.communicate(timeout=30)
        finally:
            process.kill()


def _answers(url: str) -> bool:
    try:
        httpx.get(url)
        return True
    except httpx.TransportError:
        return False


def test_cors_allows_only_the_configured_origins(live_server):
    with live_server(CORS_ORIGINS="http://localhost:5173") as server, server.client() as client:
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        allowed = client.options("/api/generate/", headers={"Origin": "http://localhost:5173", **preflight})
        refused = client.options("/api/generate/", headers={"Origin": "http://evil.test", **preflight})
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "access-control-allow-origin" not in refused.headers


def test_one_line_per_request_and_state_change_with_no_token(live_server, caplog):
    caplog.set_level(logging.INFO)
    with live_server() as server, server.client() as client:
        signed_in = client.post("/api/auth/login", json={"email": ALICE[0], "password": ALICE[1]})
        token = signed_in.json()["access_token"]
        job_id = create_job(client, token, prompt="logged", num_images=2)
        read_stream(client, job_id, params={"access_token": token})
    records = caplog.records
    job_lines = [r for r in records if getattr(r, "job_id", None) == job_id]
    # accepted (both images queued), 2 × (running, succeeded), done
    expected = ["job accepted", *["image running"] * 2, *["image succeeded"] * 2, "job succeeded"]
    assert [r.getMessage() for r in job_lines] == expected
    requests = [r for r in records if r.name == "myflix.request"]
    assert {r.path for r in requests} >= {"/api/auth/login", "/api/generate/", f"/api/generate/{job_id}/stream"}
    everything = "\n".join(f"{r.getMessage()} {vars(r)}" for r in records)
    assert token not in everything
    assert "alice-wonderland" not in everything


def test_json_log_lines_carry_the_structured_fields():
    record = logging.LogRecord("myflix.jobs", logging.INFO, __file__, 1, "image %s", ("running",), None)
    record.job_id = "job_1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "image running"
    assert line["job_id"] == "job_1"
    assert line["level"] == "INFO"
