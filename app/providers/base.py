"""The one small protocol every image provider implements."""

import contextlib
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol


class StopSignal:
    """Tells a running provider call to stop. `cancel`: the image is no longer wanted (the
    user canceled it, or it ran out of time), so cancel it at the provider too. `interrupt`:
    this process is stopping, so leave the provider's work running, to be re-attached after a
    restart."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: Literal["canceled", "interrupted"] | None = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def cancel(self) -> None:
        self.reason = "canceled"
        self._set()

    def interrupt(self) -> None:
        self.reason = self.reason or "interrupted"
        self._set()

    def on_stop(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback()` once when the signal is set, on the thread that sets it (at once if
        it is set already): how a call blocked in I/O is cut short. Returns what unregisters it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return functools.partial(self._forget, callback)
        callback()
        return lambda: None

    def _forget(self, callback: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def _set(self) -> None:
        with self._lock:
            already = self._event.is_set()
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        if not already:
            for callback in callbacks:
                callback()

    @property
    def cancels_at_provider(self) -> bool:
        return self.reason == "canceled"

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, waking at once on a stop; True if stopped."""
        return self._event.wait(timeout)


@dataclass
class ImageRequest:
    job_id: str
    index: int
    prompt: str
    seed: int | None
    stop: StopSignal = field(default_factory=StopSignal)
    # time.monotonic() when the image was handed to a worker: the start of its latency.
    dispatched_at: float = field(default_factory=time.monotonic)
    # time.monotonic() by which the image must be made (None: no bound of its own): its worker
    # stops it then (a call in progress is cut short) and fails it with a timeout.
    deadline: float | None = None
    # Work the provider started before a restart, to follow instead of starting anew.
    resume_prediction_id: str | None = None
    # Called (on the worker thread) with the id of provider-side work as soon as it exists.
    on_prediction: Callable[[str], None] = field(default=lambda prediction_id: None)
    # Called (on the worker thread) before a retry: attempt number, delay in seconds, reason.
    on_retry: Callable[[int, float, str], None] = field(default=lambda attempt, delay, reason: None)
    # Called (on the worker thread) when the provider refused a create for its rate limit,
    # with the seconds it asked to wait.
    on_throttled: Callable[[float], None] = field(default=lambda seconds: None)
    # Called (on the worker thread) before a refused create is sent again: returns once the
    # deployment's create budget grants it one, or the request is stopped.
    wait_create_turn: Callable[[], None] = field(default=lambda: None)


@dataclass(frozen=True)
class GeneratedImage:
    """Either the image itself (`content`) or where the provider left it (`url`)."""

    content: bytes | None = None
    url: str | None = None


class ProviderError(Exception):
    """The image could not be made; the message is shown to the user as the image's error."""


class ImageStopped(Exception):
    """The call ended early because `request.stop` was set."""


class ImageProvider(Protocol):
    name: str
    model: str
    # Whether the provider limits how fast predictions are created (Replicate: 600 a minute),
    # so that the service shapes its creates under PROVIDER_MAX_CREATES_PER_MINUTE.
    limits_creates: bool

    def generate(self, request: ImageRequest) -> GeneratedImage:
        """Make one image. Blocking: runs on a worker thread. Raises ProviderError, or
        ImageStopped once `request.stop` is set."""
        ...

    def prepare_thread(self) -> None:
        """Called once on each worker thread before its first image: build what the thread
        will use (clients, say), so that no image pays for it."""
        ...

    def close(self) -> None: ...
