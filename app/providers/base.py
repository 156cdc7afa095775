"""The one small protocol every image provider implements."""

import threading
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ImageRequest:
    job_id: str
    index: int
    prompt: str
    seed: int | None
    # Set when the image is no longer wanted; providers wait on it instead of sleeping.
    canceled: threading.Event = field(default_factory=threading.Event, compare=False)


@dataclass(frozen=True)
class GeneratedImage:
    """Either the image itself (`content`) or where the provider left it (`url`)."""

    content: bytes | None = None
    content_type: str | None = None
    url: str | None = None


class ProviderError(Exception):
    """The image could not be made; the message is shown to the user as the image's error."""


class ImageProvider(Protocol):
    name: str
    model: str

    def generate(self, request: ImageRequest) -> GeneratedImage:
        """Make one image. Blocking: runs on a worker thread. Raises ProviderError."""
        ...

    def close(self) -> None: ...
