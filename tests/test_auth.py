"""Login, the OAuth2 form for Swagger, /me, and every way a token can be wrong."""

import base64
import json
import threading
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from jose import jwt

from app.core.security import create_access_token
from app.services import auth_service
from main import create_app
from tests.conftest import ALICE, BOB, TEST_JWT_SECRET, make_settings


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(make_settings(tmp_path))) as test_client:
        yield test_client


def _me(client, token):
    return client.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("user", [ALICE, BOB])
def test_demo_users_log_in_and_see_themselves(client, user):
    response = client.post("/api/auth/login", json={"email": user[0], "password": user[1]})
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 15 * 60
    assert body["refresh_expires_in"] == 30 * 86_400 and len(body["refresh_token"]) >= 40
    me = _me(client, body["access_token"])
    assert me.status_code == 200
    assert me.json()["email"] == user[0]


def test_email_is_case_and_space_insensitive(client):
    response = client.post("/api/auth/login", json={"email": "  Alice@MyFlix.dev ", "password": ALICE[1]})
    assert response.status_code == 200


def test_swagger_password_flow_takes_the_email_as_username(client):
    response = client.post("/api/auth/token", data={"username": ALICE[0], "password": ALICE[1]})
    assert response.status_code == 200
    assert _me(client, response.json()["access_token"]).json()["email"] == ALICE[0]
    scheme = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert scheme["OAuth2PasswordBearer"]["flows"]["password"]["tokenUrl"] == "/api/auth/token"


def test_wrong_password_and_unknown_user_get_the_same_401_after_the_same_work(client, monkeypatch):
    verified_hashes = []
    real_verify = auth_service.verify_password

    def spy(password, password_hash):
        verified_hashes.append(password_hash)
        return real_verify(password, password_hash)

    monkeypatch.setattr(auth_service, "verify_password", spy)
    wrong = client.post("/api/auth/login", json={"email": ALICE[0], "password": "nope"})
    unknown = client.post("/api/auth/login", json={"email": "mallory@myflix.dev", "password": "nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() == {"detail": "Incorrect email or password"}
    # Both paths pay for one bcrypt verification, so timing does not tell them apart.
    assert len(verified_hashes) == 2
    assert all(h.startswith("$2b$12$") for h in verified_hashes)


def test_password_hashing_runs_off_the_event_loop(client, monkeypatch):
    threads = []
    real_verify = auth_service.verify_password

    def spy(password, password_hash):
        threads.append(threading.current_thread())
        return real_verify(password, password_hash)

    monkeypatch.setattr(auth_service, "verify_password", spy)
    loop_thread = client.portal.call(threading.current_thread)
    assert client.post("/api/auth/login", json={"email": ALICE[0], "password": ALICE[1]}).status_code == 200
    assert threads and threads[0] is not loop_thread


@pytest.mark.parametrize("route", ["login", "token"])
def test_password_over_72_bytes_is_a_clear_422(client, route):
    password = "é" * 37  # 74 bytes in UTF-8, 37 characters
    if route == "login":
        response = client.post("/api/auth/login", json={"email": ALICE[0], "password": password})
    else:
        response = client.post("/api/auth/token", data={"username": ALICE[0], "password": password})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "password"] and "72 bytes" in error["msg"]
    assert "input" not in error  # a password is never echoed back


def test_malformed_login_body_is_422(client):
    assert client.post("/api/auth/login", json={"email": ALICE[0]}).status_code == 422
    assert (
        client.post("/api/auth/login", content=b"not json", headers={"content-type": "application/json"}).status_code
        == 422
    )


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _session_of(client) -> str:
    token = client.post("/api/auth/login", json={"email": ALICE[0], "password": ALICE[1]}).json()["access_token"]
    return jwt.get_unverified_claims(token)["sid"]


FORGERIES = (
    "expired",
    "tampered",
    "bad signature",
    "alg none",
    "foreign secret",
    "unknown subject",
    "another user's session",
    "unknown session",
    "no session",
    "no expiry",
    "HS512",
    "infinite expiry",
    "garbage",
)


def _forged_token(kind: str, session: str) -> str:
    secret = TEST_JWT_SECRET
    valid = create_access_token(ALICE[0], session, secret, timedelta(minutes=5))
    header, payload, signature = valid.split(".")
    claims = {"sub": ALICE[0], "sid": session}
    return {
        "expired": lambda: create_access_token(ALICE[0], session, secret, timedelta(seconds=-10)),
        "tampered": lambda: f"{header}.{_b64({'sub': BOB[0], 'sid': session, 'exp': 4102444800})}.{signature}",
        "bad signature": lambda: f"{header}.{payload}.{signature[:-4]}AAAA",
        "alg none": lambda: f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "foreign secret": lambda: create_access_token(ALICE[0], session, "someone-elses-secret", timedelta(minutes=5)),
        "unknown subject": lambda: create_access_token("mallory@myflix.dev", session, secret, timedelta(minutes=5)),
        "another user's session": lambda: create_access_token(BOB[0], session, secret, timedelta(minutes=5)),
        "unknown session": lambda: create_access_token(ALICE[0], "ses_nobody", secret, timedelta(minutes=5)),
        "no session": lambda: jwt.encode({"sub": ALICE[0], "exp": 4102444800}, secret, algorithm="HS256"),
        "no expiry": lambda: jwt.encode(claims, secret, algorithm="HS256"),
        "HS512": lambda: jwt.encode({**claims, "exp": 4102444800}, secret, algorithm="HS512"),
        "infinite expiry": lambda: f"{header}.{_b64({**claims, 'exp': 1e999})}.{signature}",
        "garbage": lambda: "not-a-jwt",
    }[kind]()


@pytest.mark.parametrize("kind", FORGERIES)
def test_bad_tokens_are_refused_with_401(client, kind):
    response = _me(client, _forged_token(kind, _session_of(client)))
    assert response.status_code == 401
    assert response.json() == {"detail": "Could not validate credentials"}
    assert response.headers["www-authenticate"] == "Bearer"


def test_the_forged_tokens_are_otherwise_valid(client):
    """The control for the test above: each forgery starts from a token that works."""
    session = _session_of(client)
    assert _me(client, create_access_token(ALICE[0], session, TEST_JWT_SECRET, timedelta(minutes=5))).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"email": ALICE[0], "password": "a\u0000b"},
        {"email": ALICE[0], "password": "lone \ud800 surrogate"},
        {"email": "\ud800", "password": "x"},
    ],
)
def test_odd_passwords_are_refused_without_a_500(client, body):
    raw = json.dumps(body).encode()  # keeps the escapes: lone surrogates stay JSON-valid
    response = client.post("/api/auth/login", content=raw, headers={"content-type": "application/json"})
    assert response.status_code in (401, 422)


def test_an_oversized_body_is_413(client):
    response = client.post("/api/auth/login", json={"email": ALICE[0], "password": "x" * 200_000})
    assert response.status_code == 413


def test_missing_token_is_401(client):
    response = client.get("/api/auth/me")
    assert response.status_code == 401
    assert response.json() == {"detail": "Not authenticated"}
