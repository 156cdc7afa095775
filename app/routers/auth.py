from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import OAuth2PasswordRequestForm

from app.models.auth import LoginRequest, TokenResponse, UserPublic
from app.models.errors import BODY_ERRORS, error_responses
from app.routers.deps import AuthServiceDep, ClientAddress, CurrentUser
from app.services.auth_service import IssuedToken

router = APIRouter(prefix="/api/auth", tags=["auth"])

_LOGIN_ERRORS = {
    **BODY_ERRORS,
    **error_responses(
        _401="Incorrect email or password",
        _429="Too many failed sign-ins, or too many at once from this client; see Retry-After",
    ),
}


def _token_response(issued: IssuedToken) -> TokenResponse:
    return TokenResponse(access_token=issued.access_token, expires_in=issued.expires_in)


@router.post("/login", response_model=TokenResponse, responses=_LOGIN_ERRORS)
async def login(body: LoginRequest, auth: AuthServiceDep, client: ClientAddress) -> TokenResponse:
    """Sign in with a demo user's email and password; returns a bearer token."""
    return _token_response(await auth.login(body.email, body.password, client))


@router.post("/token", response_model=TokenResponse, responses=_LOGIN_ERRORS)
async def token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], auth: AuthServiceDep, client: ClientAddress
) -> TokenResponse:
    """OAuth2 password flow for Swagger's Authorize button: the email is the username."""
    return _token_response(await auth.login(form.username, form.password, client))


@router.get("/me", response_model=UserPublic, responses=error_responses(_401="Missing or invalid token"))
async def me(user: CurrentUser) -> UserPublic:
    return UserPublic(email=user.email, full_name=user.full_name)
