"""Security headers suited to an API that also serves one small page and its docs."""

import base64
import hashlib
import re

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
_DOCS_PREFIXES = ("/docs", "/redoc")
_SELF = "'self'"
# FastAPI's docs pages configure Swagger UI and ReDoc in an inline script and style.
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def docs_page_csp(html: str, styles_by_script: bool = False) -> str:
    """The CSP of a docs page: every asset from 'self', and the page's own inline scripts and
    styles, each allowed by its hash, so that no other inline script runs. Swagger UI shows
    images from data: URLs. ReDoc (`styles_by_script`) styles itself with styled-components,
    which adds style elements from its script: inline styles then cannot be limited to
    hashes (a hash would turn 'unsafe-inline' off); inline scripts still are."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[tag].append(f"'sha256-{digest}'")
    scripts = " ".join([_SELF, *hashes["script"]])
    styles = " ".join([_SELF, *(["'unsafe-inline'"] if styles_by_script else hashes["style"])])
    return (
        f"default-src 'self'; script-src {scripts}; style-src {styles}; img-src 'self' data:; "
        "worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


def security_headers(path: str, hsts: bool) -> dict[str, str]:
    """The headers every answer on `path` carries."""
    headers = dict(_COMMON)
    if path == "/" or path.startswith(("/static/", *_DOCS_PREFIXES)):
        # The docs pages send their own, stricter about inline code (docs_page_csp).
        headers["Content-Security-Policy"] = _PAGE_CSP
    else:
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
