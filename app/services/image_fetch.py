"""Fetching a provider's output once, into our own store, and telling images from anything else."""

import base64
import binascii

import httpx

from app.core.per_thread import THREAD_CLIENT_LIMITS, PerThread, shared_ssl_context, without_cookies

MAX_IMAGE_BYTES = 25 * 1024 * 1024

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
    """Thread-safe: a client of its own on each worker thread."""

    def __init__(self, timeout_seconds: float = 30.0) -> None:
        timeout = httpx.Timeout(timeout_seconds, connect=5.0)
        self._clients = PerThread(
            lambda: without_cookies(httpx.Client(
                timeout=timeout, verify=shared_ssl_context(), limits=THREAD_CLIENT_LIMITS, follow_redirects=True
            )),
            httpx.Client.close,
        )

    def fetch(self, url: str) -> tuple[bytes, str]:
        """The image at `url` (http, https or data:) and its media type."""
        content = self._data_url(url) if url.startswith("data:") else self._download(url)
        return content, require_image(content)

    def prepare_thread(self) -> None:
        self._clients.get()

    def close(self) -> None:
        self._clients.close()

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
        try:
            with self._clients.get().stream("GET", url) as response:
                if response.status_code != 200:
                    raise ImageFetchError(f"Could not download the image: HTTP {response.status_code}.")
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_IMAGE_BYTES:
                        raise ImageFetchError("The provider's output is larger than 25 MB.")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"Could not download the image: {exc}") from exc
