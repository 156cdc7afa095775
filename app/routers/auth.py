from typing import Annotated

from fastapi import APIRouter, Form, Response, status

from app.models.auth import (
    AuthSettings,
    LoginRequest,
    PasswordChange,
    RefreshRequest,
    RegisterRequest,
    TokenForm,
    TokenResponse,
    UserPublic,
)
from app.models.errors import BODY_ERRORS, STORE_UNAVAILABLE, UNAUTHORIZED, error_responses
from app.routers.deps import AuthServiceDep, ClientAddress, CurrentSession, CurrentUser
from app.services.auth_service import IssuedTokens

router = APIRouter(prefix="/api/auth", tags=["auth"])

_LOGIN_ERRORS = {
    **BODY_ERRORS,
    **error_responses(
        _401="Incorrect email or password",
        _403="The account is disabled",
        _429="Too many failed sign-ins, or too many at once from this client; see Retry-After",
    ),
    **STORE_UNAVAILABLE,
}
_SIGNED_IN = {**UNAUTHORIZED, **STORE_UNAVAILABLE}


def _token_response(issued: IssuedTokens) -> TokenResponse:
    return TokenResponse(
        access_token=issued.access_token,
        expires_in=issued.expires_in,
        refresh_token=issued.refresh_token,
        refresh_expires_in=issued.refresh_expires_in,
    )


@router.post("/login", operation_id="login", response_model=TokenResponse, responses=_LOGIN_ERRORS)
async def login(body: LoginRequest, auth: AuthServiceDep, client: ClientAddress) -> TokenResponse:
    """Sign in with an email and password: a new session, with its access and refresh tokens."""
    return _token_response(await auth.login(body.email, body.password, client))


@router.post("/token", operation_id="issueToken", response_model=TokenResponse, responses=_LOGIN_ERRORS)
async def token(form: Annotated[TokenForm, Form()], auth: AuthServiceDep, client: ClientAddress) -> TokenResponse:
    """OAuth2 password flow for Swagger's Authorize button: the email is the username."""
    return _token_response(await auth.login(form.username, form.password, client))


@router.post(
    "/register",
    operation_id="register",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenResponse,
    responses={
        **BODY_ERRORS,
        **error_responses(
            _403="Sign-up is disabled (SIGNUP_ENABLED=false)",
            _409="An account with this email exists",
            _429="Too many sign-ins or sign-ups at once from this client; see Retry-After",
        ),
        **STORE_UNAVAILABLE,
    },
)
async def register(body: RegisterRequest, auth: AuthServiceDep, client: ClientAddress) -> TokenResponse:
    """Create an account (when SIGNUP_ENABLED is true) and sign in: the new session's tokens."""
    return _token_response(await auth.register(body.email, body.password, body.full_name, client))


@router.post(
    "/refresh",
    operation_id="refreshToken",
    response_model=TokenResponse,
    responses={
        **BODY_ERRORS,
        **error_responses(
            _401="The refresh token is unknown, expired, used already (its session is ended) or its session has ended"
        ),
        **STORE_UNAVAILABLE,
    },
)
async def refresh(body: RefreshRequest, auth: AuthServiceDep) -> TokenResponse:
    """Trade a refresh token for a new access token and a new refresh token. The one sent is
    used up: sending it again ends the whole session (it was stolen, or a client misbehaves)."""
    return _token_response(await auth.refresh(body.refresh_token))


@router.post(
    "/logout",
    operation_id="logout",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=_SIGNED_IN,
)
async def logout(session: CurrentSession, auth: AuthServiceDep) -> Response:
    """End this session: its refresh token stops working at once, its access token within 30 s on
    every replica."""
    await auth.logout(session)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/password",
    operation_id="changePassword",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={
        **BODY_ERRORS,
        **_SIGNED_IN,
        **error_responses(
            _403="The current password is incorrect",
            _429="Too many wrong passwords; see Retry-After",
        ),
    },
)
async def change_password(
    body: PasswordChange, session: CurrentSession, auth: AuthServiceDep, client: ClientAddress
) -> Response:
    """Change the password; every other session of the user ends (this one goes on)."""
    await auth.change_password(session, body.current_password, body.new_password, client)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/settings", operation_id="getAuthSettings", response_model=AuthSettings)
async def auth_settings(auth: AuthServiceDep) -> AuthSettings:
    """What a sign-in page needs to know: whether it may offer sign-up."""
    return AuthSettings(signup_enabled=auth.signup_enabled)


@router.get("/me", operation_id="getMe", response_model=UserPublic, responses=_SIGNED_IN)
async def me(user: CurrentUser) -> UserPublic:
    return UserPublic(email=user.email, full_name=user.full_name, role="admin" if user.is_admin else "user")
