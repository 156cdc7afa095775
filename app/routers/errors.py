"""Domain errors to HTTP answers, in one table."""

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError

from app.core.security import InvalidImageSignatureError, InvalidTokenError
from app.db.faults import DatabaseUnavailableError, transient_fault
from app.routers.deps import MissingTokenError
from app.services.auth_service import InvalidCredentialsError
from app.services.errors import InvalidFieldError
from app.services.image_store import ImageNotFoundError
from app.services.jobs.service import (
    IdempotencyConflictError,
    JobAlreadyFinishedError,
    JobNotFoundError,
    ServiceUnavailableError,
    TooManyActiveJobsError,
)
from app.services.login_throttle import LoginThrottledError

_BEARER = {"WWW-Authenticate": "Bearer"}

# error class -> (status, fixed message or None for str(error), headers)
_ERROR_RESPONSES: dict[type[Exception], tuple[int, str | None, dict[str, str]]] = {
    MissingTokenError: (401, "Not authenticated", _BEARER),
    InvalidTokenError: (401, "Could not validate credentials", _BEARER),
    InvalidCredentialsError: (401, "Incorrect email or password", _BEARER),
    JobNotFoundError: (404, "Job not found", {}),
    ImageNotFoundError: (404, "Image not found", {}),
    InvalidImageSignatureError: (403, None, {}),
    JobAlreadyFinishedError: (409, None, {}),
    IdempotencyConflictError: (409, None, {}),
    TooManyActiveJobsError: (429, None, {}),
    LoginThrottledError: (429, None, {}),
    ServiceUnavailableError: (503, None, {"Retry-After": "5"}),
    DatabaseUnavailableError: (503, None, {"Retry-After": "5"}),
}


def _validation_detail(errors: Sequence[Any]) -> list[dict[str, Any]]:
    # The input is left out: it may be a password, megabytes long, or not JSON-encodable.
    return [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in errors]


async def _handle_request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _validation_detail(exc.errors())}, status_code=422)


async def _handle_invalid_field(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidFieldError)
    detail = [{"type": "value_error", "loc": list(exc.location), "msg": str(exc)}]
    return JSONResponse({"detail": detail}, status_code=422)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    for error_class in type(exc).__mro__:
        if error_class in _ERROR_RESPONSES:
            status, message, headers = _ERROR_RESPONSES[error_class]
            retry_after = getattr(exc, "retry_after", None)
            if retry_after is not None:
                headers = {**headers, "Retry-After": str(retry_after)}
            return JSONResponse({"detail": message or str(exc)}, status_code=status, headers=headers)
    raise exc


async def _handle_database_error(request: Request, exc: Exception) -> JSONResponse:
    """A read the database could not answer for a passing cause is a 503, not a 500."""
    fault = transient_fault(exc)
    if fault is None:
        raise exc
    return await _handle(request, DatabaseUnavailableError(fault.cause))


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DBAPIError, _handle_database_error)
    app.add_exception_handler(ConnectionError, _handle_database_error)
    app.add_exception_handler(RequestValidationError, _handle_request_validation)
    app.add_exception_handler(InvalidFieldError, _handle_invalid_field)
    for error_class in _ERROR_RESPONSES:
        app.add_exception_handler(error_class, _handle)
