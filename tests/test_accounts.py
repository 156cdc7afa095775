"""Accounts: sign-up, refresh tokens that rotate and catch their reuse, logout, password
changes, disabled users, the admin endpoints, and the demo users' seeding."""

import logging

import pytest
from fastapi.testclient import TestClient

from main import create_app
from tests.conftest import ALICE, BOB, make_settings

CAROL = ("carol@example.com", "carol-in-wonderland")


@pytest.fixture
def make_client(tmp_path):
    clients = []

    def make(**settings) -> TestClient:
        client = TestClient(create_app(make_settings(tmp_path / "data", **settings)))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client(SIGNUP_ENABLED=True)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _login(client, user=ALICE) -> dict:
    response = client.post("/api/auth/login", json={"email": user[0], "password": user[1]})
    assert response.status_code == 200, response.text
    return response.json()


def _register(client, email=CAROL[0], password=CAROL[1], full_name="Carol"):
    return client.post("/api/auth/register", json={"email": email, "password": password, "full_name": full_name})


def _me(client, tokens: dict):
    return client.get("/api/auth/me", headers=_bearer(tokens["access_token"]))


# Sign-up -----------------------------------------------------------------------------------


def test_sign_up_is_off_by_default(make_client):
    client = make_client()
    assert client.get("/api/auth/settings").json() == {"signup_enabled": False}
    response = _register(client)
    assert response.status_code == 403
    assert "Sign-up is disabled" in response.json()["detail"]
    assert client.post("/api/auth/login", json={"email": CAROL[0], "password": CAROL[1]}).status_code == 401


def test_sign_up_creates_an_account_and_a_session(client):
    assert client.get("/api/auth/settings").json() == {"signup_enabled": True}
    response = _register(client, email="  Carol@Example.COM ")
    assert response.status_code == 201, response.text
    tokens = response.json()
    assert set(tokens) == {"access_token", "token_type", "expires_in", "refresh_token", "refresh_expires_in"}
    assert _me(client, tokens).json() == {"email": CAROL[0], "full_name": "Carol", "role": "user"}
    # The normalised email signs in, in any case.
    assert client.post("/api/auth/login", json={"email": "CAROL@example.com", "password": CAROL[1]}).status_code == 200


def test_an_email_is_taken_once_whatever_its_case(client):
    assert _register(client).status_code == 201
    again = _register(client, email="CAROL@EXAMPLE.COM", password="another-password")
    assert again.status_code == 409
    assert again.json() == {"detail": "An account with this email exists already."}
    taken = _register(client, email=ALICE[0], password="not-alices-password")
    assert taken.status_code == 409


@pytest.mark.parametrize(
    ("email", "password", "field", "message"),
    [
        (CAROL[0], "short", "password", "8 to 72 bytes"),
        (CAROL[0], "é" * 37, "password", "72"),  # 37 characters, 74 bytes
        (CAROL[0], "Carol@Example.com", "password", "must not be the email"),
        ("not-an-email", "long-enough-password", "email", "not a valid address"),
        ("carol@", "long-enough-password", "email", "not a valid address"),
    ],
)
def test_weak_or_malformed_registrations_are_a_clear_422(client, email, password, field, message):
    response = _register(client, email=email, password=password)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field] and message in error["msg"]
    assert "input" not in error


def test_a_password_of_exactly_8_and_72_bytes_is_taken(client):
    assert _register(client, email="eight@example.com", password="12345678").status_code == 201
    assert _register(client, email="many@example.com", password="é" * 36).status_code == 201  # 72 bytes


# Refresh tokens ----------------------------------------------------------------------------


def test_a_refresh_token_rotates(client):
    first = _login(client)
    second = client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert second.status_code == 200
    rotated = second.json()
    assert rotated["refresh_token"] != first["refresh_token"]
    assert rotated["access_token"] != first["access_token"]
    assert _me(client, rotated).status_code == 200
    # The new one rotates in turn.
    third = client.post("/api/auth/refresh", json={"refresh_token": rotated["refresh_token"]})
    assert third.status_code == 200


def test_reusing_a_rotated_refresh_token_ends_the_whole_session(client, caplog):
    stolen = _login(client)
    legitimate = client.post("/api/auth/refresh", json={"refresh_token": stolen["refresh_token"]}).json()
    with caplog.at_level(logging.WARNING, logger="myflix.auth"):
        reuse = client.post("/api/auth/refresh", json={"refresh_token": stolen["refresh_token"]})
    assert reuse.status_code == 401
    assert "used already" in reuse.json()["detail"]
    assert any("used twice" in record.getMessage() for record in caplog.records)
    # Both holders are out: the session's newest tokens no longer work either.
    assert client.post("/api/auth/refresh", json={"refresh_token": legitimate["refresh_token"]}).status_code == 401
    assert _me(client, legitimate).status_code == 401
    # Another session of the same user is untouched.
    assert _me(client, _login(client)).status_code == 200


def test_unknown_refresh_tokens_are_refused(client):
    for token in ("not-a-token", "x" * 200):
        response = client.post("/api/auth/refresh", json={"refresh_token": token})
        assert response.status_code == 401
        assert response.json() == {"detail": "The refresh token is invalid or expired; sign in again."}
    assert client.post("/api/auth/refresh", json={"refresh_token": "x" * 201}).status_code == 422
    assert client.post("/api/auth/refresh", json={}).status_code == 422


def test_an_expired_refresh_token_is_refused(make_client):
    client = make_client(REFRESH_TOKEN_DAYS=1e-9)  # expires as soon as it is made
    tokens = _login(client)
    assert client.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code == 401


# Logout and passwords ----------------------------------------------------------------------


def test_logout_ends_the_session_and_only_it(client):
    tokens, other = _login(client), _login(client)
    assert client.post("/api/auth/logout", headers=_bearer(tokens["access_token"])).status_code == 204
    assert _me(client, tokens).status_code == 401  # at once on the replica it happened on
    assert client.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code == 401
    assert client.post("/api/auth/logout", headers=_bearer(tokens["access_token"])).status_code == 401
    assert _me(client, other).status_code == 200
    assert client.post("/api/auth/logout").status_code == 401


def test_changing_the_password_ends_the_other_sessions(client):
    here, elsewhere = _login(client), _login(client)
    response = client.post(
        "/api/auth/password",
        headers=_bearer(here["access_token"]),
        json={"current_password": ALICE[1], "new_password": "alice-through-the-looking-glass"},
    )
    assert response.status_code == 204, response.text
    assert _me(client, here).status_code == 200
    assert _me(client, elsewhere).status_code == 401
    assert client.post("/api/auth/refresh", json={"refresh_token": elsewhere["refresh_token"]}).status_code == 401
    assert client.post("/api/auth/login", json={"email": ALICE[0], "password": ALICE[1]}).status_code == 401
    assert _login(client, (ALICE[0], "alice-through-the-looking-glass"))


def test_a_wrong_current_password_or_a_weak_new_one_changes_nothing(client):
    tokens = _login(client)
    wrong = client.post(
        "/api/auth/password",
        headers=_bearer(tokens["access_token"]),
        json={"current_password": "not-it", "new_password": "a-fine-new-password"},
    )
    assert wrong.status_code == 403 and wrong.json() == {"detail": "The current password is incorrect."}
    weak = client.post(
        "/api/auth/password",
        headers=_bearer(tokens["access_token"]),
        json={"current_password": ALICE[1], "new_password": "short"},
    )
    assert weak.status_code == 422 and weak.json()["detail"][0]["loc"] == ["body", "new_password"]
    assert _login(client)  # the old password still works


# Admins ------------------------------------------------------------------------------------


async def _make_admin(client, email: str) -> None:
    await client.app.state.users_service.update_user("test", email, role="admin")


def _admin_tokens(client) -> dict:
    assert _register(client).status_code == 201
    client.portal.call(_make_admin, client, CAROL[0])
    return _login(client, CAROL)


def test_only_admins_list_users(client, caplog):
    assert client.get("/api/admin/users", headers=_bearer(_login(client)["access_token"])).status_code == 403
    admin = _admin_tokens(client)
    assert _me(client, admin).json()["role"] == "admin"
    bob = _login(client, BOB)
    job = client.post(
        "/api/generate/", json={"prompt": "a boat", "num_images": 2}, headers=_bearer(bob["access_token"])
    )
    assert job.status_code == 202
    page = client.get("/api/admin/users", headers=_bearer(admin["access_token"]))
    assert page.status_code == 200
    users = {user["email"]: user for user in page.json()["users"]}
    assert set(users) == {ALICE[0], BOB[0], CAROL[0]}
    assert users[BOB[0]]["images_today"] == 2
    assert users[BOB[0]]["quota"] is None  # the tests' DAILY_IMAGE_QUOTA is 0: unlimited
    assert users[CAROL[0]]["role"] == "admin" and users[ALICE[0]]["role"] == "user"
    # Pages, by email.
    first = client.get("/api/admin/users", params={"limit": 2}, headers=_bearer(admin["access_token"])).json()
    assert [u["email"] for u in first["users"]] == [ALICE[0], BOB[0]] and first["next_cursor"] == BOB[0]
    rest = client.get(
        "/api/admin/users", params={"limit": 2, "cursor": first["next_cursor"]}, headers=_bearer(admin["access_token"])
    ).json()
    assert [u["email"] for u in rest["users"]] == [CAROL[0]] and rest["next_cursor"] is None
    # An admin reads anyone's job; the read is logged with who did it.
    job_id = job.json()["job_id"]
    with caplog.at_level(logging.INFO, logger="myflix.admin"):
        read = client.get(f"/api/generate/{job_id}", headers=_bearer(admin["access_token"]))
    assert read.status_code == 200 and read.json()["job_id"] == job_id
    [record] = [r for r in caplog.records if r.name == "myflix.admin" and r.action == "read job"]
    assert record.actor == CAROL[0] and record.target == job_id
    # Not another user.
    assert client.get(f"/api/generate/{job_id}", headers=_bearer(_login(client)["access_token"])).status_code == 404


def test_an_admin_disables_and_enables_a_user(client, caplog):
    admin = _admin_tokens(client)
    alice = _login(client)
    with caplog.at_level(logging.INFO, logger="myflix.admin"):
        response = client.patch(
            f"/api/admin/users/{ALICE[0]}", json={"disabled": True}, headers=_bearer(admin["access_token"])
        )
    assert response.status_code == 200 and response.json()["disabled"] is True
    assert any(r.actor == CAROL[0] and r.target == ALICE[0] for r in caplog.records if r.name == "myflix.admin")
    assert _me(client, alice).status_code == 401  # at once on this replica
    assert client.post("/api/auth/refresh", json={"refresh_token": alice["refresh_token"]}).status_code == 401
    refused = client.post("/api/auth/login", json={"email": ALICE[0], "password": ALICE[1]})
    assert refused.status_code == 403 and "disabled" in refused.json()["detail"]
    # A wrong password is still the same 401 as for anyone: being disabled tells nothing then.
    assert client.post("/api/auth/login", json={"email": ALICE[0], "password": "guess"}).status_code == 401
    enabled = client.patch(
        f"/api/admin/users/{ALICE[0]}", json={"disabled": False}, headers=_bearer(admin["access_token"])
    )
    assert enabled.json()["disabled"] is False
    assert _me(client, _login(client)).status_code == 200


def test_an_admin_sets_a_users_own_quota(client):
    admin = _admin_tokens(client)
    headers = _bearer(admin["access_token"])
    set_quota = client.patch(f"/api/admin/users/{BOB[0]}", json={"daily_image_quota": 3}, headers=headers)
    assert set_quota.status_code == 200
    assert set_quota.json()["daily_image_quota"] == 3 and set_quota.json()["quota"] == 3
    bob = _bearer(_login(client, BOB)["access_token"])
    assert client.get("/api/usage", headers=bob).json()["quota"] == 3
    assert client.post("/api/generate/", json={"prompt": "x", "num_images": 4}, headers=bob).status_code == 429
    # Unchanged when not sent; back to the default with null.
    assert client.patch(f"/api/admin/users/{BOB[0]}", json={}, headers=headers).json()["daily_image_quota"] == 3
    reset = client.patch(f"/api/admin/users/{BOB[0]}", json={"daily_image_quota": None}, headers=headers)
    assert reset.json()["daily_image_quota"] is None


@pytest.mark.parametrize(
    ("body", "status"),
    [({"daily_image_quota": -1}, 422), ({"role": "root"}, 422), ({"email": "x"}, 422), ({"disabled": "maybe"}, 422)],
)
def test_bad_admin_updates_are_422(client, body, status):
    headers = _bearer(_admin_tokens(client)["access_token"])
    assert client.patch(f"/api/admin/users/{BOB[0]}", json=body, headers=headers).status_code == status


def test_updating_an_unknown_user_is_404(client):
    headers = _bearer(_admin_tokens(client)["access_token"])
    response = client.patch("/api/admin/users/nobody@example.com", json={"disabled": True}, headers=headers)
    assert response.status_code == 404 and response.json() == {"detail": "No user nobody@example.com."}


# Seeding -----------------------------------------------------------------------------------


def test_demo_users_are_seeded_in_development_only_unless_asked(make_client):
    production = make_client(ENVIRONMENT="production")
    assert production.post("/api/auth/login", json={"email": ALICE[0], "password": ALICE[1]}).status_code == 401


def test_production_seeds_demo_users_when_asked(make_client):
    client = make_client(ENVIRONMENT="production", SEED_DEMO_USERS=True)
    assert client.post("/api/auth/login", json={"email": ALICE[0], "password": ALICE[1]}).status_code == 200
