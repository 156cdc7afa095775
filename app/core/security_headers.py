"""Security headers suited to an API that also serves one small page."""

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_COMMON = {
    "X-Content-Type-Options": "nosniff",
    # Signed image links and stream URLs carry credentials: never hand them on in a Referer.
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_API_CSP = "default-src 'none'; frame-ancestors 'none'"
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# Swagger UI and ReDoc load their assets from a CDN and run inline scripts.
_NO_CSP_PREFIXES = ("/docs", "/redoc")


def security_headers(path: str, hsts: bool) -> dict[str, str]:
    """The headers every answer on `path` carries."""
    headers = dict(_COMMON)
    if path == "/" or path.startswith("/static/"):
        headers["Content-Security-Policy"] = _PAGE_CSP
    elif not path.startswith(_NO_CSP_PREFIXES):
        headers["Content-Security-Policy"] = _API_CSP
    if path.startswith("/api/") and not path.startswith("/api/images/"):
        # Answers carry tokens and private data: no cache may keep them.
        headers["Cache-Control"] = "no-store"
    if hsts:
        headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
    return headers


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, hsts: bool) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wanted = security_headers(scope["path"], self.hsts)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in wanted.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
