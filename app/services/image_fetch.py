"""Fetching a provider's output once, into our own store, and telling images from anything else.

Downloads use the standard library's `http.client`, one keep-alive connection per host on each
worker thread: a download is a plain GET, and httpx's request building and httpcore's pool cost
an image about 0.2 ms more of the CPU that every image of a batch shares."""

import base64
import binascii
import http.client
import urllib.request
from collections.abc import Callable
from urllib.parse import SplitResult, urljoin, urlsplit

from app.core.per_thread import PerThread, shared_ssl_context

MAX_IMAGE_BYTES = 25 * 1024 * 1024
MAX_REDIRECTS = 10
CONNECT_TIMEOUT_SECONDS = 5.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

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
    """Thread-safe: each worker thread keeps connections of its own. Honours the HTTP(S)_PROXY
    and NO_PROXY environment variables, as the Replicate client does."""

    def __init__(self, timeout_seconds: float = 30.0) -> None:
        self._timeout_seconds = timeout_seconds
        self._proxies = urllib.request.getproxies()
        # (scheme, host:port) → the connection and how to name a URL on it
        self._connections: PerThread[dict] = PerThread(
            dict, lambda connections: [connection.close() for connection, _ in connections.values()]
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
            key = (parts.scheme, parts.netloc)
            try:
                response = self._get(key, url)
                location = response.getheader("Location") if response.status in _REDIRECTS else None
                content = self._body(response) if location is None else response.read()
                if response.will_close:
                    self._drop(key)
            except ImageFetchError:
                self._drop(key)
                raise
            except (OSError, http.client.HTTPException) as exc:
                self._drop(key)
                raise ImageFetchError(f"Could not download the image: {str(exc) or type(exc).__name__}") from exc
            if location is None:
                return content
            url = urljoin(url, location)
        raise ImageFetchError("Could not download the image: too many redirects.")

    @staticmethod
    def _body(response: http.client.HTTPResponse) -> bytes:
        if response.status != 200:
            raise ImageFetchError(f"Could not download the image: HTTP {response.status}.")
        length = response.getheader("Content-Length", "")
        if length.isdigit() and int(length) > MAX_IMAGE_BYTES:
            raise ImageFetchError("The provider's output is larger than 25 MB.")
        content = response.read(MAX_IMAGE_BYTES + 1)
        if len(content) > MAX_IMAGE_BYTES:
            raise ImageFetchError("The provider's output is larger than 25 MB.")
        return content

    def _get(self, key: tuple[str, str], url: str) -> http.client.HTTPResponse:
        """The response to a GET of `url`, on this thread's connection to its host. A kept-alive
        connection the server has closed meanwhile fails at once: a GET is safe to send again."""
        connections = self._connections.get()
        reused = key in connections
        if not reused:
            connections[key] = self._connect(urlsplit(url))
        connection, target = connections[key]
        try:
            connection.request("GET", target(url))
            return connection.getresponse()
        except (ConnectionError, http.client.BadStatusLine):
            if not reused:
                raise
            self._drop(key)
            return self._get(key, url)

    def _connect(self, parts: SplitResult) -> tuple[http.client.HTTPConnection, Callable[[str], str]]:
        """A connection to the URL's host, or through the proxy for its scheme, and how to name a
        URL on it (a plain HTTP proxy takes the whole URL)."""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxy = None if urllib.request.proxy_bypass(parts.hostname) else self._proxies.get(parts.scheme)
        proxy_parts = urlsplit(proxy) if proxy else None
        host, host_port = (proxy_parts.hostname, proxy_parts.port or 80) if proxy_parts else (parts.hostname, port)
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(
                host, host_port, timeout=CONNECT_TIMEOUT_SECONDS, context=shared_ssl_context()
            )
            if proxy_parts:
                connection.set_tunnel(parts.hostname, port)
        else:
            connection = http.client.HTTPConnection(host, host_port, timeout=CONNECT_TIMEOUT_SECONDS)
        connection.connect()
        connection.sock.settimeout(self._timeout_seconds)
        absolute = proxy_parts is not None and parts.scheme == "http"
        return connection, (lambda url: url) if absolute else _path_of

    def _drop(self, key: tuple[str, str]) -> None:
        dropped = self._connections.get().pop(key, None)
        if dropped is not None:
            dropped[0].close()


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
