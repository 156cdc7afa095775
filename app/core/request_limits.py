"""What a request may be before any route sees it: a path without control characters, and a
body no larger than the largest valid one. Both answer with the API's JSON errors."""

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.text import has_control_character


async def send_json_error(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class RequestLimitsMiddleware:
    """A path with a control character names nothing here (404; a route pattern's `$` would
    match before a trailing newline); a body over `max_body_bytes` is a 413, whether its
    Content-Length says so or it turns out longer while it is read."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if has_control_character(scope["path"]):
            await send_json_error(send, 404, "Not Found")
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await send_json_error(send, 413 if declared.isdigit() else 400, self._too_large(declared))
            return
        received = 0

        async def counted_receive() -> Message:
            # A body sent without a length is counted as it comes; the error reaches the
            # app's handlers (FastAPI passes HTTPExceptions from body parsing on as they are).
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._too_large(None))
            return message

        await self.app(scope, counted_receive, send)

    def _too_large(self, declared: bytes | None) -> str:
        if declared is not None and not declared.isdigit():
            return "Content-Length is not a number of bytes"
        return f"The request body is larger than {self.max_body_bytes} bytes"
