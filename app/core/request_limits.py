"""What a request may be before any route sees it: a path without control characters, and a
body no larger than the largest valid one. Both answer with the API's JSON errors."""

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.text import has_control_character


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
            await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            refusal = JSONResponse(
                {"detail": self._too_large(declared)}, status_code=413 if declared.isdigit() else 400
            )
            await refusal(scope, receive, send)
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
