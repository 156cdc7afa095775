"""Bring the schema to the newest Alembic revision; called at start."""

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.config import PROJECT_ROOT

# Any number; the same in every process of the deployment.
_MIGRATION_LOCK = 7_301_954


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # API replicas and workers start together: one migrates, the others wait for it.
        connection.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"))
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def upgrade_database(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)
