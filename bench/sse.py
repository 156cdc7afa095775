"""A lean SSE client for measuring: one raw HTTP/1.0 connection per stream (so no chunked
encoding to undo), timestamps taken the moment each event's data line arrives. A thousand of
these cost the benchmark far less CPU than a thousand httpx streams, so the figures are the
server's, not the client's."""

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Arrival:
    name: str
    id: int | None
    data: dict
    at: float  # time.time() on arrival: comparable with the server's wall clock on one machine
    at_perf: float  # time.perf_counter() on arrival


async def stream_events(
    base_url: str, path: str, until: Callable[[Arrival], bool], on_open: Callable[[], None] | None = None,
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
                event_id = int(line[3:])
            elif line.startswith(b"data:"):
                arrival = Arrival(name, event_id, json.loads(line[5:]), time.time(), time.perf_counter())
                arrivals.append(arrival)
                name, event_id = "message", None
                if until(arrival):
                    break
        return arrivals
    finally:
        writer.close()
