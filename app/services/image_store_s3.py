"""Images in an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO, SeaweedFS, ...), through
obstore: the same calls from image threads (blocking) and the event loop (async), request
signing and presigned URLs by the library."""

import logging
import secrets
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from app.core.config import S3Location
from app.services.image_store import ImageContent, ImageNotFoundError, ImageStoreError, check_image_key, media_type_of
from app.services.image_store import probe_key as new_probe_key

if TYPE_CHECKING:
    from obstore import BytesStream  # in the type stubs only

logger = logging.getLogger("myflix.images")

# A request to the store that has not finished by then fails (and is retried, see below).
REQUEST_TIMEOUT = "20s"
CONNECT_TIMEOUT = "5s"
# Failed requests (5xx, a dropped connection) are retried, within this much time in all.
MAX_RETRIES = 3
RETRY_WITHIN = timedelta(seconds=30)
# Keys are never reused, so a cache may keep an image for good; private: links are per user.
IMMUTABLE = "private, max-age=31536000, immutable"


def _reason(exc: Exception) -> str:
    """Words of our own for why a request to the store failed."""
    if isinstance(exc, FileNotFoundError):
        return "the bucket does not exist"
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
        return "the store refused the credentials"
    return "the store failed the request or could not be reached"


class S3ImageStore:
    shared = True

    def __init__(
        self,
        location: S3Location,
        endpoint_url: str | None,
        access_key_id: str | None,
        secret_access_key: str | None,
        region: str,
    ) -> None:
        self.url = location.url
        config: dict[str, str] = {"region": region}
        if endpoint_url:
            config["endpoint"] = endpoint_url
        if access_key_id:
            config["access_key_id"] = access_key_id
        if secret_access_key:
            config["secret_access_key"] = secret_access_key
        self._store = S3Store(
            location.bucket,
            prefix=location.prefix or None,
            config=config,  # type: ignore[arg-type]  # the TypedDict's keys, built as the settings allow
            client_options={
                "timeout": REQUEST_TIMEOUT,
                "connect_timeout": CONNECT_TIMEOUT,
                # A store on a private network (MinIO, SeaweedFS) is often reached over http.
                "allow_http": bool(endpoint_url) and urlsplit(endpoint_url or "").scheme == "http",
            },
            retry_config={"max_retries": MAX_RETRIES, "retry_timeout": RETRY_WITHIN},
        )

    def save(self, key: str, content: bytes) -> None:
        check_image_key(key)
        try:
            obstore.put(
                self._store,
                key,
                content,
                attributes={"Content-Type": media_type_of(key), "Cache-Control": IMMUTABLE},
            )
        except Exception as exc:  # every failure of the store's client is the image's failure
            logger.warning("saving an image failed: %s: %s", type(exc).__name__, exc, extra={"key": key})
            raise ImageStoreError(f"The image could not be kept: {_reason(exc)}.") from exc

    async def size_of(self, key: str) -> int:
        check_image_key(key)
        try:
            meta = await obstore.head_async(self._store, key)
        except FileNotFoundError:  # what obstore raises for an absent object
            raise ImageNotFoundError(key) from None
        except Exception as exc:
            raise ImageStoreError(f"The image store cannot be read now: {_reason(exc)}.") from exc
        return meta["size"]

    async def read(self, key: str, byte_range: tuple[int, int] | None = None) -> ImageContent:
        check_image_key(key)
        try:
            if byte_range is None:
                result = await obstore.get_async(self._store, key)
            else:
                result = await obstore.get_async(self._store, key, options={"range": byte_range})
        except FileNotFoundError:  # what obstore raises for an absent object
            raise ImageNotFoundError(key) from None
        except Exception as exc:
            raise ImageStoreError(f"The image store cannot be read now: {_reason(exc)}.") from exc
        start, end = result.range
        return ImageContent(result.meta["size"], start, end, _chunks(result.stream()))

    async def delete(self, keys: Iterable[str]) -> None:
        paths = [check_image_key(key) for key in keys]
        await self._delete(paths)

    async def _delete(self, paths: list[str]) -> None:
        if not paths:
            return
        try:
            await obstore.delete_async(self._store, paths)
        except Exception as exc:
            raise ImageStoreError(f"The images could not be removed: {_reason(exc)}.") from exc

    async def probe(self) -> None:
        key, content = new_probe_key(), secrets.token_bytes(32)
        try:
            await obstore.put_async(self._store, key, content)
        except Exception as exc:
            raise ImageStoreError(f"not writable: {_reason(exc)}") from exc
        try:
            read_back = bytes(await (await obstore.get_async(self._store, key)).bytes_async())
        except Exception as exc:
            raise ImageStoreError(f"not readable: {_reason(exc)}") from exc
        finally:
            try:
                await self._delete([key])
            except ImageStoreError:
                logger.warning("a probe object was left in the store: %s", key)
        if read_back != content:
            raise ImageStoreError("what was written did not read back")

    def presigned_url(self, key: str, seconds: int) -> str:
        return obstore.sign(self._store, "GET", check_image_key(key), timedelta(seconds=seconds))

    async def close(self) -> None:
        pass  # the client's connections go with it


async def _chunks(stream: "BytesStream") -> AsyncIterator[bytes]:
    async for chunk in stream:
        yield bytes(chunk)
