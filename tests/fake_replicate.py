"""A fake Replicate HTTP API server for tests.

Stdlib + Pillow only.  It speaks enough of Replicate's HTTP API (see
``/work/shared/replicate-protocol.md``) for the *real* ``replicate`` 1.0.7
client to talk to it::

    with FakeReplicate() as fake:
        client = replicate.Client(api_token=fake.token, base_url=fake.base_url)
        out = client.run("black-forest-labs/flux-schnell", input={"prompt": "a cat"})

Endpoints
    POST /v1/models/{owner}/{name}/predictions   create (``Prefer: wait[=N]`` honoured)
    POST /v1/predictions                         create by ``version``
    GET  /v1/predictions                         list
    GET  /v1/predictions/{id}                    get
    POST /v1/predictions/{id}/cancel             cancel
    GET  /v1/models/{owner}/{name}               model (with latest_version)
    GET  /v1/models/{owner}/{name}/versions/{v}  version (used by run("o/n:v"))
    GET  /v1/webhooks/default/secret             {"key": "whsec_..."}
    GET  /files/{id}/out-{i}.png                 output images (no auth required)
    GET  /_fake/stats                            the fake's own counters, as JSON (no auth; not recorded)

Rate limit (optional, off by default): creates go through a token bucket of
``create_rate_per_minute`` / 60 tokens a second and ``create_burst`` tokens of
capacity, full at the start.  A create that finds no token is answered ``429``
(``application/problem+json``, ``Retry-After``: whole seconds, at least 1, until a
token is due), as Replicate throttles: after authentication, before the input is
validated.  Accepted creates (per wall-clock second and each one's time) and
throttled ones are counted; see :meth:`FakeReplicate.stats`.

Prediction life cycle (all times relative to the create request, monotonic):
``starting`` for ``starting`` seconds (default ``latency / 2``), then
``processing`` until ``latency``, then terminal (``succeeded`` or whatever the
matching :class:`Rule` says).  A scheduler thread performs the transitions at
their deadlines and notifies the shared :class:`threading.Condition`, so held
``Prefer: wait`` requests and :meth:`FakeReplicate.wait_for` wake up exactly
when something changes (no sleep loops).
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import hashlib
import json
import math
import re
import secrets
import socket
import string
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "FLUX_SCHNELL",
    "FLUX_SCHNELL_VERSION",
    "TERMINAL_STATUSES",
    "FakeReplicate",
    "Fault",
    "RecordedRequest",
    "Rule",
]

FLUX_SCHNELL = "black-forest-labs/flux-schnell"
# Official models report a deployment-style version id ("dp-<hex>").
FLUX_SCHNELL_VERSION = "dp-4d0bcc010b3049749a251855f12800be"
# Statuses the real client considers terminal.  Anything forced via
# ``Rule.status`` (e.g. "aborted") is also terminal for the server.
TERMINAL_STATUSES = ("succeeded", "failed", "canceled", "aborted")

_ID_ALPHABET = string.ascii_lowercase + string.digits
_MAX_WAIT = 60
_IMAGE_SIZE = 64

_ASPECT_RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]


# --------------------------------------------------------------------------
# Public data classes
# --------------------------------------------------------------------------


@dataclass
class Rule:
    """Behaviour override for predictions whose ``input["prompt"]`` contains ``match``."""

    match: str
    latency: float | None = None  # seconds from create to terminal
    fail_error: str | None = None  # ends ``failed`` with this error
    never_finish: bool = False  # stays ``processing`` until canceled
    status: str | None = None  # force a terminal status, e.g. "aborted"
    outputs: int | None = None  # number of output items (0 -> [])
    output_http_status: int | None = None  # file URL answers this status
    output_body: bytes | None = None  # file URL serves these bytes (text/plain)
    starting: float | None = None  # extension: seconds spent in ``starting`` (default latency/2)
    output_trickle: float | None = None  # file URL sends its bytes one at a time, this many seconds apart
    output_redirect: str | None = None  # file URL answers 302 to this Location


@dataclass
class Fault:
    """A one-shot fault for the next create POST or prediction GET.

    ``status`` defaults to 429 when only ``retry_after`` is given and to 502
    when only ``raw_body`` is given.  With neither ``status``, ``raw_body``,
    ``retry_after`` nor ``reset``, the request is answered normally (after
    ``hang`` seconds, if set).
    """

    status: int | None = None
    retry_after: int | None = None
    raw_body: bytes | None = None
    reset: bool = False
    hang: float | None = None


@dataclass
class RecordedRequest:
    method: str
    path: str  # path without the query string
    headers: dict[str, str]  # lower-case keys
    json: Any  # parsed JSON body, or None
    query: str = ""
    body: bytes = b""
    at: float = field(default_factory=time.monotonic)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _new_id() -> str:
    # One urandom read, not 26: the fake answers a burst of creates as fast as it can.
    return "".join(_ID_ALPHABET[byte % len(_ID_ALPHABET)] for byte in secrets.token_bytes(26))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bytes(seed: str) -> bytes:
    """A small PNG, a colour of the seed's with an accent square, written directly (a tenth of
    Pillow's time, which a burst of creates would feel)."""
    digest = hashlib.sha256(seed.encode()).digest()
    colour = bytes(digest[:3])
    accent = bytes(255 - b for b in digest[:3])
    plain = b"\0" + colour * _IMAGE_SIZE
    marked = b"\0" + colour * 8 + accent * 16 + colour * (_IMAGE_SIZE - 24)
    rows = b"".join(marked if 8 <= y <= 23 else plain for y in range(_IMAGE_SIZE))
    header = struct.pack(">IIBBBBB", _IMAGE_SIZE, _IMAGE_SIZE, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows, 1))
        + _png_chunk(b"IEND", b"")
    )


def _problem(status: int, detail: str | None, title: str | None = None, **extra: Any) -> dict:
    body: dict[str, Any] = {}
    if title is not None:
        body["title"] = title
    if detail is not None:
        body["detail"] = detail
    body["status"] = status
    body.update(extra)
    return body


def _fault_problem(status: int, retry_after: int | None) -> dict:
    if status == 429:
        n = retry_after if retry_after is not None else 1
        unit = "second" if n == 1 else "seconds"
        return _problem(429, f"Request was throttled. Expected available in {n} {unit}.", "Too Many Requests")
    if status == 401:
        return _problem(401, "You did not pass a valid authentication token", "Unauthenticated")
    if status == 402:
        return _problem(
            402,
            "You have insufficient credit to run this model. Go to https://replicate.com/account/billing#billing "
            "to purchase credit. Once you purchase credit, please wait a few minutes before trying again.",
            "Insufficient credit",
        )
    if status == 404:
        return _problem(404, "The requested resource could not be found.")
    if status == 500:
        return _problem(500, "An internal server error occurred. Please try again later.", "Internal Server Error")
    if status == 502:
        return _problem(502, "The upstream server returned an invalid response.", "Bad Gateway")
    if status == 503:
        return _problem(503, "The service is temporarily unavailable. Please try again later.", "Service Unavailable")
    if status == 504:
        return _problem(504, "The upstream server did not respond in time.", "Gateway Timeout")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return _problem(status, phrase, phrase)


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _validate_flux_schnell(inp: dict) -> list[dict]:
    """Validate ``input`` against flux-schnell's schema (spec section 7)."""
    errors: list[dict] = []

    def bad(type_: str, fld: str, desc: str) -> None:
        errors.append({"type": type_, "field": fld, "description": desc})

    def check_type(key: str, expected: str) -> bool:
        v = inp[key]
        got = _type_name(v)
        ok = got == expected or (expected == "number" and got == "integer")
        if not ok:
            bad("invalid_type", f"input.{key}", f"Invalid type. Expected: {expected}, given: {got}")
        return ok

    if "prompt" not in inp:
        bad("required", "input", "prompt is required")
    else:
        check_type("prompt", "string")

    def int_range(key: str, lo: int, hi: int) -> None:
        if key in inp and inp[key] is not None and check_type(key, "integer"):
            if inp[key] < lo:
                bad("number_gte", f"input.{key}", f"Must be greater than or equal to {lo}")
            elif inp[key] > hi:
                bad("number_lte", f"input.{key}", f"Must be less than or equal to {hi}")

    def enum(key: str, choices: list[str]) -> None:
        if key in inp and inp[key] not in choices:
            quoted = ", ".join(f'"{c}"' for c in choices)
            bad("enum", f"input.{key}", f"{key} must be one of the following: {quoted}")

    int_range("num_outputs", 1, 4)
    int_range("num_inference_steps", 1, 4)
    int_range("output_quality", 0, 100)
    if "seed" in inp and inp["seed"] is not None:
        check_type("seed", "integer")
    enum("aspect_ratio", _ASPECT_RATIOS)
    enum("output_format", ["webp", "jpg", "png"])
    enum("megapixels", ["1", "0.25"])
    for key in ("disable_safety_checker", "go_fast"):
        if key in inp:
            check_type(key, "boolean")
    return errors


def _validate_generic(inp: dict) -> list[dict]:
    errors = []
    if "prompt" not in inp:
        errors.append({"type": "required", "field": "input", "description": "prompt is required"})
    elif not isinstance(inp["prompt"], str):
        errors.append(
            {
                "type": "invalid_type",
                "field": "input.prompt",
                "description": f"Invalid type. Expected: string, given: {_type_name(inp['prompt'])}",
            }
        )
    return errors


# --------------------------------------------------------------------------
# Internal prediction state
# --------------------------------------------------------------------------


class _Pred:
    def __init__(
        self,
        *,
        id: str,
        model: str,
        version: str,
        input: dict,
        created_mono: float,
        created_wall: float,
        latency: float,
        starting: float,
        rule: Rule | None,
        n_outputs: int,
        seed: int,
        extra: dict,
    ) -> None:
        self.id = id
        self.model = model
        self.version = version
        self.input = input
        self.created_mono = created_mono
        self.created_wall = created_wall
        self.latency = latency
        self.start_due = created_mono + min(starting, latency)
        self.done_due = created_mono + latency
        self.rule = rule
        self.n_outputs = n_outputs
        self.seed = seed
        self.extra = extra  # webhook etc., echoed back
        self.status = "starting"
        self.started_mono: float | None = None
        self.completed_mono: float | None = None
        self.output: Any = None
        self.error: str | None = None
        self.logs = ""
        # Set once terminal (or when the fake stops): wakes this prediction's `Prefer: wait`
        # request alone, not every held request on every change.
        self.settled = threading.Event()

    @property
    def terminal(self) -> bool:
        return self.status not in ("starting", "processing")

    def wall(self, mono: float) -> float:
        return self.created_wall + (mono - self.created_mono)

    def next_due(self) -> float | None:
        if self.status == "starting":
            return self.start_due
        if self.status == "processing" and not (self.rule and self.rule.never_finish):
            return self.done_due
        return None


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------


class _TokenBucket:
    """Replicate's create throttle: ``rate`` tokens a second, at most ``capacity``, full at first."""

    # Float slack: a token refilled over exactly 1/rate seconds counts as whole.
    _EPSILON = 1e-9

    def __init__(self, per_minute: float, burst: int, now: float) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.per_minute = per_minute
        self.burst = burst
        self.rate = per_minute / 60
        self.tokens = float(burst)
        self.at = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until one is due (none taken)."""
        self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = max(self.at, now)
        if self.tokens >= 1 - self._EPSILON:
            self.tokens = max(0.0, self.tokens - 1)
            return 0.0
        return (1 - self.tokens) / self.rate


class _Reset(Exception):
    """Raised inside a handler to drop the connection with a TCP RST."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # default 5 drops SYNs under concurrent connects (1 s retransmit)
    fake: FakeReplicate

    def __init__(self, addr, handler, fake: FakeReplicate) -> None:
        self.fake = fake
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeReplicate/1.0"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm holds the
        # body until the client's delayed ACK (40 ms), as no real server would.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.conns_lock:
            self.server.conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            with self.server.conns_lock:
                self.server.conns.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ---- dispatch -------------------------------------------------------

    def _dispatch(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        rec = RecordedRequest(
            method=self.command, path=parts.path, headers=headers, json=parsed, query=parts.query, body=body
        )
        try:
            status, resp_headers, payload = fake._handle(rec, body)
        except _Reset:
            self._reset()
            return
        except Exception as exc:  # a bug in the fake: answer 500 rather than dropping the socket
            fake.errors.append(exc)
            status, resp_headers = 500, {"Content-Type": "application/problem+json"}
            payload = json.dumps(
                _problem(500, f"FakeReplicate internal error: {exc!r}", "Internal Server Error")
            ).encode()
        if fake._stopped.is_set():
            self.close_connection = True
        self._send(status, resp_headers, payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

    def do_HEAD(self) -> None:  # pragma: no cover - not used by the client
        self._send(405, {"Content-Type": "application/problem+json"}, b"")

    def _send(self, status: int, headers: dict[str, str], payload: bytes | _Trickle) -> None:
        data = payload.data if isinstance(payload, _Trickle) else payload
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            if isinstance(payload, _Trickle):
                self._trickle(payload)
            else:
                self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _trickle(self, payload: _Trickle) -> None:
        """A byte at a time, until the fake stops or the client hangs up (OSError)."""
        self.close_connection = True
        fake = self.server.fake
        for offset in range(len(payload.data)):
            try:
                self.wfile.write(payload.data[offset : offset + 1])
                self.wfile.flush()
            except OSError:
                fake.trickles_cut += 1
                raise
            fake.trickled += 1
            if fake._stopped.wait(payload.interval):
                return

    def _reset(self) -> None:
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.rfile.close()  # drop the makefile() reference so close() really closes
        except OSError:
            pass
        try:
            self.connection.close()  # SO_LINGER 0 -> RST instead of FIN
        except OSError:
            pass


# --------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Trickle:
    data: bytes
    interval: float


_Response = tuple[int, dict[str, str], bytes | _Trickle]


class FakeReplicate:
    """Fake Replicate API server running in a background thread on 127.0.0.1."""

    def __init__(
        self,
        token: str = "r8_test",
        latency: float = 0.2,
        wait_cap: float | None = None,
        output_mode: str = "http",
        *,
        models: tuple[str, ...] | None = (FLUX_SCHNELL,),
        create_rate_per_minute: float | None = None,
        create_burst: int = 1,
    ) -> None:
        if output_mode not in ("http", "data"):
            raise ValueError("output_mode must be 'http' or 'data'")
        self.token = token
        self.latency = latency
        self.wait_cap = wait_cap
        self.output_mode = output_mode
        # Models accepted on /v1/models/{o}/{n}/predictions; None accepts any owner/name.
        self.models = models
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []  # exceptions raised by the fake's own handlers (should stay empty)
        self.trickled = 0  # bytes sent by `Rule.output_trickle` downloads
        self.trickles_cut = 0  # of those downloads, the ones the client hung up on
        self.webhook_secret = "whsec_" + base64.b64encode(hashlib.sha256(token.encode()).digest()[:24]).decode()

        self._cond = threading.Condition(threading.RLock())
        self._stopped = threading.Event()
        self._preds: dict[str, _Pred] = {}
        self._live: dict[str, _Pred] = {}  # not yet terminal: all that _advance needs to look at
        self._order: list[str] = []
        self._rules: list[Rule] = []
        self._create_faults: list[Fault] = []
        self._get_faults: list[Fault] = []
        self._png_cache: dict[tuple[str, int], bytes] = {}
        # The create throttle (None: off) and its counters, all under self._cond.
        self._bucket: _TokenBucket | None = None
        self._create_times: list[float] = []  # time.time() of each accepted (201) create
        self._creates_per_second: dict[int, int] = {}  # whole wall-clock second -> accepted creates
        self._creates_throttled = 0  # creates the throttle answered 429 (not Fault-injected ones)
        self.limit_creates(create_rate_per_minute, create_burst)
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._sched_thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------

    def start(self) -> FakeReplicate:
        if self._server is not None:
            return self
        self._stopped.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-replicate-http", daemon=True
        )
        self._sched_thread = threading.Thread(target=self._scheduler, name="fake-replicate-sched", daemon=True)
        self._serve_thread.start()
        self._sched_thread.start()
        return self

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        with self._cond:
            self._stopped.set()
            self._cond.notify_all()  # wake held hang requests and the scheduler
            for pred in self._live.values():
                pred.settled.set()  # and held Prefer: wait requests
        server.shutdown()
        server.server_close()
        with server.conns_lock:
            conns = list(server.conns)
        for conn in conns:  # unblock handler threads idling on keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in (self._serve_thread, self._sched_thread):
            if t is not None:
                t.join(timeout=2)
        self._server = None

    def __enter__(self) -> FakeReplicate:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- configuration ------------------------------------------------------

    def add_rule(self, rule: Rule) -> None:
        with self._cond:
            self._rules.append(rule)

    def push_create_fault(self, fault: Fault) -> None:
        with self._cond:
            self._create_faults.append(fault)

    def push_get_fault(self, fault: Fault) -> None:
        with self._cond:
            self._get_faults.append(fault)

    def limit_creates(self, per_minute: float | None, burst: int = 1) -> None:
        """Throttle creates to ``per_minute`` with ``burst`` at once (a full bucket from now);
        ``None`` or 0 turns the throttle off. The counters are kept."""
        with self._cond:
            self._bucket = _TokenBucket(per_minute, burst, time.monotonic()) if per_minute else None

    # ---- inspection ---------------------------------------------------------

    @property
    def predictions(self) -> dict[str, dict]:
        """Snapshot: id -> prediction JSON as ``GET /v1/predictions/{id}`` would return it now."""
        with self._cond:
            self._advance()
            return {pid: self._to_json(self._preds[pid]) for pid in self._order}

    def created(self) -> list[dict]:
        """Predictions created so far (their current JSON), in creation order."""
        with self._cond:
            self._advance()
            return [self._to_json(self._preds[pid]) for pid in self._order]

    def wait_for(self, predicate: Callable[[FakeReplicate], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate(self)`` is true; raise TimeoutError after ``timeout`` seconds.

        Re-evaluated whenever a request arrives or a prediction changes state.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: bool(predicate(self)), timeout=timeout):
                raise TimeoutError(f"condition not met within {timeout}s")

    @property
    def creates_accepted(self) -> int:
        """Creates answered 201 (a prediction made), throttled or not."""
        with self._cond:
            return len(self._create_times)

    @property
    def creates_throttled(self) -> int:
        """Creates the throttle refused with 429 (a `Fault`'s 429s are not counted)."""
        with self._cond:
            return self._creates_throttled

    def create_times(self) -> list[float]:
        """Wall-clock time (``time.time()``) of each accepted create, in order."""
        with self._cond:
            return list(self._create_times)

    def creates_per_second(self) -> dict[int, int]:
        """Accepted creates per whole wall-clock second (``int(time.time())``), seconds with none left out."""
        with self._cond:
            return dict(sorted(self._creates_per_second.items()))

    def max_creates_in_any_second(self) -> int:
        """The most accepted creates within any one second (a sliding window, not clock-aligned)."""
        times = self.create_times()
        most, start = 0, 0
        for end, at in enumerate(times):
            while at - times[start] >= 1.0:
                start += 1
            most = max(most, end - start + 1)
        return most

    def stats(self) -> dict[str, Any]:
        """The counters as JSON-able data (what ``GET /_fake/stats`` answers)."""
        with self._cond:
            bucket = self._bucket
            per_second = self.creates_per_second()
            result = {
                "create_rate_per_minute": bucket.per_minute if bucket else None,
                "create_burst": bucket.burst if bucket else None,
                "creates_accepted": len(self._create_times),
                "creates_throttled": self._creates_throttled,
                "creates_per_second": {str(second): n for second, n in per_second.items()},
                "max_creates_per_wall_second": max(per_second.values(), default=0),
                "max_creates_in_any_second": self.max_creates_in_any_second(),
                "create_times": list(self._create_times),
            }
        return result

    def requests_to(self, path_prefix: str, method: str | None = None) -> list[RecordedRequest]:
        """Convenience: recorded requests whose path starts with ``path_prefix``."""
        with self._cond:
            return [
                r for r in self.requests if r.path.startswith(path_prefix) and (method is None or r.method == method)
            ]

    # ---- state machine --------------------------------------------------------

    def _scheduler(self) -> None:
        with self._cond:
            while not self._stopped.is_set():
                self._advance()
                dues = [d for p in self._live.values() if (d := p.next_due()) is not None]
                timeout = max(0.0, min(dues) - time.monotonic()) if dues else None
                self._cond.wait(timeout=timeout)

    def _advance(self, now: float | None = None) -> None:
        """Apply all due transitions.  Caller holds the lock."""
        now = time.monotonic() if now is None else now
        changed = False
        for p in list(self._live.values()):
            if p.status == "starting" and now >= p.start_due:
                p.status = "processing"
                p.started_mono = p.start_due
                p.logs = f"running quantized prediction\nUsing seed: {p.seed}\n"
                changed = True
            if p.status == "processing" and now >= p.done_due and not (p.rule and p.rule.never_finish):
                self._finish(p, p.done_due)
                changed = True
        if changed:
            self._cond.notify_all()

    def _finish(self, p: _Pred, at: float) -> None:
        rule = p.rule
        p.completed_mono = at
        if rule and rule.fail_error is not None:
            p.status = "failed"
            p.error = rule.fail_error
            p.output = None
        elif rule and rule.status is not None and rule.status != "succeeded":
            p.status = rule.status
            p.output = None
        else:
            p.status = "succeeded"
            p.output = [self._output_item(p, i) for i in range(p.n_outputs)]
            p.logs += f"Total safe images: {p.n_outputs} out of {self._requested_outputs(p)}\n"
        self._settle(p)

    def _settle(self, p: _Pred) -> None:
        self._live.pop(p.id, None)
        p.settled.set()

    def _cancel(self, p: _Pred) -> None:
        if p.terminal:
            return
        now = time.monotonic()
        if p.started_mono is None:
            p.started_mono = now
        p.completed_mono = now
        p.status = "canceled"
        p.output = None
        self._settle(p)
        self._cond.notify_all()

    @staticmethod
    def _requested_outputs(p: _Pred) -> int:
        n = p.input.get("num_outputs", 1)
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1

    def _output_item(self, p: _Pred, i: int) -> str:
        if self.output_mode == "data":
            if p.rule and p.rule.output_body is not None:
                return "data:text/plain;base64," + base64.b64encode(p.rule.output_body).decode()
            return "data:image/png;base64," + base64.b64encode(self._png(p.id, i)).decode()
        return f"{self.base_url}/files/{p.id}/out-{i}.png"

    def _png(self, pid: str, i: int) -> bytes:
        key = (pid, i)
        if key not in self._png_cache:
            self._png_cache[key] = _png_bytes(f"{pid}:{i}")
        return self._png_cache[key]

    def _to_json(self, p: _Pred) -> dict:
        api = f"{self.base_url}/v1/predictions/{p.id}"
        d: dict[str, Any] = {
            "id": p.id,
            "model": p.model,
            "version": p.version,
            "input": copy.deepcopy(p.input),
            "logs": p.logs,
            "output": copy.deepcopy(p.output),
            "data_removed": False,
            "error": p.error,
            "status": p.status,
            "created_at": _iso(p.created_wall),
            "source": "api",
            "urls": {"cancel": f"{api}/cancel", "get": api, "web": f"https://replicate.com/p/{p.id}"},
        }
        d.update(copy.deepcopy(p.extra))
        if p.started_mono is not None:
            d["started_at"] = _iso(p.wall(p.started_mono))
        if p.terminal and p.completed_mono is not None:
            started = p.started_mono if p.started_mono is not None else p.completed_mono
            d["started_at"] = _iso(p.wall(started))
            d["completed_at"] = _iso(p.wall(p.completed_mono))
            d["metrics"] = {
                "predict_time": round(p.completed_mono - started, 6),
                "total_time": round(p.completed_mono - p.created_mono, 6),
            }
            if p.status == "succeeded":
                d["metrics"]["image_count"] = len(p.output or [])
        return d

    # ---- request handling --------------------------------------------------------

    def _handle(self, rec: RecordedRequest, raw: bytes) -> _Response:
        if rec.path == "/_fake/stats":  # the fake's control channel: not a request to Replicate
            if rec.method != "GET":
                return self._method_not_allowed(rec.method)
            return self._json(200, self.stats())
        with self._cond:
            self.requests.append(rec)
            self._cond.notify_all()
        path, method = rec.path, rec.method

        if path.startswith("/files/"):
            if method != "GET":
                return self._json(405, _problem(405, f'Method "{method}" not allowed.'))
            return self._serve_file(path)

        if not path.startswith("/v1/"):
            return self._json(404, _problem(404, "The requested resource could not be found."))

        m_model_create = re.fullmatch(r"/v1/models/([^/]+)/([^/]+)/predictions", path)
        is_create = method == "POST" and (m_model_create is not None or path == "/v1/predictions")
        m_pred = re.fullmatch(r"/v1/predictions/([^/]+)", path)
        is_get = method == "GET" and m_pred is not None

        if is_create or is_get:
            fault = self._pop_fault(self._create_faults if is_create else self._get_faults)
            if fault is not None:
                resp = self._apply_fault(fault)
                if resp is not None:
                    return resp

        if not self._authorized(rec.headers.get("authorization")):
            return self._json(401, _problem(401, "You did not pass a valid authentication token", "Unauthenticated"))

        if is_create:
            throttled = self._throttle()
            if throttled is not None:
                return throttled
            return self._create(rec, m_model_create)
        if m_pred is not None:
            if is_get:
                return self._get(m_pred.group(1))
            return self._method_not_allowed(method)
        m_cancel = re.fullmatch(r"/v1/predictions/([^/]+)/cancel", path)
        if m_cancel is not None:
            if method != "POST":
                return self._method_not_allowed(method)
            return self._cancel_req(m_cancel.group(1))
        if path == "/v1/predictions":
            if method != "GET":
                return self._method_not_allowed(method)
            return self._list()
        if path == "/v1/webhooks/default/secret":
            if method != "GET":
                return self._method_not_allowed(method)
            return self._json(200, {"key": self.webhook_secret})
        m_version = re.fullmatch(r"/v1/models/([^/]+)/([^/]+)/versions/([^/]+)", path)
        if m_version is not None and method == "GET":
            model = f"{m_version.group(1)}/{m_version.group(2)}"
            if not self._known_model(model):
                return self._not_found()
            return self._json(200, self._version_json(m_version.group(3)))
        m_model = re.fullmatch(r"/v1/models/([^/]+)/([^/]+)", path)
        if m_model is not None and method == "GET":
            model = f"{m_model.group(1)}/{m_model.group(2)}"
            if not self._known_model(model):
                return self._not_found()
            return self._json(200, self._model_json(m_model.group(1), m_model.group(2)))
        if m_model_create is not None:
            return self._method_not_allowed(method)
        return self._not_found()

    # -- helpers

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> _Response:
        ctype = "application/problem+json" if status >= 400 else "application/json"
        h = {"Content-Type": ctype}
        if headers:
            h.update(headers)
        return status, h, json.dumps(obj, separators=(",", ":")).encode()

    def _not_found(self) -> _Response:
        return self._json(404, _problem(404, "The requested resource could not be found."))

    def _method_not_allowed(self, method: str) -> _Response:
        return self._json(405, _problem(405, f'Method "{method}" not allowed.'))

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() in ("bearer", "token") and value.strip() == self.token

    def _known_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def _throttle(self) -> _Response | None:
        """None if the create may go (a token taken), else the 429 that Replicate would answer."""
        with self._cond:
            if self._bucket is None:
                return None
            wait = self._bucket.take(time.monotonic())
            if wait == 0.0:
                return None
            self._creates_throttled += 1
            self._cond.notify_all()
        retry_after = max(1, math.ceil(wait))
        return self._json(429, _fault_problem(429, retry_after), {"Retry-After": str(retry_after)})

    def _pop_fault(self, queue: list[Fault]) -> Fault | None:
        with self._cond:
            return queue.pop(0) if queue else None

    def _apply_fault(self, fault: Fault) -> _Response | None:
        if fault.hang:
            with self._cond:
                self._cond.wait_for(self._stopped.is_set, timeout=fault.hang)
        if fault.reset:
            raise _Reset
        status = fault.status
        if status is None and fault.raw_body is not None:
            status = 502
        if status is None and fault.retry_after is not None:
            status = 429
        if status is None:
            return None  # hang-only fault: answer normally
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        if fault.raw_body is not None:
            headers["Content-Type"] = "text/html; charset=utf-8"
            return status, headers, fault.raw_body
        return self._json(status, _fault_problem(status, fault.retry_after), headers)

    @staticmethod
    def _parse_prefer(value: str | None) -> tuple[float | None, str | None]:
        """Return (seconds to hold, Preference-Applied value) from a Prefer header."""
        if not value:
            return None, None
        for raw_token in re.split(r"[,;]", value):
            token = raw_token.strip()
            if token.lower() == "wait":
                return float(_MAX_WAIT), "wait"
            m = re.fullmatch(r"(?i)wait\s*=\s*(\d+)", token)
            if m:
                n = min(int(m.group(1)), _MAX_WAIT)
                if n <= 0:
                    return None, None
                return float(n), f"wait={n}"
        return None, None

    # -- endpoints

    def _create(self, rec: RecordedRequest, m_model: re.Match | None) -> _Response:
        body = rec.json
        if rec.body and body is None:
            return self._json(400, _problem(400, "JSON parse error - Expecting value", "Bad Request"))
        if not isinstance(body, dict):
            body = {}

        if m_model is not None:
            model = f"{m_model.group(1)}/{m_model.group(2)}"
            if not self._known_model(model):
                return self._not_found()
            version = FLUX_SCHNELL_VERSION if model == FLUX_SCHNELL else "dp-" + hashlib.md5(model.encode()).hexdigest()
        else:
            version = body.get("version")
            if not isinstance(version, str) or not version:
                return self._json(
                    422,
                    _problem(
                        422,
                        "- version: version is required\n",
                        "Input validation failed",
                        invalid_fields=[{"type": "required", "field": "version", "description": "version is required"}],
                    ),
                )
            if ":" in version:  # "owner/name:version" is accepted by the API too
                version = version.rsplit(":", 1)[1]
            model = self.models[0] if self.models else FLUX_SCHNELL

        inp = body.get("input")
        if not isinstance(inp, dict):
            errors = [{"type": "required", "field": "(root)", "description": "input is required"}]
        else:
            errors = _validate_flux_schnell(inp) if model == FLUX_SCHNELL else _validate_generic(inp)
        if errors:
            detail = "".join(f"- {e['field']}: {e['description']}\n" for e in errors)
            return self._json(422, _problem(422, detail, "Input validation failed", invalid_fields=errors))

        hold, applied = self._parse_prefer(rec.headers.get("prefer"))
        prompt = inp.get("prompt", "")
        extra = {k: body[k] for k in ("webhook", "webhook_completed", "webhook_events_filter") if k in body}

        with self._cond:
            rule = next((r for r in self._rules if r.match in prompt), None)
            latency = rule.latency if rule and rule.latency is not None else self.latency
            starting = rule.starting if rule and rule.starting is not None else latency / 2
            requested = inp.get("num_outputs", 1)
            if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
                requested = 1
            n_out = rule.outputs if rule and rule.outputs is not None else requested
            seed = inp.get("seed")
            pid = _new_id()
            while pid in self._preds:
                pid = _new_id()
            pred = _Pred(
                id=pid,
                model=model,
                version=version,
                input=copy.deepcopy(inp),
                created_mono=time.monotonic(),
                created_wall=time.time(),
                latency=max(0.0, latency),
                starting=max(0.0, starting),
                rule=rule,
                n_outputs=max(0, n_out),
                seed=seed if isinstance(seed, int) else secrets.randbelow(2**31),
                extra=extra,
            )
            self._preds[pid] = pred
            self._live[pid] = pred
            self._create_times.append(pred.created_wall)
            second = int(pred.created_wall)
            self._creates_per_second[second] = self._creates_per_second.get(second, 0) + 1
            self._order.append(pid)
            initial = self._to_json(pred)  # always "starting", output null
            self._cond.notify_all()

        # The output files are made now, off the lock, so that they are ready the moment the
        # prediction is done, as Replicate's are, and not rendered by the request that fetches them.
        if not (rule and rule.output_body is not None):
            for index in range(pred.n_outputs):
                self._png(pid, index)

        if hold is None:
            initial.pop("output", None)  # async create: no output key, like the real API
            return self._json(201, initial, self._ratelimit_headers(create=True))

        if self.wait_cap is not None:
            hold = min(hold, self.wait_cap)
        pred.settled.wait(hold)  # the scheduler thread settles it when due
        with self._cond:
            self._advance()
            snap = self._to_json(pred)

        headers = self._ratelimit_headers(create=True)
        headers["Preference-Applied"] = applied or "wait"
        if not pred.terminal:
            headers["Location"] = snap["urls"]["get"]
        return self._json(201, snap, headers)

    def _get(self, pid: str) -> _Response:
        with self._cond:
            self._advance()
            pred = self._preds.get(pid)
            if pred is None:
                return self._not_found()
            return self._json(200, self._to_json(pred), self._ratelimit_headers())

    def _cancel_req(self, pid: str) -> _Response:
        with self._cond:
            self._advance()
            pred = self._preds.get(pid)
            if pred is None:
                return self._not_found()
            self._cancel(pred)
            return self._json(200, self._to_json(pred), self._ratelimit_headers())

    def _list(self) -> _Response:
        with self._cond:
            self._advance()
            results = [self._to_json(self._preds[pid]) for pid in reversed(self._order)]
        return self._json(200, {"next": None, "previous": None, "results": results}, self._ratelimit_headers())

    def _serve_file(self, path: str) -> _Response:
        m = re.fullmatch(r"/files/([a-z0-9]+)/out-(\d+)\.png", path)
        if m is None:
            return self._not_found()
        pid, idx = m.group(1), int(m.group(2))
        with self._cond:
            self._advance()
            pred = self._preds.get(pid)
            if pred is None or pred.status != "succeeded" or idx >= pred.n_outputs:
                return self._json(404, _problem(404, "Not found"))
            rule = pred.rule
            if rule and rule.output_http_status is not None:
                st = rule.output_http_status
                try:
                    phrase = HTTPStatus(st).phrase
                except ValueError:
                    phrase = "Error"
                return st, {"Content-Type": "text/plain; charset=utf-8"}, phrase.encode()
            if rule and rule.output_body is not None:
                return 200, {"Content-Type": "text/plain; charset=utf-8"}, rule.output_body
            if rule and rule.output_redirect is not None:
                return 302, {"Location": rule.output_redirect}, b""
            data = self._png(pid, idx)
        if rule and rule.output_trickle is not None:
            return 200, {"Content-Type": "image/png"}, _Trickle(data, rule.output_trickle)
        return 200, {"Content-Type": "image/png", "Cache-Control": "public, max-age=3600"}, data

    @staticmethod
    def _ratelimit_headers(create: bool = False) -> dict[str, str]:
        if create:
            return {"ratelimit-remaining": "599", "ratelimit-reset": "1"}
        return {"ratelimit-remaining": "2999", "ratelimit-reset": "59999"}

    def _version_json(self, version_id: str) -> dict:
        return {
            "id": version_id,
            "created_at": "2024-07-30T00:00:00.000000Z",
            "cog_version": "0.9.19",
            "openapi_schema": {
                "openapi": "3.0.2",
                "info": {"title": "Cog", "version": "0.1.0"},
                "paths": {},
                "components": {
                    "schemas": {
                        "Input": {
                            "type": "object",
                            "title": "Input",
                            "required": ["prompt"],
                            "properties": {
                                "prompt": {"type": "string", "title": "Prompt", "x-order": 0},
                                "num_outputs": {"type": "integer", "default": 1, "minimum": 1, "maximum": 4},
                                "num_inference_steps": {"type": "integer", "default": 4, "minimum": 1, "maximum": 4},
                            },
                        },
                        "Output": {
                            "type": "array",
                            "title": "Output",
                            "items": {"type": "string", "format": "uri"},
                        },
                    }
                },
            },
        }

    def _model_json(self, owner: str, name: str) -> dict:
        version = (
            FLUX_SCHNELL_VERSION
            if f"{owner}/{name}" == FLUX_SCHNELL
            else "dp-" + hashlib.md5(f"{owner}/{name}".encode()).hexdigest()
        )
        return {
            "url": f"https://replicate.com/{owner}/{name}",
            "owner": owner,
            "name": name,
            "description": "Fake model served by FakeReplicate",
            "visibility": "public",
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "run_count": len(self._order),
            "cover_image_url": None,
            "default_example": None,
            "latest_version": self._version_json(version),
        }


def _serve_forever() -> None:
    """`python -m tests.fake_replicate --latency 0.5 [--create-rate-per-minute 120 --create-burst 11]`:
    serve until SIGTERM; prints the base URL on its first line (the benchmark runs it in a
    process of its own, and reads its counters from GET /_fake/stats)."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(description=_serve_forever.__doc__)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--token", default="r8_test")
    parser.add_argument(
        "--create-rate-per-minute", type=float, default=0, help="throttle creates to this rate (0: no throttle)"
    )
    parser.add_argument("--create-burst", type=int, default=1, help="creates the throttle lets go at once")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FakeReplicate(
        token=args.token,
        latency=args.latency,
        create_rate_per_minute=args.create_rate_per_minute,
        create_burst=args.create_burst,
    ) as fake:
        print(fake.base_url, flush=True)
        stop.wait()
    sys.exit(0)


if __name__ == "__main__":
    _serve_forever()
