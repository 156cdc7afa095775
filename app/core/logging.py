"""Logging: one line per request and per job/image state change, as text or JSON lines.

Structured fields travel in `extra={...}`; both formatters print them. Request lines never
carry the query string, because the stream endpoint takes the access token there.
"""

import copy
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.text import escape_control_characters

_HANDLER_NAME = "myflix"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extra_fields(record),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """One line per record: what came from outside (a path, a prompt, a provider's error, an
    exception's message) has its control characters and line breaks escaped, in the message
    and in every extra field, so that nobody can write a line of their own.

    A traceback keeps its lines, for people to read, but each is indented and escaped: a line
    that starts in the first column is always the start of a record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        escaped = copy.copy(record)
        escaped.msg, escaped.args = escape_for_one_line(record.getMessage()), None
        # The traceback and stack are added below, indented; another handler may have cached
        # the traceback's text on the record already, so that is left out here too.
        escaped.exc_info, escaped.exc_text, escaped.stack_info = None, None, None
        line = super().format(escaped)
        fields = " ".join(
            f"{k}={escape_for_one_line(str(v))}" for k, v in _extra_fields(record).items() if v is not None
        )
        lines = [f"{line} {fields}" if fields else line]
        if record.exc_info:
            lines += _indented(self.formatException(record.exc_info))
        elif record.exc_text:
            lines += _indented(record.exc_text)
        if record.stack_info:
            lines += _indented(self.formatStack(record.stack_info))
        return "\n".join(lines)


# Line breaks that are not control characters, which some viewers break lines at all the same.
_UNICODE_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029"})
TRACEBACK_INDENT = "    "


def escape_for_one_line(text: str) -> str:
    return escape_control_characters(text).translate(_UNICODE_LINE_BREAKS)


def _indented(text: str) -> list[str]:
    return [TRACEBACK_INDENT + escape_for_one_line(part) for part in text.splitlines()]


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # Replace only our own handler, so calling this again (a second app, a test) neither
    # doubles the lines nor removes handlers others installed.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Our middleware writes the request line; uvicorn's own would repeat it with the query
    # string, and with it any `?access_token=`.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request URL at INFO; the Replicate client's are noise at that level.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))


request_logger = logging.getLogger("myflix.request")


class RequestLogMiddleware:
    """Pure ASGI, so streaming responses pass through untouched; logs when a response ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            request_logger.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status_code,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
