"""Cutting short, from another thread, the HTTP call a worker thread is blocked in.

httpx has no cancel for a sync request, and closing a client from another thread while it is
in use is not safe. Shutting a socket down is: a read or write blocked on it returns at once
(as if the server had hung up), httpx raises a transport error on the thread that made the
call, and that thread's connection pool drops the connection. So each worker thread's client
notes the sockets it opens (httpcore's `trace` extension reports every new connection's
network stream), and a stop shuts them down while the thread is in a call that may be cut;
so does a deadline (`DEADLINES`), where a call has one of its own."""

import contextlib
import functools
import heapq
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from app.providers.base import ImageStopped, StopSignal

logger = logging.getLogger("myflix.provider")

_OPENED = frozenset({"connection.connect_tcp.complete", "connection.start_tls.complete"})


class ThreadConnections:
    """The sockets one thread's HTTP client has opened (idle ones too: a thread's pool holds one
    or two). Shutting an idle one down costs the next request a new connection, nothing more."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []

    def watch(self, request: httpx.Request) -> None:
        """Have the request report the connections it opens (an httpx request event hook)."""
        request.extensions["trace"] = self._trace

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event not in _OPENED:
            return
        stream = info.get("return_value")
        opened = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(opened, socket.socket):
            with self._lock:
                self._sockets = [kept for kept in self._sockets if kept.fileno() != -1] + [opened]

    @contextlib.contextmanager
    def cut_by(self, stop: StopSignal, deadline: float | None = None) -> Iterator[None]:
        """Within this, a stop, or `deadline` (time.monotonic()) passing, cuts the thread's call
        short: whatever the call raises then, the caller gets ImageStopped, or DeadlinePassed."""
        if stop.is_set():
            raise ImageStopped
        cut = _Cut()
        forget_stop = stop.on_stop(functools.partial(self._cut, cut, False))
        forget_deadline = (
            DEADLINES.call_at(deadline, functools.partial(self._cut, cut, True)) if deadline is not None else None
        )
        try:
            yield
        except Exception as exc:
            if stop.is_set():
                raise ImageStopped from exc
            if cut.by_deadline:
                raise DeadlinePassed from exc
            raise
        finally:
            with self._lock:
                cut.over = True  # from now on, these sockets may carry the thread's next call
            forget_stop()
            if forget_deadline is not None:
                forget_deadline()

    def _cut(self, cut: "_Cut", by_deadline: bool) -> None:
        with self._lock:
            if cut.over:
                return
            cut.by_deadline = cut.by_deadline or by_deadline
            for kept in self._sockets:
                if kept.fileno() != -1:
                    with contextlib.suppress(OSError):  # closed meanwhile by its own thread
                        kept.shutdown(socket.SHUT_RDWR)


class DeadlinePassed(Exception):
    """The call was cut short at its deadline."""


class _Cut:
    def __init__(self) -> None:
        self.over = False
        self.by_deadline = False


class _Deadlines:
    """One thread that calls each callback at its time (time.monotonic()), for the deadlines of
    every worker thread's calls: no timer thread is made per call."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._due: list[tuple[float, int, list[Callable[[], None] | None]]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def call_at(self, when: float, callback: Callable[[], None]) -> Callable[[], None]:
        """Returns what cancels it."""
        entry: list[Callable[[], None] | None] = [callback]
        with self._changed:
            heapq.heappush(self._due, (when, next(self._order), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-deadlines", daemon=True)
                self._thread.start()
            if self._due[0][2] is entry:  # the soonest now: the thread must wake earlier
                self._changed.notify()
        return functools.partial(entry.__setitem__, 0, None)

    def _run(self) -> None:
        with self._changed:
            while True:
                while self._due and self._due[0][2][0] is None:
                    heapq.heappop(self._due)  # canceled
                if not self._due:
                    self._changed.wait()
                    continue
                delay = self._due[0][0] - time.monotonic()
                if delay > 0:
                    self._changed.wait(delay)
                    continue
                callback = heapq.heappop(self._due)[2][0]
                if callback is not None:
                    self._changed.release()
                    try:
                        callback()
                    except Exception:  # a bug in one call's callback: the others' deadlines hold
                        logger.exception("a deadline's callback failed")
                    finally:
                        self._changed.acquire()


DEADLINES = _Deadlines()
