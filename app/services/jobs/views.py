"""A job as clients see it: snapshots, pages, and events on the wire, with image links signed
as they are sent, for the base URL the client reached (or PUBLIC_BASE_URL)."""

import base64
import binascii
import functools
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from app.core.security import ImageUrlSigner
from app.db.repository import as_utc
from app.models.generation import ImageResult, JobSnapshot
from app.services.errors import InvalidFieldError
from app.services.jobs.domain import Job, JobEvent, image_result, is_job_id

KEEPALIVE_WIRE = b"event: keepalive\r\ndata: {}\r\n\r\n"
# Sent before a stream ends because its events cannot be read right now: EventSource waits
# `retry` ms and reconnects with Last-Event-ID, and the stream resumes where it stopped.
RECONNECT_WIRE = b"retry: 2000\r\n: events are unavailable for a moment; reconnect with Last-Event-ID\r\n\r\n"

_LAST_EVENT_ID = re.compile(r"(\d{1,18})(-0)?", re.ASCII)
_IMAGE_KEY = '"image_key":'
CURSOR_YEARS = (1970, 9998)


class InvalidCursorError(InvalidFieldError):
    location = ("query", "cursor")

    def __init__(self) -> None:
        super().__init__("cursor is not one this service issued")


def parse_last_event_id(value: str | None) -> int:
    """The event number a Last-Event-ID names (`7` or the Redis form `7-0`); 0 for anything we
    did not send, so that a browser's reconnect replays from the start rather than fails."""
    match = _LAST_EVENT_ID.fullmatch(value or "")
    return int(match[1]) if match else 0


def encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([as_utc(created_at).isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        moment = as_utc(datetime.fromisoformat(created_at)).astimezone(UTC)
    except (ValueError, TypeError, OverflowError, binascii.Error):
        raise InvalidCursorError from None
    # Only what this service issues: a job id of its own, a time the databases can hold.
    if not isinstance(job_id, str) or not is_job_id(job_id) or not CURSOR_YEARS[0] <= moment.year <= CURSOR_YEARS[1]:
        raise InvalidCursorError
    return moment, job_id


class ImageLinks:
    """Links to images for one base URL, each signed as it is made: a stream open for longer
    than a link's lifetime still sends links that work."""

    def __init__(self, signer: ImageUrlSigner, base_url: str, clock: Callable[[], float] = time.time) -> None:
        self._signer = signer
        self._base_url = base_url.rstrip("/")
        self._clock = clock

    def url(self, key: str | None) -> str | None:
        if key is None:
            return None
        return _signed_url(self._signer, self._base_url, key, self._expires())

    def wire(self, event: JobEvent) -> bytes:
        """The event as Server-Sent Events bytes, encoded once for every follower that gets
        the same links."""
        if _IMAGE_KEY not in event.data:
            return _plain_wire(event)
        return _linked_wire(event, self._signer, self._base_url, self._expires())

    def snapshot(self, job: Job, positions: list[int | None]) -> JobSnapshot:
        expires = self._expires()
        return JobSnapshot(
            job_id=job.id,
            status=job.status,  # type: ignore[arg-type]
            prompt=job.prompt,
            num_images=job.num_images,
            seed=job.seed,
            created_at=job.created_at.isoformat(),
            images=[
                ImageResult(**_linked(self._signer, self._base_url, expires, image_result(image, position)))
                for image, position in zip(job.images, positions, strict=True)
            ],
            ttfi_ms=job.ttfi_ms,
            total_ms=job.total_ms,
        )

    def _expires(self) -> int:
        return self._signer.expires(self._clock())


def _linked(signer: ImageUrlSigner, base_url: str, expires: int, fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with its image key (if any) as a signed `url` in its place."""
    if "image_key" not in fields:
        return fields
    return {
        ("url" if name == "image_key" else name): (
            _signed_url(signer, base_url, value, expires) if name == "image_key" and value is not None else value
        )
        for name, value in fields.items()
    }


@functools.lru_cache(maxsize=65536)
def _signed_url(signer: ImageUrlSigner, base_url: str, key: str, expires: int) -> str:
    return f"{base_url}/api/images/{key}?{signer.query(key, expires)}"


# Encoded once for every follower: a plain event for all, a linked one for each base URL and
# expiry window (one window's worth of recent events is what followers ask for).
@functools.lru_cache(maxsize=8192)
def _linked_wire(event: JobEvent, signer: ImageUrlSigner, base_url: str, expires: int) -> bytes:
    fields = _linked(signer, base_url, expires, json.loads(event.data))
    if isinstance(fields.get("images"), list):
        fields["images"] = [_linked(signer, base_url, expires, image) for image in fields["images"]]
    return _encoded(event, json.dumps(fields, separators=(",", ":"), ensure_ascii=False))


@functools.lru_cache(maxsize=8192)
def _plain_wire(event: JobEvent) -> bytes:
    return _encoded(event, event.data)


def _encoded(event: JobEvent, data: str) -> bytes:
    return f"id: {event.sse_id or event.id}\r\nevent: {event.name}\r\ndata: {data}\r\n\r\n".encode()
