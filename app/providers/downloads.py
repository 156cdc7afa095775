"""Fetching a provider's output once, into our own store, and telling images from anything else.

Downloads go through httpx, with a client of its own on each worker thread (see
`app.core.per_thread`); `data:` URLs are decoded by the standard library."""

import urllib.request

import httpx

from app.core.per_thread import THREAD_CLIENT_LIMITS, PerThread, shared_ssl_context

MAX_IMAGE_BYTES = 25 * 1024 * 1024
MAX_REDIRECTS = 10
# A host that does not answer is given up on sooner than a slow body.
DOWNLOAD_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
USER_AGENT = "myflix-backend"

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
    """Thread-safe: each worker thread has an httpx client of its own. Like the Replicate
    client, it takes its proxies from HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY."""

    def __init__(self, timeout: httpx.Timeout = DOWNLOAD_TIMEOUT) -> None:
        self._timeout = timeout
        self._clients: PerThread[httpx.Client] = PerThread(self._new_client, httpx.Client.close)

    def fetch(self, url: str) -> tuple[bytes, str]:
        """The image at `url` (http, https or data:) and its media type."""
        content = _decode_data_url(url) if url.startswith("data:") else self._download(url)
        return content, require_image(content)

    def prepare_thread(self) -> None:
        self._clients.get()

    def close(self) -> None:
        self._clients.close()

    def _new_client(self) -> httpx.Client:
        return httpx.Client(
            headers={"User-Agent": USER_AGENT},
            timeout=self._timeout,
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            verify=shared_ssl_context(),
            limits=THREAD_CLIENT_LIMITS,
            trust_env=True,
        )

    def _download(self, url: str) -> bytes:
        try:
            with self._clients.get().stream("GET", url) as response:
                return _read_body(response)
        except httpx.TooManyRedirects as exc:
            raise ImageFetchError("Could not download the image: too many redirects.") from exc
        except httpx.TimeoutException as exc:
            raise ImageFetchError("Could not download the image: it timed out.") from exc
        except httpx.UnsupportedProtocol as exc:
            raise ImageFetchError("Could not download the image: its URL is not an http(s) URL.") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ImageFetchError(f"Could not download the image: {str(exc) or type(exc).__name__}") from exc


def _read_body(response: httpx.Response) -> bytes:
    """The whole body, read no further than the size limit. One shorter than its
    Content-Length raises httpx.RemoteProtocolError."""
    if response.status_code != httpx.codes.OK:
        raise ImageFetchError(f"Could not download the image: HTTP {response.status_code}.")
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_IMAGE_BYTES:
        raise _too_large()
    content = bytearray()
    for chunk in response.iter_bytes():
        content += chunk
        if len(content) > MAX_IMAGE_BYTES:
            raise _too_large()
    return bytes(content)


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
