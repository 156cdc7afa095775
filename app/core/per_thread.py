"""One HTTP client per worker thread.

httpcore's connection pool walks every pooled connection (a poll() syscall each) under one
lock on every request start and every response close, so image threads sharing one client
queue behind each other exactly when their images finish together; a shared sync pool can
also close a connection another thread was just handed (encode/httpcore#1110). A client of
its own per thread has neither problem and holds the same one keep-alive connection."""

import functools
import ssl
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import httpx

T = TypeVar("T")

# A thread's connection waits idle while the other threads work, for longer than httpx's
# default 5 s: closing it then would make most images pay a new TCP (and TLS) handshake.
THREAD_CLIENT_LIMITS = httpx.Limits(keepalive_expiry=60)


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """The CA bundle, loaded once (it takes tens of milliseconds) for the Replicate and
    download clients of every thread."""
    return httpx.create_ssl_context()


class PerThread(Generic[T]):
    def __init__(self, factory: Callable[[], T], closer: Callable[[T], None]) -> None:
        self._factory = factory
        self._closer = closer
        self._local = threading.local()
        self._lock = threading.Lock()
        self._made: list[T] = []

    def get(self) -> T:
        try:
            kept: T = self._local.value
        except AttributeError:
            value = self._local.value = self._factory()
            with self._lock:
                self._made.append(value)
            return value
        return kept

    def close(self) -> None:
        with self._lock:
            made, self._made = self._made, []
            self._local = threading.local()
        for value in made:
            self._closer(value)
