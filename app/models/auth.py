"""Request and response schemas of the auth endpoints."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.security import BCRYPT_MAX_PASSWORD_BYTES

# bcrypt's limit is in UTF-8 bytes, which JSON Schema cannot count: maxLength (characters)
# is the bound a schema can state, and every longer password is over the limit in bytes
# too. The service checks the bytes (a 422) before bcrypt runs.
_PASSWORD_DESCRIPTION = (
    f"At most {BCRYPT_MAX_PASSWORD_BYTES} bytes in UTF-8 (bcrypt's limit). maxLength counts characters: "
    f"a shorter password with multi-byte characters can still be over {BCRYPT_MAX_PASSWORD_BYTES} bytes (422)."
)
Password = Annotated[
    str,
    Field(
        min_length=1,
        description=_PASSWORD_DESCRIPTION,
        json_schema_extra={"maxLength": BCRYPT_MAX_PASSWORD_BYTES, "format": "password"},
    ),
]
Email = Annotated[str, Field(min_length=3, max_length=254)]


class LoginRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"email": "alice@myflix.dev", "password": "alice-wonderland"}]}
    )

    email: Email
    password: Password


class TokenForm(BaseModel):
    """The OAuth2 password grant's form (RFC 6749, 4.3.2); the username is the email."""

    grant_type: Literal["password"] | None = None
    username: Email
    password: Password
    scope: str = Field(default="", max_length=1000, description="Ignored: tokens have no scopes.")


class TokenResponse(BaseModel):
    # Every field is sent, token_type too.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the access token expires.")
    refresh_token: str = Field(
        description="Opaque; trade it at POST /api/auth/refresh for new tokens before the access token "
        "expires. Each use gives a new one: a refresh token used twice ends its session."
    )
    refresh_expires_in: int = Field(description="Seconds until the refresh token expires.")


NewPassword = Annotated[
    str,
    Field(
        min_length=1,
        description=f"8 to {BCRYPT_MAX_PASSWORD_BYTES} bytes in UTF-8, and not the email address.",
        json_schema_extra={"maxLength": BCRYPT_MAX_PASSWORD_BYTES, "format": "password"},
    ),
]


class RegisterRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"email": "carol@example.com", "password": "carol-in-wonderland", "full_name": "Carol"}]
        }
    )

    email: Email = Field(description="Normalised: surrounding space removed, lower case.")
    password: NewPassword
    full_name: str = Field(min_length=1, max_length=200)


class RefreshRequest(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=200)


class PasswordChange(BaseModel):
    current_password: Password
    new_password: NewPassword


class AuthSettings(BaseModel):
    signup_enabled: bool = Field(description="Whether POST /api/auth/register takes new accounts.")


class UserPublic(BaseModel):
    email: str
    full_name: str
    role: Literal["user", "admin"]
