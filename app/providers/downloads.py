"""Fetching a provider's output once, into our own store, and telling images from anything else.

Downloads go through httpx, with a client of its own on each worker thread (see
`app.core.per_thread`), and only to the provider's own hosts: every hop of a redirect is
checked before it is requested. `data:` URLs are decoded by the standard library."""

import ipaddress
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httpx

from app.core.config import REPLICATE_DELIVERY_HOST
from app.core.per_thread import THREAD_CLIENT_LIMITS, PerThread, shared_ssl_context
from app.providers.base import ImageStopped, StopSignal
from app.providers.http_abort import DeadlinePassed, ThreadConnections

MAX_IMAGE_BYTES = 25 * 1024 * 1024
MAX_REDIRECTS = 10
# The whole download, every hop and every read, not each read: a server that trickles a byte
# at a time must not hold an image (and its worker) for longer.
DOWNLOAD_SECONDS = 30.0
# A host that does not answer is given up on sooner than a slow body.
CONNECT_SECONDS = 5.0
# A redirect's body is read (so that its connection is kept) up to this much, else dropped.
MAX_REDIRECT_BODY_BYTES = 64 * 1024
USER_AGENT = "myflix-backend"
# (host, port or None for any port): where provider outputs may be fetched from.
OutputHosts = Sequence[tuple[str, int | None]]
REPLICATE_OUTPUT_HOSTS: OutputHosts = ((REPLICATE_DELIVERY_HOST, None),)
_DEFAULT_PORTS = {"http": 80, "https": 443}

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


def host_allowed(url: httpx.URL, allowed: OutputHosts) -> bool:
    """Whether `url` is on one of the hosts (a name's subdomains too; an IP address only as it
    is) and, where a port is given, on that port."""
    host = url.host.rstrip(".").lower()
    port = url.port or _DEFAULT_PORTS.get(url.scheme)
    for allowed_host, allowed_port in allowed:
        name = allowed_host.rstrip(".").lower()
        if host != name and (_is_ip_address(name) or not host.endswith(f".{name}")):
            continue
        if allowed_port is None or allowed_port == port:
            return True
    return False


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class _ThreadClient:
    client: httpx.Client
    connections: ThreadConnections


class ImageFetcher:
    """Thread-safe: each worker thread has an httpx client of its own. Like the Replicate
    client, it takes its proxies from HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY."""

    def __init__(self, allowed_hosts: OutputHosts, timeout: float = DOWNLOAD_SECONDS) -> None:
        self._allowed_hosts = tuple(allowed_hosts)
        self._timeout = timeout
        self._clients: PerThread[_ThreadClient] = PerThread(self._new_client, lambda kept: kept.client.close())

    def fetch(self, url: str, stop: StopSignal | None = None) -> tuple[bytes, str]:
        """The image at `url` (http, https or data:) and its media type. A `stop` cuts the
        download short with ImageStopped: that is how the image's own deadline ends it (its
        worker reports the timeout)."""
        if url.startswith("data:"):
            content = _decode_data_url(url)
        else:
            content = self._download(url, stop or StopSignal(), time.monotonic() + self._timeout)
        return content, require_image(content)

    def prepare_thread(self) -> None:
        self._clients.get()

    def close(self) -> None:
        self._clients.close()

    def _new_client(self) -> _ThreadClient:
        connections = ThreadConnections()
        client = httpx.Client(
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,  # each hop is checked here first
            verify=shared_ssl_context(),
            limits=THREAD_CLIENT_LIMITS,
            trust_env=True,
            event_hooks={"request": [connections.watch]},
        )
        return _ThreadClient(client, connections)

    def _download(self, url: str, stop: StopSignal, deadline: float) -> bytes:
        kept = self._clients.get()
        try:
            with kept.connections.cut_by(stop, deadline):
                return self._follow(kept.client, kept.client.build_request("GET", url), stop, deadline)
        except DeadlinePassed as exc:
            raise _timed_out() from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _download_error(exc) from exc

    def _follow(self, client: httpx.Client, request: httpx.Request, stop: StopSignal, deadline: float) -> bytes:
        """The body at the end of the redirects, each hop checked before it is requested."""
        for _ in range(MAX_REDIRECTS + 1):
            self._check_host(request.url)
            request.extensions["timeout"] = _timeout_until(deadline).as_dict()
            response = client.send(request, stream=True)
            try:
                if response.next_request is None:
                    return _read_body(response, stop, deadline)
                _drain(response, stop, deadline)
                request = response.next_request
            finally:
                response.close()
        raise ImageFetchError("Could not download the image: too many redirects.")

    def _check_host(self, url: httpx.URL) -> None:
        if url.scheme not in _DEFAULT_PORTS:
            raise ImageFetchError("Could not download the image: its URL is not an http(s) URL.")
        if not host_allowed(url, self._allowed_hosts):
            where = url.host if url.port is None else f"{url.host}:{url.port}"
            raise ImageFetchError(f"The provider's output is at a host that is not allowed: {where}")


def _download_error(exc: httpx.HTTPError | httpx.InvalidURL) -> ImageFetchError:
    if isinstance(exc, httpx.TimeoutException):
        return _timed_out()
    if isinstance(exc, httpx.UnsupportedProtocol):
        return ImageFetchError("Could not download the image: its URL is not an http(s) URL.")
    return ImageFetchError(f"Could not download the image: {str(exc) or type(exc).__name__}")


def _timeout_until(deadline: float) -> httpx.Timeout:
    remaining = max(deadline - time.monotonic(), 0.001)
    return httpx.Timeout(remaining, connect=min(remaining, CONNECT_SECONDS))


def _chunks(response: httpx.Response, stop: StopSignal, deadline: float) -> Iterator[bytes]:
    """The body, as it comes, until the deadline: each read is bounded by the time left when
    the request was sent, and the deadline is checked after each."""
    for chunk in response.iter_bytes():
        if stop.is_set():
            raise ImageStopped
        if time.monotonic() > deadline:
            raise _timed_out()
        yield chunk


def _read_body(response: httpx.Response, stop: StopSignal, deadline: float) -> bytes:
    """The whole body, read no further than the size limit. One shorter than its
    Content-Length raises httpx.RemoteProtocolError."""
    if response.status_code != httpx.codes.OK:
        raise ImageFetchError(f"Could not download the image: HTTP {response.status_code}.")
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_IMAGE_BYTES:
        raise _too_large()
    content = bytearray()
    for chunk in _chunks(response, stop, deadline):
        content += chunk
        if len(content) > MAX_IMAGE_BYTES:
            raise _too_large()
    return bytes(content)


def _drain(response: httpx.Response, stop: StopSignal, deadline: float) -> None:
    """Read a redirect's body, so that its connection can carry the next hop; a long one is
    left unread (closing the response then drops the connection)."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_REDIRECT_BODY_BYTES:
        return
    read = 0
    for chunk in _chunks(response, stop, deadline):
        read += len(chunk)
        if read > MAX_REDIRECT_BODY_BYTES:
            return


def _decode_data_url(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url) as data:
            content: bytes = data.read()
    except ValueError as exc:  # no comma, or base64 that does not decode
        raise ImageFetchError("The provider's output is a malformed data URL.") from exc
    if len(content) > MAX_IMAGE_BYTES:
        raise _too_large()
    return content


def _too_large() -> ImageFetchError:
    return ImageFetchError("The provider's output is larger than 25 MB.")


def _timed_out() -> ImageFetchError:
    return ImageFetchError("Could not download the image: it timed out.")
