"""Fetching a provider's output once, into our own store, and telling images from anything else.

Downloads use the standard library's `http.client`, one keep-alive connection per host on each
worker thread: a download is a plain GET, and httpx's request building and httpcore's pool cost
an image about 0.2 ms more of the CPU that every image of a batch shares."""

import base64
import binascii
import http.client
import ssl
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, unquote, urljoin, urlsplit

from app.core.per_thread import PerThread, shared_ssl_context

MAX_IMAGE_BYTES = 25 * 1024 * 1024
MAX_REDIRECTS = 10
MAX_REDIRECT_BODY_BYTES = 64 * 1024
CONNECT_TIMEOUT_SECONDS = 5.0
# A connection idle longer than this is replaced rather than trusted: servers and NATs drop idle
# connections, some without a word, and a GET on such a one would wait out the read timeout.
IDLE_SECONDS = 50.0
USER_AGENT = "myflix-backend"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# What a request on a kept-alive connection that the server has closed meets.
_CLOSED_WHILE_IDLE = (ConnectionError, http.client.BadStatusLine, ssl.SSLEOFError, ssl.SSLZeroReturnError)
# Characters a request target keeps as they are (RFC 3986 reserved and unreserved, and "%").
_URL_SAFE = "/%:@!$&'()*+,;=-._~"

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)


class ImageFetchError(Exception):
    """The output could not be fetched or is not an image; the message is for the user."""


def sniff_image_type(content: bytes) -> str | None:
    for signature, media_type in _SIGNATURES:
        if content.startswith(signature):
            return media_type
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return None


def require_image(content: bytes) -> str:
    media_type = sniff_image_type(content)
    if media_type is None:
        raise ImageFetchError("The provider's output is not a PNG, JPEG or WebP image.")
    return media_type


class ImageFetcher:
    """Thread-safe: each worker thread keeps connections of its own. Honours HTTP_PROXY,
    HTTPS_PROXY, ALL_PROXY (plain http:// proxies, with or without user:password) and
    NO_PROXY, as the Replicate client does."""

    def __init__(self, timeout_seconds: float = 30.0) -> None:
        self._timeout_seconds = timeout_seconds
        self._proxies = urllib.request.getproxies()
        self._connections: PerThread[dict[tuple[str, str], _Connection]] = PerThread(
            dict, lambda connections: [kept.connection.close() for kept in list(connections.values())]
        )

    def fetch(self, url: str) -> tuple[bytes, str]:
        """The image at `url` (http, https or data:) and its media type."""
        content = self._data_url(url) if url.startswith("data:") else self._download(url)
        return content, require_image(content)

    def prepare_thread(self) -> None:
        self._connections.get()

    def close(self) -> None:
        self._connections.close()

    @staticmethod
    def _data_url(url: str) -> bytes:
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ImageFetchError("The provider's output is a data URL that is not base64.")
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise ImageFetchError("The provider's output is a malformed data URL.") from exc

    def _download(self, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ImageFetchError("Could not download the image: its URL is not an http(s) URL.")
            key, reusable = (parts.scheme, parts.netloc), False
            try:
                response = self._get(key, parts)
                location = _location(response) if response.status in _REDIRECTS else None
                content = _body(response) if location is None else response.read(MAX_REDIRECT_BODY_BYTES)
                reusable = response.isclosed() and not response.will_close
            except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: a bad URL or chunk
                raise ImageFetchError(f"Could not download the image: {str(exc) or type(exc).__name__}") from exc
            finally:
                if not reusable:
                    self._drop(key)
            if location is None:
                return content
            url = urljoin(url, location)
        raise ImageFetchError("Could not download the image: too many redirects.")

    def _get(self, key: tuple[str, str], parts: SplitResult) -> http.client.HTTPResponse:
        """The response to a GET, on this thread's connection to the host. A kept-alive connection
        the server has closed meanwhile fails at once: a GET is safe to send again."""
        connections = self._connections.get()
        kept = connections.get(key)
        if kept is not None and time.monotonic() - kept.last_used > IDLE_SECONDS:
            self._drop(key)
            kept = None
        if kept is None:
            kept = connections[key] = self._connect(parts)
        kept.last_used = time.monotonic()
        try:
            kept.connection.request("GET", kept.target(parts), headers=kept.headers)
            return kept.connection.getresponse()
        except _CLOSED_WHILE_IDLE:
            if kept.requests_sent == 0:
                raise
            self._drop(key)
            return self._get(key, parts)
        finally:
            kept.requests_sent += 1

    def _connect(self, parts: SplitResult) -> "_Connection":
        """A connection to the URL's host, or through the proxy for its scheme."""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxy = self._proxy_for(parts)
        headers = {"User-Agent": USER_AGENT}
        if proxy is None:
            host, host_port, proxy_headers = parts.hostname, port, {}
        else:
            host, host_port = proxy.hostname, proxy.port or 80
            proxy_headers = {"Proxy-Authorization": _basic_auth(proxy)} if proxy.username else {}
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(
                host, host_port, timeout=CONNECT_TIMEOUT_SECONDS, context=shared_ssl_context()
            )
            if proxy is not None:
                connection.set_tunnel(parts.hostname, port, headers=proxy_headers)
        else:
            connection = http.client.HTTPConnection(host, host_port, timeout=CONNECT_TIMEOUT_SECONDS)
            headers.update(proxy_headers)
        connection.connect()
        connection.sock.settimeout(self._timeout_seconds)
        # A plain HTTP proxy is sent the whole URL; a host, or a tunnel, the path.
        absolute = proxy is not None and parts.scheme == "http"
        return _Connection(connection, _absolute_target if absolute else _origin_target, headers)

    def _proxy_for(self, parts: SplitResult) -> SplitResult | None:
        proxy = self._proxies.get(parts.scheme) or self._proxies.get("all")
        if not proxy or urllib.request.proxy_bypass(parts.hostname):
            return None
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_parts.scheme != "http" or not proxy_parts.hostname:
            raise ImageFetchError(
                f"Could not download the image: only http:// proxies are supported, not {proxy_parts.scheme}://."
            )
        return proxy_parts

    def _drop(self, key: tuple[str, str]) -> None:
        kept = self._connections.get().pop(key, None)
        if kept is not None:
            kept.connection.close()


@dataclass
class _Connection:
    connection: http.client.HTTPConnection
    target: Callable[[SplitResult], str]  # how a URL is named on it
    headers: dict[str, str]
    last_used: float = 0.0
    requests_sent: int = 0


def _body(response: http.client.HTTPResponse) -> bytes:
    if response.status != 200:
        raise ImageFetchError(f"Could not download the image: HTTP {response.status}.")
    length = response.getheader("Content-Length", "")
    if length.isdigit():
        if int(length) > MAX_IMAGE_BYTES:
            raise ImageFetchError("The provider's output is larger than 25 MB.")
        return response.read()  # all of it, or IncompleteRead if the connection ends early
    content = response.read(MAX_IMAGE_BYTES + 1)
    if len(content) > MAX_IMAGE_BYTES:
        raise ImageFetchError("The provider's output is larger than 25 MB.")
    return content


def _location(response: http.client.HTTPResponse) -> str | None:
    """The redirect's target. http.client reads header bytes as Latin-1; servers that put
    non-ASCII in a Location send UTF-8."""
    location = response.getheader("Location")
    try:
        return location and location.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return location


def _origin_target(parts: SplitResult) -> str:
    """The path and query, percent-encoded where the URL was not (spaces, non-ASCII)."""
    target = quote(parts.path or "/", safe=_URL_SAFE)
    return f"{target}?{quote(parts.query, safe=_URL_SAFE + '?')}" if parts.query else target


def _absolute_target(parts: SplitResult) -> str:
    return f"{parts.scheme}://{parts.netloc}{_origin_target(parts)}"


def _basic_auth(proxy: SplitResult) -> str:
    credentials = f"{unquote(proxy.username or '')}:{unquote(proxy.password or '')}"
    return "Basic " + base64.b64encode(credentials.encode()).decode()
