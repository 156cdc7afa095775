"""The HTTP server the service runs under: uvicorn, configured from the Settings. `run.py`, the
tests' live servers and the benchmark all start it from here, so what they run is what is
deployed.

uvicorn bounds neither how long a request may take to arrive (its keep-alive timeout starts
over with every byte, and a connection that never sends one has none) nor how many
connections it holds (`limit_concurrency` answers 503 only once a request's headers are in,
so slow ones pile up until file descriptors run out). The protocol here adds both."""

import asyncio
import enum
import json
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.core.config import Settings
from app.core.security_headers import security_headers

logger = logging.getLogger("uvicorn.error")

# uvicorn's own listen backlog.
UVICORN_BACKLOG = 2048


@dataclass(frozen=True)
class ConnectionBudget:
    """How many connections a process may hold. `open_files` is None when unlimited."""

    open_files: int | None
    reserved: int
    backlog: int
    max_connections: int


def reserved_file_descriptors(settings: Settings) -> int:
    """File descriptors kept for the process's own work, never for clients' connections."""
    # Standard streams, log files, the listening socket, the event loop's own, SQLite's
    # database and journal, Redis connections, imports.
    fixed = 64
    # The database pool, and as many more under a burst.
    database = 2 * settings.DB_POOL_SIZE
    # Each image worker holds a provider connection, a download and the image file it writes.
    images = 4 * settings.GENERATION_MAX_WORKERS
    return fixed + database + images


def connection_budget(settings: Settings, open_files: int | None) -> ConnectionBudget:
    reserved = reserved_file_descriptors(settings)
    if open_files is None:
        return ConnectionBudget(None, reserved, UVICORN_BACKLOG, settings.HTTP_MAX_CONNECTIONS)
    spare = max(open_files - reserved, 2)
    # The event loop accepts up to `backlog` connections at once before the protocol can
    # refuse any of them: that burst must fit too.
    backlog = min(UVICORN_BACKLOG, max(spare // 4, 1))
    return ConnectionBudget(open_files, reserved, backlog, max(1, min(settings.HTTP_MAX_CONNECTIONS, spare - backlog)))


def raise_open_file_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; the soft limit now in
    force (None: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # some systems refuse an unlimited soft limit: keep the one there is
    return None if soft == resource.RLIM_INFINITY else soft


def _json_answer(status: int, reason: str, detail: str, extra_headers: dict[str, str], hsts: bool) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    headers = {
        # As the service's own answers on its API carry them.
        **security_headers("/api/", hsts=hsts),
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
        **extra_headers,
    }
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


class _Phase(enum.Enum):
    HEADERS = "a request's headers are due"  # also: a new connection's first request
    BODY = "a declared body is due"
    HANDLING = "the service has the request"
    IDLE = "between requests"  # uvicorn's keep-alive timeout applies


# After a refusal or a timeout is sent, what the client still sends is read and dropped for so
# long before the connection is closed: closing with its bytes unread would reset the
# connection, and the client could lose the answer.
LINGER_SECONDS = 1.0


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines on receiving a request and a cap on the
    connections a server holds. When a connection comes over the cap, the connection that has
    waited longest without a request in the service (mid-headers, or idle) is closed to make
    room, so that a flood of slow connections cannot keep a well-formed request out; with
    none to close, the new one is answered 503. A connection answered 503 or 408 lingers (see
    LINGER_SECONDS), at most `max_lingering` of them at once (they too hold descriptors); beyond
    that, connections are closed without an answer.

    `server_config` makes a subclass per server, with its limits and its own registry of
    connections. Every attribute here is this class's own (prefixed `_bounded_`); uvicorn's
    state is reached only through the protocol callbacks it overrides."""

    header_timeout: ClassVar[float]
    body_timeout: ClassVar[float]
    max_connections: ClassVar[int]
    max_lingering: ClassVar[int]
    hsts: ClassVar[bool]
    # Per server: every connection it holds, those without a request in the service, longest
    # waiting first (dicts keep insertion order), and those answered and closing.
    held: ClassVar[set["BoundedHttpProtocol"]]
    waiting: ClassVar[dict["BoundedHttpProtocol", None]]
    lingering: ClassVar[set["BoundedHttpProtocol"]]

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._bounded_loop = _loop or asyncio.get_running_loop()
        self._bounded_transport: asyncio.Transport | None = None
        self._bounded_phase = _Phase.HEADERS
        self._bounded_since = self._bounded_loop.time()
        self._bounded_deadline: asyncio.TimerHandle | None = None
        self._bounded_deadline_phase: _Phase | None = None
        self._bounded_begun = False  # a byte of the current request has arrived
        self._bounded_requests = 0
        self._bounded_responses = 0
        self._bounded_lingering = False

    # Connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        super().connection_made(transport)
        self._bounded_transport = transport
        cls = type(self)
        if len(cls.held) >= cls.max_connections and not cls._close_longest_waiting():
            logger.warning("Refused a connection: %d connections held, none idle", len(cls.held))
            detail = "The server is at its connection limit; try again shortly"
            self._answer_and_close(_json_answer(503, "Service Unavailable", detail, {"Retry-After": "1"}, cls.hsts))
            return
        cls.held.add(self)
        self._bounded_since = self._bounded_loop.time()
        self._settle()
        self._arm_deadline()  # uvicorn has no timer for a connection that never sends a byte

    def connection_lost(self, exc: Exception | None) -> None:
        cls = type(self)
        cls.held.discard(self)
        cls.waiting.pop(self, None)
        cls.lingering.discard(self)
        self._cancel_deadline()
        super().connection_lost(exc)

    def _answer_and_close(self, answer: bytes) -> None:
        """Send `answer` (which says `Connection: close`) and close once the client has read
        it (uvicorn's protocol closes at the client's end of input), or after LINGER_SECONDS."""
        cls, transport = type(self), self._bounded_transport
        assert transport is not None
        cls.held.discard(self)
        cls.waiting.pop(self, None)
        self._cancel_deadline()
        if len(cls.lingering) >= cls.max_lingering:
            transport.abort()
            return
        cls.lingering.add(self)
        self._bounded_lingering = True
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        self._bounded_loop.call_later(LINGER_SECONDS, transport.abort)

    @classmethod
    def _close_longest_waiting(cls) -> bool:
        if not cls.waiting:
            return False
        longest = next(iter(cls.waiting))
        longest._forget_and_abort()
        return True

    def _forget_and_abort(self) -> None:
        # Out of the count now: its descriptor is closed on the loop's next turn.
        type(self).held.discard(self)
        type(self).waiting.pop(self, None)
        self._cancel_deadline()
        if self._bounded_transport is not None:
            self._bounded_transport.abort()

    # The request's parts, as they arrive

    def data_received(self, data: bytes) -> None:
        if self._bounded_lingering:
            return  # answered already: what comes now is dropped
        super().data_received(data)
        # Armed once per read, not per parser callback: a request that arrives whole starts
        # and cancels no timer.
        self._arm_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._bounded_begun and self._bounded_phase is not _Phase.HEADERS:
            self._bounded_since = self._bounded_loop.time()
        self._bounded_begun = True
        self._bounded_phase = _Phase.HEADERS
        self._settle()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._bounded_requests += 1
        self._bounded_phase = _Phase.BODY
        self._bounded_since = self._bounded_loop.time()
        self._settle()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._bounded_begun = False
        self._bounded_phase = _Phase.HANDLING
        self._settle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._bounded_responses += 1
        self._settle()

    def _settle(self) -> None:
        """After a change: idle once every request is answered; waiting (closable to make
        room) while no request is in the service."""
        answered = self._bounded_responses == self._bounded_requests
        if self._bounded_phase is _Phase.HANDLING and answered:
            self._bounded_phase = _Phase.IDLE
        cls = type(self)
        if answered and self._bounded_phase in (_Phase.HEADERS, _Phase.IDLE) and self in cls.held:
            cls.waiting.setdefault(self, None)
        else:
            cls.waiting.pop(self, None)

    # Deadlines

    def _arm_deadline(self) -> None:
        phase = self._bounded_phase
        if phase is _Phase.HEADERS:
            due = self._bounded_since + self.header_timeout
        elif phase is _Phase.BODY:
            due = self._bounded_since + self.body_timeout
        else:
            self._cancel_deadline()
            return
        if self._bounded_deadline_phase is phase:
            return
        self._cancel_deadline()
        self._bounded_deadline = self._bounded_loop.call_at(due, self._deadline_passed)
        self._bounded_deadline_phase = phase

    def _cancel_deadline(self) -> None:
        if self._bounded_deadline is not None:
            self._bounded_deadline.cancel()
        self._bounded_deadline = None
        self._bounded_deadline_phase = None

    def _deadline_passed(self) -> None:
        self._bounded_deadline = None
        self._bounded_deadline_phase = None
        transport = self._bounded_transport
        if transport is None or transport.is_closing():
            return
        phase = self._bounded_phase
        if phase is _Phase.HEADERS and self._bounded_responses == self._bounded_requests:
            if self._bounded_begun:
                # Nothing else is being sent on this connection: it can still be answered.
                detail = f"The request's headers did not arrive within {self.header_timeout:g} s"
                self._answer_and_close(_json_answer(408, "Request Timeout", detail, {}, self.hsts))
            else:
                transport.abort()  # a connection that never sent a byte asked nothing
        elif phase in (_Phase.HEADERS, _Phase.BODY):
            # The service has (or had) a request here and may be answering it: just close;
            # it sees the client gone.
            logger.debug("Closed a connection whose request did not arrive in time (%s)", phase.value)
            transport.abort()


def bounded_protocol(settings: Settings, budget: ConnectionBudget) -> type[BoundedHttpProtocol]:
    """A protocol class for one server, with its limits and a registry of its own."""
    production = settings.ENVIRONMENT == "production"

    class ServerProtocol(BoundedHttpProtocol):
        header_timeout = settings.HTTP_HEADER_TIMEOUT_SECONDS
        body_timeout = settings.HTTP_BODY_TIMEOUT_SECONDS
        max_connections = budget.max_connections
        # The descriptors set aside for a burst of accepted connections hold these too.
        max_lingering = budget.backlog
        hsts = production
        held: ClassVar[set[BoundedHttpProtocol]] = set()
        waiting: ClassVar[dict[BoundedHttpProtocol, None]] = {}
        lingering: ClassVar[set[BoundedHttpProtocol]] = set()

    return ServerProtocol


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """`app`: the ASGI app or its import string. `overrides`: more uvicorn.Config arguments."""
    budget = connection_budget(settings, raise_open_file_limit())
    options: dict[str, Any] = {
        "host": settings.HOST,
        "port": settings.PORT,
        "log_level": settings.LOG_LEVEL.lower(),
        # uvicorn believes X-Forwarded-For from loopback unless told otherwise: a client on
        # this host could then say it is anyone. Only the configured proxies are believed.
        "proxy_headers": bool(settings.FORWARDED_ALLOW_IPS),
        "forwarded_allow_ips": settings.FORWARDED_ALLOW_IPS or [],
        "http": bounded_protocol(settings, budget),
        # No `limit_concurrency`: the protocol holds max_connections at most, and uvicorn runs
        # one request of a connection at a time. uvicorn's own limit would count connections
        # the protocol has closed (lingering, or closed to make room) until their
        # connection_lost, and answer a well-formed newcomer 503 in text.
        "backlog": budget.backlog,
        **overrides,
    }
    config = uvicorn.Config(app, **options)
    if budget.open_files is not None and budget.open_files < budget.reserved + budget.backlog + budget.max_connections:
        logger.warning(
            "The open file limit (%d) is below what the service keeps for its own work (%d): "
            "raise it (ulimit -n) or lower DB_POOL_SIZE and GENERATION_MAX_WORKERS",
            budget.open_files,
            budget.reserved,
        )
    # After uvicorn.Config, which sets up uvicorn's logging.
    logger.info(
        "HTTP: connections at most %d (open file limit %s, %d kept for the service's own work); "
        "request headers due within %g s, a body within %g s",
        budget.max_connections,
        budget.open_files if budget.open_files is not None else "unlimited",
        budget.reserved,
        settings.HTTP_HEADER_TIMEOUT_SECONDS,
        settings.HTTP_BODY_TIMEOUT_SECONDS,
    )
    return config
