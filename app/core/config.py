"""The one Settings object: environment variables override `.env.local`, which overrides `.env`."""

import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Used when JWT_SECRET_KEY is unset, so the service starts with no setup; production refuses it.
PLACEHOLDER_JWT_SECRET = "dev-only-insecure-jwt-secret-change-me"
MIN_PRODUCTION_SECRET_BYTES = 32
REPLICATE_DELIVERY_HOST = "replicate.delivery"
_MODEL_REF = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        # Later files win; real environment variables win over both.
        env_file=(PROJECT_ROOT / ".env", PROJECT_ROOT / ".env.local"),
        env_file_encoding="utf-8",
        # An empty value is unset: the empty `JWT_SECRET_KEY=` of `.env.local.example` is the
        # placeholder, not an empty key that would sign forgeable tokens.
        env_ignore_empty=True,
        extra="ignore",
    )

    ENVIRONMENT: Literal["development", "production"] = "development"
    HOST: str = "127.0.0.1"
    PORT: int = Field(8000, ge=1, le=65535)
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    LOG_FORMAT: Literal["text", "json"] = "text"
    CORS_ORIGINS: Annotated[list[str], NoDecode] = [
        "http://localhost:5173",
        "http://localhost:3000",
    ]

    JWT_SECRET_KEY: SecretStr = SecretStr(PLACEHOLDER_JWT_SECRET)
    ACCESS_TOKEN_EXPIRE_MINUTES: int = Field(15, ge=1)
    # A refresh token (each rotation makes a new one) is good for this long.
    REFRESH_TOKEN_DAYS: float = Field(30, gt=0)
    # Whether anyone may create an account (POST /api/auth/register).
    SIGNUP_ENABLED: bool = False
    # The demo users with their documented passwords; unset: in development only.
    SEED_DEMO_USERS: bool | None = None
    # Images a user may ask for per UTC day (an admin can set a user's own); 0: unlimited.
    DAILY_IMAGE_QUOTA: int = Field(200, ge=0)
    # Failed logins per account and client, and per account from all clients, in the window.
    LOGIN_MAX_FAILURES: int = Field(5, ge=1)
    LOGIN_MAX_FAILURES_PER_ACCOUNT: int = Field(50, ge=1)
    LOGIN_FAILURE_WINDOW_SECONDS: float = Field(300, gt=0)
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks,
    # comma-separated, or *); empty: none, the peer's address is the client's.
    FORWARDED_ALLOW_IPS: Annotated[list[str], NoDecode] = []

    # The HTTP edge: a request's headers must all arrive within HTTP_HEADER_TIMEOUT_SECONDS of
    # its first byte, and a declared body within HTTP_BODY_TIMEOUT_SECONDS; a process serves
    # HTTP_MAX_CONNECTIONS connections at most; a user holds MAX_STREAMS_PER_USER streams.
    HTTP_HEADER_TIMEOUT_SECONDS: float = Field(10.0, gt=0)
    HTTP_BODY_TIMEOUT_SECONDS: float = Field(30.0, gt=0)
    HTTP_MAX_CONNECTIONS: int = Field(1000, ge=1)
    MAX_STREAMS_PER_USER: int = Field(20, ge=1)

    DATA_DIR: Path = Path("data")
    # SQLAlchemy async URL; empty: a SQLite file under DATA_DIR.
    DATABASE_URL: str | None = None
    # Connections each process keeps to PostgreSQL (and as many more under a burst).
    DB_POOL_SIZE: int = Field(10, ge=1, le=200)
    # How long a request waits for its write while the database refuses writes: then 503.
    DB_WRITE_TIMEOUT_SECONDS: float = Field(10.0, gt=0)
    # PostgreSQL session limits, so that no lock, statement or forgotten transaction can hold
    # up others for long.
    DB_LOCK_TIMEOUT_SECONDS: float = Field(5.0, gt=0)
    DB_STATEMENT_TIMEOUT_SECONDS: float = Field(30.0, gt=0)
    # Short: a process paused inside a transaction (SIGSTOP, a VM frozen) holds its job's row
    # locks until the server ends its session.
    DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS: float = Field(10.0, gt=0)
    # Where images are kept: `file:///path` (a local directory) or `s3://bucket/prefix` (any
    # S3-compatible store, reached with the AWS_* settings). Empty: file:// DATA_DIR/images.
    IMAGE_STORE_URL: str | None = None
    # Deprecated alias of IMAGE_STORE_URL=file://<dir>, read only when IMAGE_STORE_URL is unset.
    IMAGE_STORE_DIR: Path | None = None
    # How image links are answered: `proxy` (this service sends the bytes) or `presigned` (a
    # 307 to a presigned URL of the S3 store, valid for the rest of the link's life).
    IMAGE_LINKS: Literal["proxy", "presigned"] = "proxy"
    # The S3 store's endpoint and credentials (the AWS SDKs' names); empty endpoint: AWS S3.
    AWS_ENDPOINT_URL: str | None = None
    AWS_ACCESS_KEY_ID: str | None = None
    AWS_SECRET_ACCESS_KEY: SecretStr | None = None
    AWS_REGION: str = "us-east-1"
    # Finished jobs older than this are deleted with their images and events (fractions
    # allowed); 0 keeps everything.
    JOB_RETENTION_DAYS: float = Field(30.0, ge=0)
    # Where browsers reach this service, for image URLs; empty: taken from each request.
    PUBLIC_BASE_URL: str | None = None

    # Signs image links; empty: derived from JWT_SECRET_KEY.
    IMAGE_URL_SECRET: SecretStr | None = None
    IMAGE_URL_TTL_SECONDS: int = Field(24 * 60 * 60, ge=1)

    MAX_IMAGES_PER_JOB: int = Field(8, ge=1, le=64)
    MAX_ACTIVE_JOBS_PER_USER: int = Field(4, ge=1)
    SHUTDOWN_GRACE_SECONDS: float = Field(10.0, ge=0)
    GENERATION_MAX_WORKERS: int = Field(16, ge=1, le=256)
    SSE_KEEPALIVE_SECONDS: float = Field(15.0, gt=0)
    # A subscriber that takes longer than this to accept one event is disconnected (it can
    # resume with Last-Event-ID); others never wait for it.
    SSE_SEND_TIMEOUT_SECONDS: float = Field(30.0, gt=0)

    # A module name under app/providers. None: `replicate` when a token is set, else `local`.
    IMAGE_PROVIDER: str | None = None

    REPLICATE_API_TOKEN: SecretStr | None = None
    REPLICATE_MODEL: str = "black-forest-labs/flux-schnell"
    REPLICATE_BASE_URL: str | None = None
    REPLICATE_INPUT: Annotated[dict[str, Any], NoDecode] = {}
    REPLICATE_MAX_RETRIES: int = Field(3, ge=0, le=10)
    REPLICATE_POLL_INTERVAL: float = Field(0.5, gt=0)
    # Hosts a provider's output may be downloaded from (`host` or `host:port`, comma-separated;
    # a host matches its subdomains too). Empty: replicate.delivery, and REPLICATE_BASE_URL's.
    PROVIDER_OUTPUT_HOSTS: Annotated[list[str], NoDecode] = []
    # A provider call that has not finished by then is abandoned (and canceled at Replicate).
    IMAGE_TIMEOUT_SECONDS: float = Field(120.0, gt=0)
    # Prediction creates the whole deployment sends the provider per minute (Replicate's
    # documented limit), and how many may go at once after a quiet spell; 0: unshaped.
    PROVIDER_MAX_CREATES_PER_MINUTE: float = Field(600, ge=0)
    PROVIDER_CREATE_BURST: int = Field(10, ge=1)

    # Scale-out: with a Redis URL, events go through Redis and image work through a queue in
    # PostgreSQL (required), so that several API replicas and `python -m app.worker` processes
    # share the jobs.
    REDIS_URL: str | None = None
    # Every Redis key starts with it, so deployments (or test runs) can share one Redis.
    REDIS_KEY_PREFIX: str = Field("myflix", pattern=r"^[\w.-]{1,64}$")
    # Whether API replicas generate images too; false: only worker processes do.
    RUN_WORK_IN_API: bool = True
    # Where `python -m app.worker` serves /healthz, /readyz and /metrics (on HOST).
    WORKER_METRICS_PORT: int = Field(9101, ge=1, le=65535)
    # An image a worker holds this long without a sign of life is taken over by another.
    WORKER_CLAIM_TIMEOUT_SECONDS: float = Field(30.0, gt=0)
    # Times a worker may take an image (its first, and takeovers after a worker went away)
    # before the image fails: one that kills its worker every time cannot hold its job open.
    IMAGE_MAX_ATTEMPTS: int = Field(3, ge=1, le=100)
    # A job's Redis event stream is kept this long after its last event (PostgreSQL keeps
    # the events for good; a stream that has gone is rebuilt from there).
    REDIS_EVENTS_RETENTION_SECONDS: int = Field(120, ge=1)

    LOCAL_LATENCY_MS: int = Field(800, ge=0)
    LOCAL_LATENCY_JITTER_MS: int = Field(400, ge=0)

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("REPLICATE_MODEL")
    @classmethod
    def _model_reference(cls, value: str) -> str:
        if not _MODEL_REF.fullmatch(value):
            raise ValueError("REPLICATE_MODEL must be owner/name or owner/name:version")
        return value

    @field_validator("CORS_ORIGINS", "FORWARDED_ALLOW_IPS", "PROVIDER_OUTPUT_HOSTS", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("REPLICATE_INPUT", mode="before")
    @classmethod
    def _parse_replicate_input(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"REPLICATE_INPUT must be a JSON object: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError("REPLICATE_INPUT must be a JSON object")
        return value

    @field_validator("DATA_DIR")
    @classmethod
    def _anchor_data_dir(cls, value: Path) -> Path:
        return value if value.is_absolute() else PROJECT_ROOT / value

    @model_validator(mode="after")
    def _check_consistency(self) -> "Settings":
        if self.ENVIRONMENT == "production" and self.uses_placeholder_secret:
            raise ValueError("JWT_SECRET_KEY is the development placeholder; set a real secret in production")
        if self.ENVIRONMENT == "production" and (
            len(self.JWT_SECRET_KEY.get_secret_value().encode()) < MIN_PRODUCTION_SECRET_BYTES
        ):
            raise ValueError(f"JWT_SECRET_KEY must be at least {MIN_PRODUCTION_SECRET_BYTES} bytes in production")
        if self.REDIS_URL is not None and self.database_url.startswith("sqlite"):
            raise ValueError("REDIS_URL runs several processes on one database: set DATABASE_URL to PostgreSQL")
        if self.REDIS_URL is not None and self.uses_placeholder_secret:
            # A key made for one data directory would not be another process's.
            raise ValueError("REDIS_URL runs several processes that share tokens: set JWT_SECRET_KEY")
        for entry in self.PROVIDER_OUTPUT_HOSTS:
            _host_and_port(entry)  # one that is not a host fails at startup, not at a download
        store = self.image_store_location  # an invalid IMAGE_STORE_URL fails here
        if self.IMAGE_LINKS == "presigned" and not isinstance(store, S3Location):
            raise ValueError("IMAGE_LINKS=presigned needs an s3:// IMAGE_STORE_URL: a local directory has no URLs")
        if self.AWS_ENDPOINT_URL is not None and urlsplit(self.AWS_ENDPOINT_URL).scheme not in ("http", "https"):
            raise ValueError("AWS_ENDPOINT_URL must be an http:// or https:// URL")
        return self

    @property
    def image_provider(self) -> str:
        if self.IMAGE_PROVIDER is not None:
            return self.IMAGE_PROVIDER.strip().lower()
        return "replicate" if self.REPLICATE_API_TOKEN is not None else "local"

    @property
    def provider_output_hosts(self) -> list[tuple[str, int | None]]:
        """(host, port or None for any port): where provider outputs may come from."""
        if self.PROVIDER_OUTPUT_HOSTS:
            return [_host_and_port(entry) for entry in self.PROVIDER_OUTPUT_HOSTS]
        hosts: list[tuple[str, int | None]] = [(REPLICATE_DELIVERY_HOST, None)]
        if self.REPLICATE_BASE_URL:
            base = urlsplit(self.REPLICATE_BASE_URL)
            if base.hostname:
                hosts.append((base.hostname, base.port or (443 if base.scheme == "https" else 80)))
        return hosts

    @property
    def seeds_demo_users(self) -> bool:
        return self.ENVIRONMENT == "development" if self.SEED_DEMO_USERS is None else self.SEED_DEMO_USERS

    @property
    def uses_placeholder_secret(self) -> bool:
        return self.JWT_SECRET_KEY.get_secret_value() == PLACEHOLDER_JWT_SECRET

    @property
    def database_url(self) -> str:
        return async_database_url(self.DATABASE_URL or f"sqlite:///{self.DATA_DIR / 'myflix.db'}")

    @property
    def image_store_location(self) -> "Path | S3Location":
        """The local directory, or the S3 bucket and prefix, that IMAGE_STORE_URL names."""
        if self.IMAGE_STORE_URL is not None:
            return parse_image_store_url(self.IMAGE_STORE_URL)
        if self.IMAGE_STORE_DIR is not None:
            return self.IMAGE_STORE_DIR if self.IMAGE_STORE_DIR.is_absolute() else PROJECT_ROOT / self.IMAGE_STORE_DIR
        return self.DATA_DIR / "images"

    @property
    def job_retention_seconds(self) -> float | None:
        """None: jobs are kept for good."""
        return self.JOB_RETENTION_DAYS * 86_400 if self.JOB_RETENTION_DAYS > 0 else None


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without slashes at either end; may be empty

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_image_store_url(url: str) -> "Path | S3Location":
    parts = urlsplit(url.strip())
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ValueError(f"IMAGE_STORE_URL: {url!r} is not a file:///absolute/path URL")
        path = Path(unquote(parts.path))
        return path if path.is_absolute() else PROJECT_ROOT / path
    if parts.scheme == "s3":
        if not _BUCKET_NAME.fullmatch(parts.netloc) or parts.query or parts.fragment:
            raise ValueError(f"IMAGE_STORE_URL: {url!r} is not s3://bucket or s3://bucket/prefix")
        return S3Location(parts.netloc, parts.path.strip("/"))
    raise ValueError(f"IMAGE_STORE_URL: {url!r} must start with file:// or s3://")


def _host_and_port(entry: str) -> tuple[str, int | None]:
    parsed = urlsplit(f"//{entry.strip()}")
    try:
        port = parsed.port
    except ValueError as exc:
        raise ValueError(f"PROVIDER_OUTPUT_HOSTS: {entry!r} has an invalid port") from exc
    if not parsed.hostname or parsed.path or parsed.query or parsed.username:
        raise ValueError(f"PROVIDER_OUTPUT_HOSTS: {entry!r} is not a host or host:port")
    return parsed.hostname, port


def async_database_url(url: str) -> str:
    """The URL with the async driver this service uses: `postgresql://…` works as given."""
    for plain, async_scheme in (
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return async_scheme + url[len(plain) :]
    return url


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_or_exit() -> Settings:
    """The settings, for a command that starts a process; invalid ones end it with status 2
    and the reasons on stderr, without the values (pydantic's own message of an error of the
    whole model shows every setting, secrets too)."""
    try:
        return Settings()
    except ValidationError as exc:
        reasons = [
            f"  {'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
        print("Invalid settings:", *reasons, sep="\n", file=sys.stderr)
        raise SystemExit(2) from None
