"""Lean HTTP clients for measuring, on raw asyncio connections: an SSE reader (HTTP/1.0, so no
chunked encoding to undo; timestamps taken as each data line arrives) and a keep-alive JSON
poster. They cost the benchmark a fraction of httpx's CPU, on a machine whose two cores the
client shares with the server, so the figures are the server's, not the client's."""

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlsplit


@dataclass
class Arrival:
    name: str
    id: str | None  # as sent: `7`, or `7-0` from a scaled-out deployment
    raw: bytes
    at: float  # time.time() on arrival: comparable with the server's wall clock on one machine
    at_perf: float  # time.perf_counter() on arrival

    @cached_property
    def data(self) -> dict:
        # Parsed when first asked for, after the run: JSON work would delay the next arrival.
        return json.loads(self.raw)


async def stream_events(
    base_url: str,
    path: str,
    until: Callable[[Arrival], bool],
    on_open: Callable[[], None] | None = None,
) -> list[Arrival]:
    """Read `path` until `until(event)` is true or the server ends the stream."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port, limit=1 << 20)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {url.netloc}\r\nAccept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"stream {path}: {status.decode().strip()}")
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        if on_open is not None:
            on_open()
        arrivals: list[Arrival] = []
        name, event_id = "message", None
        while line := await reader.readline():
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"id:"):
                event_id = line[3:].strip().decode()
            elif line.startswith(b"data:"):
                arrival = Arrival(name, event_id, line[5:], time.time(), time.perf_counter())
                arrivals.append(arrival)
                name, event_id = "message", None
                if until(arrival):
                    break
        return arrivals
    finally:
        writer.close()


class JsonPoster:
    """POSTs JSON (and GETs) over one keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self._url = urlsplit(base_url)
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._url.hostname, self._url.port)

    async def post(self, path: str, body: dict, headers: str = "") -> tuple[int, dict]:
        """`headers`: more header lines for this request alone, each ending in CRLF."""
        payload = json.dumps(body).encode()
        status, content = await self._request(
            f"POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n{headers}",
            payload,
        )
        return status, json.loads(content)

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self._request(f"GET {path} HTTP/1.1\r\n", b"")

    async def _request(self, head: str, payload: bytes) -> tuple[int, bytes]:
        await self.connect()
        self._writer.write(f"{head}Host: {self._url.netloc}\r\n{self._headers}\r\n".encode() + payload)
        status = int((await self._reader.readline()).split()[1])
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self._reader.readexactly(length)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
