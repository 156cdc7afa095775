"""Where finished images live: one interface, a local directory (the embedded default) or an
S3-compatible bucket (image_store_s3.py), so that every replica serves every image.

Keys are flat names, `<job id>-<index>.<extension>`, never reused: an image's bytes never change."""

import asyncio
import errno
import os
import re
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}\.(png|webp|jpg)$")
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpg": "image/jpeg"}
_EXTENSIONS = {media_type: extension for extension, media_type in MEDIA_TYPES.items()}
# Objects of the service's own (not images) live under this prefix; no image key can name one.
PROBE_PREFIX = "_probe"
READ_CHUNK_BYTES = 256 * 1024


class ImageNotFoundError(LookupError):
    """No image under this key (or the key is not a valid one)."""


class ImageStoreError(Exception):
    """The image could not be kept, or the store cannot be used; the message says why in
    words that may be shown to anyone (no paths, no endpoints)."""


# What a failed save says, by the errno of its cause; anything else names the errno.
_SAVE_FAILURES = {
    errno.ENOSPC: "The image could not be kept: the image store is full.",
    errno.EDQUOT: "The image could not be kept: the image store is full (quota).",
    errno.EROFS: "The image could not be kept: the image store is read-only.",
    errno.EACCES: "The image could not be kept: the image store may not be written to.",
}


def image_key(stem: str, content_type: str) -> str:
    try:
        return f"{stem}.{_EXTENSIONS[content_type]}"
    except KeyError:
        raise ValueError(f"unsupported image type {content_type!r}") from None


def possible_image_keys(job_id: str, num_images: int) -> list[str]:
    """Every key the job's images may have been saved under, recorded or not (an image saved
    as its job was canceled is never recorded)."""
    return [f"{job_id}-{index}.{extension}" for index in range(num_images) for extension in MEDIA_TYPES]


def media_type_of(key: str) -> str:
    return MEDIA_TYPES[key.rsplit(".", 1)[-1]]


def check_image_key(key: str) -> str:
    """Keys are flat file names; anything else (a path, `..`) is refused."""
    if not _KEY_PATTERN.fullmatch(key):
        raise ImageNotFoundError(key)
    return key


def probe_key() -> str:
    """A probe object's key: one per probe, so that processes sharing a store never read
    each other's."""
    return f"{PROBE_PREFIX}/{secrets.token_hex(12)}"


@dataclass
class ImageContent:
    """Bytes [start, end) of an image of `size` bytes, as they are read."""

    size: int
    start: int
    end: int
    chunks: AsyncIterator[bytes]


class ImageStore(Protocol):
    # What it is, for the log and the banner (never for clients).
    url: str
    # Whether processes on other machines see its images.
    shared: bool

    def save(self, key: str, content: bytes) -> None:
        """Blocking (on an image thread); raises ImageStoreError."""
        ...

    async def size_of(self, key: str) -> int:
        """Raises ImageNotFoundError."""
        ...

    async def read(self, key: str, byte_range: tuple[int, int] | None = None) -> ImageContent:
        """The image, or its bytes [start, end); raises ImageNotFoundError."""
        ...

    async def delete(self, keys: Iterable[str]) -> None:
        """Remove those of the images that exist; raises ImageStoreError."""
        ...

    async def probe(self) -> None:
        """Write an object, read it back and remove it; raises ImageStoreError with the
        reason when the store cannot be written or read."""
        ...

    def presigned_url(self, key: str, seconds: int) -> str:
        """A URL of the store that serves the image for `seconds`, with no credentials."""
        ...

    async def close(self) -> None: ...


class LocalImageStore:
    shared = False

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self.url = directory.as_uri()
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, key: str, content: bytes) -> None:
        try:
            self._write(self._path(key), content)
        except OSError as exc:
            raise _save_failure(exc) from exc

    def _write(self, target: Path, content: bytes) -> None:
        # Write then rename, so a reader never sees half an image.
        fd, tmp = tempfile.mkstemp(dir=self._directory, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _path(self, key: str) -> Path:
        return self._directory / check_image_key(key)

    async def size_of(self, key: str) -> int:
        try:
            return (await anyio.Path(self._path(key)).stat()).st_size
        except FileNotFoundError:
            raise ImageNotFoundError(key) from None

    async def read(self, key: str, byte_range: tuple[int, int] | None = None) -> ImageContent:
        try:
            handle = await anyio.open_file(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ImageNotFoundError(key) from None
        size = os.fstat(handle.wrapped.fileno()).st_size
        start, end = byte_range if byte_range is not None else (0, size)
        await handle.seek(start)
        return ImageContent(size, start, end, _file_chunks(handle, end - start))

    async def delete(self, keys: Iterable[str]) -> None:
        paths = [self._path(key) for key in keys]

        def unlink_all() -> None:
            for path in paths:
                path.unlink(missing_ok=True)

        try:
            await asyncio.to_thread(unlink_all)
        except OSError as exc:
            raise ImageStoreError(f"The images could not be removed ({_errno_name(exc)}).") from exc

    async def probe(self) -> None:
        target = self._directory / f".probe-{secrets.token_hex(12)}"
        content = secrets.token_bytes(32)

        def write_and_read() -> bytes:
            try:
                self._write(target, content)
                return target.read_bytes()
            finally:
                target.unlink(missing_ok=True)

        try:
            read_back = await asyncio.to_thread(write_and_read)
        except OSError as exc:
            raise ImageStoreError(f"not writable ({_errno_name(exc)})") from exc
        if read_back != content:
            raise ImageStoreError("what was written did not read back")

    def presigned_url(self, key: str, seconds: int) -> str:
        raise ImageStoreError("a local image store has no URLs of its own")

    async def close(self) -> None:
        pass


async def _file_chunks(handle: anyio.AsyncFile[bytes], length: int) -> AsyncIterator[bytes]:
    try:
        while length > 0:
            chunk = await handle.read(min(READ_CHUNK_BYTES, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk
    finally:
        await handle.aclose()


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "error")


def _save_failure(exc: OSError) -> ImageStoreError:
    return ImageStoreError(_SAVE_FAILURES.get(exc.errno or 0) or f"The image could not be kept: {_errno_name(exc)}.")
