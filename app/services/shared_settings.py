"""Settings every process of a scaled-out deployment must share (secrets, limits, the
provider, the image store): each process publishes a digest of each in Redis at start, and
one whose value differs from the others' refuses to start, naming the setting. The digests
lapse FINGERPRINT_TTL_SECONDS after the last process has stopped, so that the settings can be
changed by stopping every process."""

import asyncio
import hashlib
import logging

from redis.exceptions import RedisError

from app.core.config import S3Location, Settings
from app.core.redis_link import RedisLink

logger = logging.getLogger("myflix")

FINGERPRINT_REFRESH_SECONDS = 10.0
FINGERPRINT_TTL_SECONDS = 3 * FINGERPRINT_REFRESH_SECONDS

# KEYS[1]: the deployment's hash of digests. ARGV: the TTL in ms, then name, digest pairs.
# The names whose digest differs from the one there; none: this process's are (re)published.
_PUBLISH = """
local differ = {}
for i = 2, #ARGV, 2 do
    local have = redis.call('HGET', KEYS[1], ARGV[i])
    if have and have ~= ARGV[i + 1] then
        table.insert(differ, ARGV[i])
    end
end
if #differ == 0 then
    for i = 2, #ARGV, 2 do
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
end
return differ
"""


class SettingsMismatchError(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(
            f"{', '.join(names)} differ from the running processes of this deployment: set them the same "
            f"everywhere, or stop every process to change them (they lapse {FINGERPRINT_TTL_SECONDS:g} s "
            "after the last one stops)"
        )


def shared_values(settings: Settings, image_url_secret: bytes) -> dict[str, str]:
    store = settings.image_store_location
    return {
        "JWT_SECRET_KEY": settings.JWT_SECRET_KEY.get_secret_value(),
        "IMAGE_URL_SECRET": image_url_secret.hex(),
        "IMAGE_URL_TTL_SECONDS": str(settings.IMAGE_URL_TTL_SECONDS),
        "IMAGE_STORE_URL": store.url if isinstance(store, S3Location) else str(store),
        "IMAGE_LINKS": settings.IMAGE_LINKS,
        "IMAGE_PROVIDER": settings.image_provider,
        "REPLICATE_MODEL": settings.REPLICATE_MODEL,
        "MAX_IMAGES_PER_JOB": str(settings.MAX_IMAGES_PER_JOB),
        "MAX_ACTIVE_JOBS_PER_USER": str(settings.MAX_ACTIVE_JOBS_PER_USER),
        "MAX_STREAMS_PER_USER": str(settings.MAX_STREAMS_PER_USER),
        "IMAGE_TIMEOUT_SECONDS": str(settings.IMAGE_TIMEOUT_SECONDS),
        "WORKER_CLAIM_TIMEOUT_SECONDS": str(settings.WORKER_CLAIM_TIMEOUT_SECONDS),
        "IMAGE_MAX_ATTEMPTS": str(settings.IMAGE_MAX_ATTEMPTS),
        "LOGIN_MAX_FAILURES": str(settings.LOGIN_MAX_FAILURES),
        "LOGIN_MAX_FAILURES_PER_ACCOUNT": str(settings.LOGIN_MAX_FAILURES_PER_ACCOUNT),
        "LOGIN_FAILURE_WINDOW_SECONDS": str(settings.LOGIN_FAILURE_WINDOW_SECONDS),
        "JOB_RETENTION_DAYS": str(settings.JOB_RETENTION_DAYS),
        "REDIS_EVENTS_RETENTION_SECONDS": str(settings.REDIS_EVENTS_RETENTION_SECONDS),
        "ACCESS_TOKEN_EXPIRE_MINUTES": str(settings.ACCESS_TOKEN_EXPIRE_MINUTES),
        "REFRESH_TOKEN_DAYS": str(settings.REFRESH_TOKEN_DAYS),
        "SIGNUP_ENABLED": str(settings.SIGNUP_ENABLED),
        "DAILY_IMAGE_QUOTA": str(settings.DAILY_IMAGE_QUOTA),
        "PROVIDER_MAX_CREATES_PER_MINUTE": str(settings.PROVIDER_MAX_CREATES_PER_MINUTE),
        "PROVIDER_CREATE_BURST": str(settings.PROVIDER_CREATE_BURST),
    }


class SharedSettings:
    def __init__(self, link: RedisLink, values: dict[str, str]) -> None:
        self._link = link
        # Digests only: Redis never holds a secret, and a value is never shown.
        self._digests = {
            name: hashlib.sha256(f"{name}\0{value}".encode()).hexdigest()[:32] for name, value in values.items()
        }
        self._publish = link.client.register_script(_PUBLISH)
        self._refreshing: asyncio.Task[None] | None = None

    async def publish(self) -> list[str]:
        """The names of the settings that differ from the running processes'; none: published."""
        args: list[str | int] = [int(FINGERPRINT_TTL_SECONDS * 1000)]
        for name, digest in self._digests.items():
            args += [name, digest]
        return list(await self._publish(keys=[self._link.key("settings")], args=args))

    async def join(self) -> None:
        """Publish this process's settings, raising SettingsMismatchError where they differ,
        and keep them published while it runs. Redis unreachable: checked once it answers."""
        try:
            differ = await self.publish()
        except RedisError as exc:
            logger.warning("The shared settings could not be compared: Redis does not answer (%s)", exc)
            differ = []
        if differ:
            raise SettingsMismatchError(differ)
        self._refreshing = asyncio.create_task(
            self._link.keep_running("shared settings", self._refresh_for_good), name="shared-settings"
        )

    async def _refresh_for_good(self) -> None:
        while True:
            await asyncio.sleep(FINGERPRINT_REFRESH_SECONDS)
            differ = await self.publish()
            if differ:
                logger.error("This process's settings differ from the others': %s", ", ".join(differ))

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            self._refreshing = None


def _digest(name: str, value: str) -> str:
    return hashlib.sha256(f"{name}\0{value}".encode()).hexdigest()[:32]
