"""What every process of the service builds at start: the database, the image store, the
provider, and the job engine — its store, event bus and work queue in this process alone, or
shared with other processes over PostgreSQL and Redis when REDIS_URL is set."""

import gc
import logging
import os
import secrets
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.config import S3Location, Settings
from app.core.metrics import Metrics
from app.core.redis_link import RedisLink
from app.core.security import ImageUrlSigner, derive_key
from app.db.accounts import AccountRepository
from app.db.engine import PostgresLimits, create_engine, create_sessionmaker
from app.db.migrate import upgrade_database
from app.db.repository import Repository
from app.providers import create_provider
from app.providers.downloads import ImageFetcher
from app.services.health_service import HealthService
from app.services.image_store import ImageStore, ImageStoreError, LocalImageStore
from app.services.image_store_s3 import S3ImageStore
from app.services.jobs.create_budget import CreateBudget, InProcessCreateBudget, RedisCreateBudget, TokenBucket
from app.services.jobs.events_inprocess import InProcessEventBus
from app.services.jobs.events_redis import RedisEventBus
from app.services.jobs.image_maker import ImageMaker
from app.services.jobs.interfaces import EventBus, JobStore, WorkQueue
from app.services.jobs.queue_inprocess import InProcessWorkQueue
from app.services.jobs.queue_postgres import PostgresWorkQueue
from app.services.jobs.recorder import JobRecorder
from app.services.jobs.runner import ImageRunner
from app.services.jobs.service import JobService
from app.services.jobs.store_inprocess import InProcessJobStore
from app.services.jobs.store_scaled import ScaledJobStore
from app.services.shared_settings import SharedSettings, shared_values


@dataclass
class Components:
    engine: AsyncEngine
    repository: Repository
    accounts: AccountRepository
    image_store: ImageStore
    signer: ImageUrlSigner
    metrics: Metrics
    image_maker: ImageMaker
    redis: RedisLink | None
    shared_settings: SharedSettings | None = None

    async def close(self) -> None:
        if self.shared_settings is not None:
            await self.shared_settings.close()
        if self.redis is not None:
            await self.redis.close()
        await self.image_store.close()
        await self.engine.dispose()


logger = logging.getLogger("myflix")


class ImageStoreUnusableError(Exception):
    """The image store failed its probe at start."""


def image_store_for(settings: Settings) -> ImageStore:
    location = settings.image_store_location
    return s3_image_store(location, settings) if isinstance(location, S3Location) else LocalImageStore(location)


def s3_image_store(location: S3Location, settings: Settings) -> S3ImageStore:
    """A bucket, reached with the AWS_* settings."""
    secret = settings.AWS_SECRET_ACCESS_KEY
    return S3ImageStore(
        location,
        endpoint_url=settings.AWS_ENDPOINT_URL,
        access_key_id=settings.AWS_ACCESS_KEY_ID,
        secret_access_key=secret.get_secret_value() if secret is not None else None,
        region=settings.AWS_REGION,
    )


async def open_image_store(settings: Settings) -> ImageStore:
    """The store, once it has taken a probe object and given it back: a store that cannot be
    written is found before the process takes work, not at its first image."""
    if settings.IMAGE_STORE_DIR is not None and settings.IMAGE_STORE_URL is None:
        logger.warning("IMAGE_STORE_DIR is deprecated: set IMAGE_STORE_URL=file://<absolute path> instead")
    store = image_store_for(settings)
    try:
        await store.probe()
    except ImageStoreError as exc:
        await store.close()
        raise ImageStoreUnusableError(f"The image store {store.url} is {exc}") from exc
    if not store.shared and settings.REDIS_URL is not None:
        logger.warning(
            "The image store is a local directory (%s) while REDIS_URL scales the service out: "
            "replicas on other machines will not see its images; set IMAGE_STORE_URL=s3://...",
            store.url,
        )
    return store


# With no JWT_SECRET_KEY in development, the key made for this data directory (never the
# published placeholder, which would let anyone sign tokens).
KEPT_JWT_SECRET_FILE = "jwt-secret"


def freeze_startup_objects() -> None:
    """What a process has made by the end of its start lives as long as it does: moved out of
    the garbage collector's sight, so that a full collection in a burst of requests does not
    walk all of it (a pause that held up the burst's first images). Garbage is collected first,
    so that none of it is kept for good (a test process starts many apps)."""
    gc.collect()
    gc.freeze()


def jwt_secret(settings: Settings) -> str:
    if not settings.uses_placeholder_secret:
        return settings.JWT_SECRET_KEY.get_secret_value()
    path = settings.DATA_DIR / KEPT_JWT_SECRET_FILE
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made before, maybe by another process on this directory
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as kept:
        kept.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def image_url_secret(settings: Settings) -> bytes:
    if settings.IMAGE_URL_SECRET is not None:
        return settings.IMAGE_URL_SECRET.get_secret_value().encode()
    return derive_key(jwt_secret(settings), "image-urls")


def postgres_limits(settings: Settings) -> PostgresLimits:
    return PostgresLimits(
        pool_size=settings.DB_POOL_SIZE,
        lock_timeout_seconds=settings.DB_LOCK_TIMEOUT_SECONDS,
        statement_timeout_seconds=settings.DB_STATEMENT_TIMEOUT_SECONDS,
        idle_in_transaction_timeout_seconds=settings.DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS,
    )


async def open_components(settings: Settings) -> Components:
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        settings.database_url,
        postgres_limits(settings),
    )
    await upgrade_database(engine)
    try:
        image_store = await open_image_store(settings)
    except BaseException:
        await engine.dispose()
        raise
    url_secret = image_url_secret(settings)
    sessionmaker = create_sessionmaker(engine)
    components = Components(
        engine=engine,
        repository=Repository(engine),
        accounts=AccountRepository(sessionmaker),
        image_store=image_store,
        signer=ImageUrlSigner(url_secret, settings.IMAGE_URL_TTL_SECONDS),
        metrics=Metrics(),
        image_maker=ImageMaker(create_provider(settings), image_store, ImageFetcher(settings.provider_output_hosts)),
        redis=RedisLink(settings.REDIS_URL, settings.REDIS_KEY_PREFIX) if settings.REDIS_URL else None,
    )
    if components.redis is not None:
        components.shared_settings = SharedSettings(components.redis, shared_values(settings, url_secret))
        try:
            await components.shared_settings.join()
        except BaseException:
            await components.close()
            raise
    return components


def job_service(settings: Settings, components: Components, makes_images: bool) -> JobService:
    """The job engine of this process; `makes_images`: whether it runs an image runner."""
    store: JobStore
    events: EventBus
    queue: WorkQueue
    shaped = settings.PROVIDER_MAX_CREATES_PER_MINUTE > 0 and components.image_maker.provider.limits_creates
    budget: CreateBudget | None = None
    if components.redis is None:
        in_process = InProcessJobStore(components.repository, components.engine)
        store, events = in_process, InProcessEventBus(in_process.events)
        bucket = (
            TokenBucket(settings.PROVIDER_MAX_CREATES_PER_MINUTE, settings.PROVIDER_CREATE_BURST) if shaped else None
        )
        budget = InProcessCreateBudget(bucket) if bucket is not None else None
        queue = InProcessWorkQueue(settings.GENERATION_MAX_WORKERS, bucket)
    else:
        scaled = ScaledJobStore(components.repository, components.engine)
        store = scaled
        events = RedisEventBus(components.redis, settings.REDIS_EVENTS_RETENTION_SECONDS, scaled.events)
        claim_timeout = settings.WORKER_CLAIM_TIMEOUT_SECONDS
        if shaped:
            budget = RedisCreateBudget(
                components.redis, settings.PROVIDER_MAX_CREATES_PER_MINUTE, settings.PROVIDER_CREATE_BURST
            )
        queue = PostgresWorkQueue(settings.database_url, postgres_limits(settings), claim_timeout, budget)
    recorder = JobRecorder(store, events, components.metrics)
    runner = (
        ImageRunner(
            store,
            queue,
            recorder,
            components.image_maker,
            components.metrics,
            max_workers=settings.GENERATION_MAX_WORKERS,
            image_timeout_seconds=settings.IMAGE_TIMEOUT_SECONDS,
            max_attempts=settings.IMAGE_MAX_ATTEMPTS,
            shutdown_grace_seconds=settings.SHUTDOWN_GRACE_SECONDS,
            create_budget=budget,
        )
        if makes_images
        else None
    )
    provider = components.image_maker.provider
    return JobService(
        store,
        events,
        queue,
        recorder,
        components.metrics,
        runner,
        provider=(provider.name, provider.model),
        max_images_per_job=settings.MAX_IMAGES_PER_JOB,
        max_active_jobs_per_user=settings.MAX_ACTIVE_JOBS_PER_USER,
        write_timeout_seconds=settings.DB_WRITE_TIMEOUT_SECONDS,
        sweep_interval_seconds=settings.WORKER_CLAIM_TIMEOUT_SECONDS,
        image_store=components.image_store,
        retention_seconds=settings.job_retention_seconds,
    )


def health_service(components: Components, service: JobService) -> HealthService:
    """What this process's /readyz checks."""
    return HealthService(
        components.engine,
        write_failure=lambda: service.write_failure,
        image_store=components.image_store,
        provider=components.image_maker.provider,
        metrics=components.metrics,
        queue_depth=service.queue_depth,
        redis=components.redis,
        work_queue_failure=(lambda: service.work_queue_failure) if components.redis is not None else None,
    )
