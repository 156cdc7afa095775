"""Domain errors to HTTP answers, in one table."""

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute, APIRouter
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.security import InvalidImageSignatureError, InvalidTokenError
from app.core.security_headers import security_headers
from app.db.faults import DatabaseUnavailableError, transient_fault
from app.routers.deps import MissingTokenError
from app.services.auth_service import (
    AccountDisabledError,
    EmailTakenError,
    InvalidCredentialsError,
    InvalidRefreshTokenError,
    SignUpDisabledError,
    WrongPasswordError,
)
from app.services.errors import InvalidFieldError
from app.services.image_store import ImageNotFoundError, ImageStoreError
from app.services.jobs.service import (
    DailyQuotaExceededError,
    IdempotencyConflictError,
    JobAlreadyFinishedError,
    JobNotFoundError,
    ServiceUnavailableError,
    TooManyActiveJobsError,
)
from app.services.login_throttle import LoginThrottledError
from app.services.stream_slots import TooManyStreamsError
from app.services.users_service import NotAnAdminError, UserNotFoundError

_BEARER = {"WWW-Authenticate": "Bearer"}

# error class -> (status, fixed message or None for str(error), headers)
_ERROR_RESPONSES: dict[type[Exception], tuple[int, str | None, dict[str, str]]] = {
    MissingTokenError: (401, "Not authenticated", _BEARER),
    InvalidTokenError: (401, "Could not validate credentials", _BEARER),
    InvalidCredentialsError: (401, "Incorrect email or password", _BEARER),
    InvalidRefreshTokenError: (401, None, {}),
    AccountDisabledError: (403, None, {}),
    SignUpDisabledError: (403, None, {}),
    WrongPasswordError: (403, None, {}),
    NotAnAdminError: (403, None, {}),
    EmailTakenError: (409, None, {}),
    UserNotFoundError: (404, None, {}),
    DailyQuotaExceededError: (429, None, {}),
    JobNotFoundError: (404, "Job not found", {}),
    ImageNotFoundError: (404, "Image not found", {}),
    InvalidImageSignatureError: (403, None, {}),
    JobAlreadyFinishedError: (409, None, {}),
    IdempotencyConflictError: (409, None, {}),
    TooManyActiveJobsError: (429, None, {}),
    LoginThrottledError: (429, None, {}),
    TooManyStreamsError: (429, None, {}),
    ServiceUnavailableError: (503, None, {"Retry-After": "5"}),
    DatabaseUnavailableError: (503, None, {"Retry-After": "5"}),
    ImageStoreError: (503, None, {"Retry-After": "5"}),
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


def _methods_by_path(routers: list[APIRouter]) -> Callable[[str], set[str]]:
    routes = [route for router in routers for route in router.routes if isinstance(route, APIRoute)]

    def methods_of(path: str) -> set[str]:
        return {method for route in routes if route.path_regex.match(path) for method in route.methods or ()}

    return methods_of


def _http_error_handler(methods_of: Callable[[str], set[str]]) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(request: Request, exc: Exception) -> Response:
        """FastAPI's answer, but a 405 names every method of the path, not one route's."""
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 405:
            headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(methods_of(request.url.path)))}
            return JSONResponse({"detail": exc.detail}, status_code=405, headers=headers)
        return await http_exception_handler(request, exc)

    return handle


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: the same JSON shape and headers as every answer (this one is sent outside the
    middleware that adds them). The error itself is logged by the server."""
    settings = request.app.state.settings
    headers = security_headers(request.url.path, hsts=settings.ENVIRONMENT == "production")
    return JSONResponse({"detail": "Internal server error"}, status_code=500, headers=headers)


def register_error_handlers(app: FastAPI, routers: list[APIRouter]) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error_handler(_methods_by_path(routers)))
    app.add_exception_handler(Exception, _handle_unexpected)
    app.add_exception_handler(DBAPIError, _handle_database_error)
    app.add_exception_handler(ConnectionError, _handle_database_error)
    app.add_exception_handler(RequestValidationError, _handle_request_validation)
    app.add_exception_handler(InvalidFieldError, _handle_invalid_field)
    for error_class in _ERROR_RESPONSES:
        app.add_exception_handler(error_class, _handle)
