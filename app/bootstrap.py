"""What every process of the service builds at start: the database, the image store, the
provider, and the way jobs run (in this process alone, or across processes over Redis)."""

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.config import Settings
from app.core.metrics import Metrics
from app.core.security import ImageUrlSigner, derive_key
from app.db.engine import create_engine, create_sessionmaker
from app.db.migrate import upgrade_database
from app.db.repository import Repository
from app.providers import create_provider
from app.services.image_maker import ImageMaker
from app.services.image_store import LocalImageStore
from app.services.job_state import JobRecorder
from app.services.redis_streams import RedisLink
from app.services.scaled_service import ImageWorker, ScaledJobs


@dataclass
class Components:
    engine: AsyncEngine
    repository: Repository
    image_store: LocalImageStore
    signer: ImageUrlSigner
    metrics: Metrics
    image_maker: ImageMaker


def image_url_secret(settings: Settings) -> bytes:
    if settings.IMAGE_URL_SECRET is not None:
        return settings.IMAGE_URL_SECRET.get_secret_value().encode()
    return derive_key(settings.JWT_SECRET_KEY.get_secret_value(), "image-urls")


async def open_components(settings: Settings) -> Components:
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.database_url)
    await upgrade_database(engine)
    image_store = LocalImageStore(settings.image_store_dir)
    return Components(
        engine=engine,
        repository=Repository(create_sessionmaker(engine)),
        image_store=image_store,
        signer=ImageUrlSigner(image_url_secret(settings), settings.IMAGE_URL_TTL_SECONDS),
        metrics=Metrics(),
        image_maker=ImageMaker(create_provider(settings), image_store),
    )


def scaled_jobs(settings: Settings, components: Components) -> ScaledJobs:
    provider = components.image_maker.provider
    return ScaledJobs(
        repository=components.repository,
        recorder=JobRecorder(provider.name, provider.model, components.signer, components.metrics),
        link=RedisLink(settings.REDIS_URL, settings.REDIS_KEY_PREFIX),
        claim_timeout_seconds=settings.WORKER_CLAIM_TIMEOUT_SECONDS,
        events_retention_seconds=settings.REDIS_EVENTS_RETENTION_SECONDS,
    )


def image_worker(settings: Settings, components: Components, jobs: ScaledJobs) -> ImageWorker:
    return ImageWorker(
        jobs=jobs,
        image_maker=components.image_maker,
        metrics=components.metrics,
        max_workers=settings.GENERATION_MAX_WORKERS,
        claim_timeout_seconds=settings.WORKER_CLAIM_TIMEOUT_SECONDS,
        image_timeout_seconds=settings.IMAGE_TIMEOUT_SECONDS,
        shutdown_grace_seconds=settings.SHUTDOWN_GRACE_SECONDS,
    )
