from typing import Any

from pydantic import BaseModel


class ErrorResponse(BaseModel):
    """Every error but a validation error (422) is `{"detail": "<what went wrong>"}`."""

    detail: str


def error_responses(**descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses: `error_responses(_404="No such job")`."""
    return {int(code.lstrip("_")): {"model": ErrorResponse, "description": text} for code, text in descriptions.items()}


# What any endpoint with a JSON or form body may answer before it runs.
BODY_ERRORS = error_responses(
    _400="The body could not be read (not UTF-8, or not JSON)",
    _413="The body is larger than 64 KiB",
)

# What any endpoint that takes a token may answer.
UNAUTHORIZED = error_responses(_401="Missing or invalid token")

# What any endpoint that reads or writes the database (or, scaled out, Redis) may answer.
STORE_UNAVAILABLE = error_responses(
    _503="The service is shutting down, or its database (or, scaled out, Redis) is unreachable; see Retry-After",
)
