"""Where finished images live. A small interface, so an object store can stand in later."""

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}\.(png|webp|jpg)$")
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpg": "image/jpeg"}
_EXTENSIONS = {media_type: extension for extension, media_type in MEDIA_TYPES.items()}


class ImageNotFoundError(LookupError):
    """No image under this key (or the key is not a valid one)."""


class ImageStoreError(Exception):
    """The image could not be kept; the message says why, for the image's `error`."""


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


def media_type_of(key: str) -> str:
    return MEDIA_TYPES[key.rsplit(".", 1)[-1]]


def check_image_key(key: str) -> str:
    """Keys are flat file names; anything else (a path, `..`) is refused."""
    if not _KEY_PATTERN.fullmatch(key):
        raise ImageNotFoundError(key)
    return key


class ImageStore(Protocol):
    def save(self, key: str, content: bytes) -> None: ...

    def path_of(self, key: str) -> Path:
        """The local file holding the image; raises ImageNotFoundError."""
        ...


class LocalImageStore:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, key: str, content: bytes) -> None:
        target = self._directory / check_image_key(key)
        # Write then rename, so a reader never sees half an image.
        try:
            fd, tmp = tempfile.mkstemp(dir=self._directory, prefix=".incoming-")
        except OSError as exc:
            raise _save_failure(exc) from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise _save_failure(exc) from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def path_of(self, key: str) -> Path:
        path = self._directory / check_image_key(key)
        if not path.is_file():
            raise ImageNotFoundError(key)
        return path


def _save_failure(exc: OSError) -> ImageStoreError:
    reason = _SAVE_FAILURES.get(exc.errno or 0)
    return ImageStoreError(reason or f"The image could not be kept: {errno.errorcode.get(exc.errno or 0, 'error')}.")
