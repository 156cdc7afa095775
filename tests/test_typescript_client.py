"""A schema a typed client can trust: what /openapi.json says about operation names, limits,
content types and the fields the server leaves out; and, end to end, openapi-typescript's
types of a running service's schema compiling a small typed client and the events of real
streams under `tsc --strict` (tests/typescript/)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from app.core.security import BCRYPT_MAX_PASSWORD_BYTES
from main import create_app
from tests.conftest import IN_CI, LiveServer, login, make_settings, read_stream, wait_until
from tests.fake_replicate import Fault, Rule

TYPESCRIPT_DIR = Path(__file__).parent / "typescript"
NODE_BIN = TYPESCRIPT_DIR / "node_modules" / ".bin"
OPERATION_IDS = {
    ("post", "/api/auth/login"): "login",
    ("post", "/api/auth/token"): "issueToken",
    ("get", "/api/auth/me"): "getMe",
    ("post", "/api/auth/register"): "register",
    ("post", "/api/auth/refresh"): "refreshToken",
    ("post", "/api/auth/logout"): "logout",
    ("post", "/api/auth/password"): "changePassword",
    ("get", "/api/auth/settings"): "getAuthSettings",
    ("get", "/api/usage"): "getUsage",
    ("get", "/api/admin/users"): "listUsers",
    ("patch", "/api/admin/users/{email}"): "updateUser",
    ("post", "/api/generate/"): "createJob",
    ("get", "/api/generate/"): "listJobs",
    ("get", "/api/generate/{job_id}"): "getJob",
    ("post", "/api/generate/{job_id}/cancel"): "cancelJob",
    ("delete", "/api/generate/{job_id}"): "deleteJob",
    ("get", "/api/generate/{job_id}/stream"): "streamJob",
    ("get", "/api/images/{key}"): "getImage",
    ("get", "/healthz"): "getHealth",
    ("get", "/readyz"): "getReadiness",
    ("get", "/metrics"): "getMetrics",
}


def _schema(tmp_path: Path, **settings) -> dict:
    return create_app(make_settings(tmp_path / "data", **settings)).openapi()


def _operations(schema: dict) -> dict[tuple[str, str], dict]:
    return {
        (method, path): operation for path, methods in schema["paths"].items() for method, operation in methods.items()
    }


def test_operation_ids_are_method_names_and_no_schema_has_a_default_name(tmp_path):
    schema = _schema(tmp_path)
    assert {key: operation["operationId"] for key, operation in _operations(schema).items()} == OPERATION_IDS
    names = schema["components"]["schemas"]
    assert not [name for name in names if name.startswith("Body_")]
    token_form = schema["paths"]["/api/auth/token"]["post"]["requestBody"]["content"]
    assert token_form["application/x-www-form-urlencoded"]["schema"] == {"$ref": "#/components/schemas/TokenForm"}


def test_num_images_maximum_is_each_apps_setting(tmp_path):
    for maximum in (3, 8):
        schema = _schema(tmp_path, MAX_IMAGES_PER_JOB=maximum)
        num_images = schema["components"]["schemas"]["GenerateRequest"]["properties"]["num_images"]
        assert (num_images["minimum"], num_images["maximum"]) == (1, maximum)


def test_password_limit_is_in_the_schema_and_says_bytes(tmp_path):
    schemas = _schema(tmp_path)["components"]["schemas"]
    for model, field in (
        ("LoginRequest", "password"),
        ("TokenForm", "password"),
        ("RegisterRequest", "password"),
        ("PasswordChange", "new_password"),
    ):
        password = schemas[model]["properties"][field]
        assert password["maxLength"] == BCRYPT_MAX_PASSWORD_BYTES, model
        assert f"{BCRYPT_MAX_PASSWORD_BYTES} bytes in UTF-8" in password["description"], model


def test_fields_the_server_leaves_out_are_optional_and_never_null(tmp_path):
    schemas = _schema(tmp_path)["components"]["schemas"]
    progress = schemas["ProgressEvent"]
    assert set(progress["required"]) == {"job_id", "index", "status", "elapsed_ms", "completed", "total"}
    for name in ("url", "error", "queue_position", "attempt", "delay_ms"):
        field = progress["properties"][name]
        # No default either: openapi-typescript makes a field with a default required.
        assert "anyOf" not in field and "default" not in field and field["type"] != "null", name
    # What a snapshot's image and a token answer always carry is required.
    assert set(schemas["ImageResult"]["required"]) == set(schemas["ImageResult"]["properties"])
    assert {"token_type", "refresh_token", "refresh_expires_in"} <= set(schemas["TokenResponse"]["required"])


def test_image_endpoint_declares_binary_images_and_every_4xx_is_documented(tmp_path):
    operations = _operations(_schema(tmp_path))
    image = operations[("get", "/api/images/{key}")]["responses"]
    assert image["200"]["content"] == {
        media_type: {"schema": {"type": "string", "format": "binary"}}
        for media_type in ("image/jpeg", "image/png", "image/webp")
    }
    assert {"403", "404", "422"} <= set(image)
    expected = {
        "login": {"400", "401", "403", "413", "422", "429", "503"},
        "issueToken": {"400", "401", "403", "413", "422", "429", "503"},
        "register": {"400", "403", "409", "413", "422", "429", "503"},
        "refreshToken": {"400", "401", "413", "422", "503"},
        "logout": {"401", "503"},
        "changePassword": {"400", "401", "403", "413", "422", "429", "503"},
        "getMe": {"401", "503"},
        "getUsage": {"401", "503"},
        "listUsers": {"401", "403", "422", "503"},
        "updateUser": {"400", "401", "403", "404", "413", "422", "503"},
        "createJob": {"400", "401", "409", "413", "422", "429", "503"},
        "listJobs": {"401", "422", "503"},
        "getJob": {"401", "404", "422", "503"},
        "cancelJob": {"401", "404", "409", "422", "503"},
        "deleteJob": {"401", "404", "422", "503"},
        "streamJob": {"401", "404", "422", "429", "503"},
        "getReadiness": {"503"},
    }
    for operation in operations.values():
        statuses = {status for status in operation["responses"] if int(status) >= 400}
        assert statuses >= expected.get(operation["operationId"], set()), operation["operationId"]
        for status in statuses:
            assert operation["responses"][status]["description"], (operation["operationId"], status)


# End to end: openapi-typescript and tsc ------------------------------------------------------


def _node_tools() -> None:
    """openapi-typescript and tsc as pinned in tests/typescript/package-lock.json, installed
    with `npm ci` when missing or older than the lock file."""
    npm = shutil.which("npm")
    if npm is None:
        message = "npm is not installed (Node.js and npm are needed for the typed-client check)"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: this must not be skipped)")
        pytest.skip(message)
    installed = TYPESCRIPT_DIR / "node_modules" / ".package-lock.json"
    lock = TYPESCRIPT_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=TYPESCRIPT_DIR,
            check=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(
        command, check=False, cwd=cwd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"


def _capture_events(tmp_path: Path, fake_replicate) -> dict[str, list[dict]]:
    """Events of real streams: queued, running, retrying, succeeded, failed and canceled
    images, keepalives, and done of each job's outcome."""
    fake_replicate.add_rule(Rule(match="kept waiting", latency=0.5))
    fake_replicate.add_rule(Rule(match="refused", fail_error="The model refused this prompt"))
    fake_replicate.add_rule(Rule(match="never ends", never_finish=True))
    settings = make_settings(
        tmp_path / "data",
        IMAGE_PROVIDER="replicate",
        REPLICATE_API_TOKEN=fake_replicate.token,
        REPLICATE_BASE_URL=fake_replicate.base_url,
        SSE_KEEPALIVE_SECONDS=0.1,
    )
    events: dict[str, list[dict]] = {"progress": [], "done": [], "error": [], "keepalive": []}
    with LiveServer(settings) as server, server.client() as client:
        token = login(client)
        client.headers["Authorization"] = f"Bearer {token}"

        def run(prompt: str, num_images: int, cancel: bool = False) -> None:
            response = client.post("/api/generate/", json={"prompt": prompt, "num_images": num_images})
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            if cancel:
                wait_until(
                    lambda: client.get(f"/api/generate/{job_id}").json()["images"][0]["status"] == "running",
                    what="the image to run",
                )
                assert client.post(f"/api/generate/{job_id}/cancel").status_code == 202
            for event in read_stream(client, job_id):
                events[event.event].append(event.data)

        fake_replicate.push_create_fault(Fault(status=429, retry_after=0))
        run("A lighthouse, kept waiting", 2)
        run("A prompt that is refused", 1)
        run("A job that never ends", 1, cancel=True)
    return events


@pytest.mark.slow
def test_generated_types_compile_a_typed_client_and_real_events(tmp_path, fake_replicate):
    _node_tools()
    events = _capture_events(tmp_path, fake_replicate)
    statuses = {event["status"] for event in events["progress"]}
    assert statuses == {"queued", "running", "retrying", "succeeded", "failed", "canceled"}
    assert {event["status"] for event in events["done"]} == {"succeeded", "failed", "canceled"}
    assert events["keepalive"] and not events["error"]

    project = tmp_path / "typescript"
    project.mkdir()
    for name in ("client.ts", "tsconfig.json"):
        shutil.copy(TYPESCRIPT_DIR / name, project / name)
    with LiveServer(make_settings(tmp_path / "schema-data")) as server:
        _run([str(NODE_BIN / "openapi-typescript"), f"{server.base_url}/openapi.json", "-o", "schema.ts"], project)
    schemas = {"progress": "ProgressEvent", "done": "DoneEvent", "error": "ErrorEvent", "keepalive": "KeepaliveEvent"}
    lines = ['import type { components } from "./schema";', ""]
    for name, model in schemas.items():
        # JSON is a TypeScript expression; object literals get excess-property checks, so a
        # field the schema does not know fails too.
        lines.append(f'export const {name}: components["schemas"]["{model}"][] = {json.dumps(events[name], indent=2)};')
    # The check can fail: an event with a field the schema lacks is refused (the directive
    # is itself an error if the next line compiles).
    leaked = json.dumps([{**events["progress"][0], "image_key": "leaked"}])
    lines += ["// @ts-expect-error", f'export const refused: components["schemas"]["ProgressEvent"][] = {leaked};']
    (project / "captured.ts").write_text("\n".join(lines) + "\n")
    _run([str(NODE_BIN / "tsc"), "-p", "tsconfig.json", "--strict", "--noEmit"], project)
