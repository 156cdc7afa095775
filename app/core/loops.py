"""Background loops that must not die: run again after a growing pause whatever ended them."""

import logging
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

logger = logging.getLogger("myflix")


async def keep_running(
    name: str, body: Callable[[], Awaitable[None]], failed: Callable[[str, BaseException | None], None]
) -> None:
    """Run `body` for good: each time it fails, `failed(name, exception)` is told and it runs
    again after a pause that grows to two seconds."""
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(Exception),
        wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
        before_sleep=lambda state: failed(name, state.outcome.exception() if state.outcome else None),
    )
    async for attempt in retrying:
        with attempt:
            await body()
