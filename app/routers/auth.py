from typing import Annotated

from fastapi import APIRouter, Form

from app.models.auth import LoginRequest, TokenForm, TokenResponse, UserPublic
from app.models.errors import BODY_ERRORS, STORE_UNAVAILABLE, UNAUTHORIZED, error_responses
from app.routers.deps import AuthServiceDep, ClientAddress, CurrentUser
from app.services.auth_service import IssuedToken

router = APIRouter(prefix="/api/auth", tags=["auth"])

_LOGIN_ERRORS = {
    **BODY_ERRORS,
    **error_responses(
        _401="Incorrect email or password",
        _429="Too many failed sign-ins, or too many at once from this client; see Retry-After",
    ),
    **STORE_UNAVAILABLE,
}


def _token_response(issued: IssuedToken) -> TokenResponse:
    return TokenResponse(access_token=issued.access_token, expires_in=issued.expires_in)


@router.post("/login", operation_id="login", response_model=TokenResponse, responses=_LOGIN_ERRORS)
async def login(body: LoginRequest, auth: AuthServiceDep, client: ClientAddress) -> TokenResponse:
    """Sign in with a demo user's email and password; returns a bearer token."""
    return _token_response(await auth.login(body.email, body.password, client))


@router.post("/token", operation_id="issueToken", response_model=TokenResponse, responses=_LOGIN_ERRORS)
async def token(form: Annotated[TokenForm, Form()], auth: AuthServiceDep, client: ClientAddress) -> TokenResponse:
    """OAuth2 password flow for Swagger's Authorize button: the email is the username."""
    return _token_response(await auth.login(form.username, form.password, client))


@router.get("/me", operation_id="getMe", response_model=UserPublic, responses={**UNAUTHORIZED, **STORE_UNAVAILABLE})
async def me(user: CurrentUser) -> UserPublic:
    return UserPublic(email=user.email, full_name=user.full_name)
