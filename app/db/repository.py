"""Queries and writes over the storage models. Reads open their own session; writes take the
journal's session, so that they commit in its batches. The two writes on every job's and
every image's path in the scaled-out deployment (`write_new_job`, `update_job`) run Core
statements on a connection: through the ORM's session each statement costs several times
the client CPU."""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    Connection,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from app.db.engine import create_sessionmaker
from app.db.tables import DailyUsageRow, EventRow, ImageRow, JobRow

UNFINISHED_JOB_STATUSES = ("queued", "running")
Result = TypeVar("Result")


class ConflictingWriteError(Exception):
    """The write broke a constraint; nothing of it was stored."""


@dataclass(frozen=True)
class AdmissionRefused:
    """A new job was not written: its owner has too many unfinished jobs (`images_left` None),
    or too few images left today for it."""

    images_left: int | None


class _Refused(Exception):
    def __init__(self, admission: AdmissionRefused) -> None:
        self.admission = admission


@dataclass(frozen=True)
class EventsSoFar:
    """What a job's stored events say: the last one's id, and the TTFI of the first image that
    succeeded (a `progress` event's `elapsed_ms`), if any did."""

    last_id: int
    ttfi_ms: float | None


@dataclass
class StoredJob:
    job: JobRow | Row[Any]  # the storage model, or a Core row of its table
    images: list[ImageRow]
    # The database's clock when the job was read, where the job's age is to be taken from it.
    database_now: datetime | None = None
    # Where the job is to be changed: what its stored events say, read with it.
    so_far: EventsSoFar | None = None


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Repository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessionmaker = create_sessionmaker(engine)

    # Jobs -------------------------------------------------------------------------------

    async def get_job(self, job_id: str, database_time: bool = False, so_far: bool = False) -> StoredJob | None:
        """`database_time`: with the database's clock (see `write_new_job`); `so_far`: with
        what its stored events say."""
        async with self._sessionmaker() as session:
            if so_far:
                found = (
                    await session.execute(_with_events_so_far(self._engine.dialect.name).where(JobRow.id == job_id))
                ).one_or_none()
                if found is None:
                    return None
                job, events_so_far = found[0], _events_so_far(found)
            else:
                job, events_so_far = await session.get(JobRow, job_id), None
                if job is None:
                    return None
            images = (await self._images_of(session, [job_id]))[job_id]
            now = await _database_now(session) if database_time else None
        # Two reads, not one snapshot: a job without images was deleted between them.
        return StoredJob(job, images, now, events_so_far) if images else None

    async def find_by_idempotency_key(self, owner_email: str, key: str) -> JobRow | None:
        async with self._sessionmaker() as session:
            return await session.scalar(
                select(JobRow).where(JobRow.owner_email == owner_email, JobRow.idempotency_key == key)
            )

    async def list_jobs(self, owner_email: str, limit: int, before: tuple[datetime, str] | None) -> list[StoredJob]:
        """The owner's jobs, newest first, strictly after the `before` (created_at, id) key."""
        query = select(JobRow).where(JobRow.owner_email == owner_email)
        if before is not None:
            created_at, job_id = before
            query = query.where(
                or_(JobRow.created_at < created_at, and_(JobRow.created_at == created_at, JobRow.id < job_id))
            )
        query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit)
        async with self._sessionmaker() as session:
            jobs = list((await session.scalars(query)).all())
            images = await self._images_of(session, [job.id for job in jobs])
        return _with_images(jobs, images)

    async def unfinished_jobs(self, database_time: bool = False) -> list[StoredJob]:
        """With what their stored events say (see `get_job`)."""
        async with self._sessionmaker() as session:
            found = (
                await session.execute(
                    _with_events_so_far(self._engine.dialect.name)
                    .where(JobRow.status.in_(UNFINISHED_JOB_STATUSES))
                    .order_by(JobRow.created_at)
                )
            ).all()
            images = await self._images_of(session, [row[0].id for row in found])
            now = await _database_now(session) if database_time else None
        # A job without images was deleted between the two reads.
        return [StoredJob(row[0], images[row[0].id], now, _events_so_far(row)) for row in found if images[row[0].id]]

    async def events(self, job_id: str, after_id: int = 0) -> list[EventRow]:
        async with self._sessionmaker() as session:
            return list(
                (
                    await session.scalars(
                        select(EventRow).where(EventRow.job_id == job_id, EventRow.id > after_id).order_by(EventRow.id)
                    )
                ).all()
            )

    async def expired_jobs(self, finished_before: datetime, limit: int) -> list[StoredJob]:
        query = (
            select(JobRow)
            .where(JobRow.finished_at < finished_before, JobRow.status.not_in(UNFINISHED_JOB_STATUSES))
            .order_by(JobRow.finished_at)
            .limit(limit)
        )
        async with self._sessionmaker() as session:
            jobs = list((await session.scalars(query)).all())
            images = await self._images_of(session, [job.id for job in jobs])
        return _with_images(jobs, images)

    async def write_new_job(
        self, changes: "Changes", owner_email: str, max_unfinished: int, daily_images: int | None
    ) -> "AdmissionRefused | None":
        """Write the new job's `changes` unless its owner has `max_unfinished` unfinished jobs,
        or its images (`changes.usage`: the owner's day) would take them past `daily_images`;
        None when it was written. Admissions of one owner take turns (a transaction-scoped
        advisory lock on PostgreSQL), so that concurrent ones in any process count each other.
        The rows go in before the turn is taken, so that a turn lasts three round trips (the
        lock, the count, the day's images added and read back) and the commit: a burst of one
        owner's jobs is admitted at the pace of those, not of every insert."""
        (charge,) = changes.usage
        (job,) = changes.jobs
        dialect = self._engine.dialect.name
        if dialect == "postgresql":
            # Ages are taken from the database's clock, the one every process shares: a
            # process whose own clock is off by seconds would give negative TTFIs.
            job = {**job, "created_at": func.clock_timestamp()}
        try:
            async with self._engine.begin() as connection:
                await connection.execute(insert(_JOBS).values(job))
                await _apply(connection, replace(changes, jobs=[], usage=[]))
                if dialect == "postgresql":
                    await connection.execute(select(func.pg_advisory_xact_lock(func.hashtext(owner_email))))
                unfinished = await connection.scalar(
                    select(func.count())
                    .select_from(_JOBS)
                    .where(
                        _JOBS.c.owner_email == owner_email,
                        _JOBS.c.status.in_(UNFINISHED_JOB_STATUSES),
                        _JOBS.c.id != job["id"],
                    )
                )
                if (unfinished or 0) >= max_unfinished:
                    raise _Refused(AdmissionRefused(images_left=None))
                used = await connection.scalar(_add_usage(dialect).returning(_USAGE.c.images), charge) or 0
                if daily_images is not None and used > daily_images:
                    raise _Refused(AdmissionRefused(images_left=max(0, daily_images - (used - charge["images"]))))
        except _Refused as refused:  # rolled back: nothing of the job was stored
            return refused.admission
        return None

    # Usage ------------------------------------------------------------------------------

    async def images_used(self, email: str, day: date) -> int:
        async with self._sessionmaker() as session:
            used = await session.scalar(
                select(DailyUsageRow.images).where(DailyUsageRow.user_email == email, DailyUsageRow.day == day)
            )
        return used or 0

    async def usage_on(self, day: date) -> dict[str, int]:
        """Every user's images of `day`."""
        async with self._sessionmaker() as session:
            rows = (
                await session.execute(
                    select(DailyUsageRow.user_email, DailyUsageRow.images).where(DailyUsageRow.day == day)
                )
            ).all()
        return {row.user_email: row.images for row in rows}

    # Writes of the scaled-out deployment, each its own transaction -------------------------

    async def update_job(
        self, job_id: str, change: Callable[[StoredJob], tuple[Result, "Changes | None"]]
    ) -> Result | None:
        """Run `change` on the job (with the database's clock and what its stored events say)
        while holding the job's row lock, and write the changes it returns in the same
        transaction: concurrent writers of one job take turns, so each sees the others' events
        and numbers its own after them. None: no job."""
        async with self._engine.begin() as connection:
            found = (await connection.execute(_LOCKED_JOB, {"job_id": job_id})).one_or_none()
            if found is None:
                return None
            rows = (
                await connection.execute(_images_and_events_so_far(self._engine.dialect.name), {"job_id": job_id})
            ).all()
            if not rows:
                return None  # being deleted: its images went first
            # As models: a Core row's `index` is the tuple's method, not the column.
            images = [ImageRow(**{column.name: row._mapping[column] for column in _IMAGES.c}) for row in rows]
            result, changes = change(StoredJob(found, images, found.database_now, _events_so_far(rows[0])))
            if changes is not None:
                await _apply(connection, changes)
        return result

    async def write(self, changes: "Changes") -> None:
        async with self._sessionmaker.begin() as session:
            await session.run_sync(lambda sync_session: Repository.apply(sync_session.connection(), [changes]))

    @staticmethod
    async def _images_of(session: AsyncSession, job_ids: Sequence[str]) -> dict[str, list[ImageRow]]:
        found: dict[str, list[ImageRow]] = {job_id: [] for job_id in job_ids}
        if job_ids:
            rows = await session.scalars(
                select(ImageRow).where(ImageRow.job_id.in_(job_ids)).order_by(ImageRow.job_id, ImageRow.index)
            )
            for row in rows:
                found[row.job_id].append(row)
        return found

    # Writes, inside the journal's transaction (blocking: it runs in the journal's thread, or
    # in `run_sync` on an async connection) --------------------------------------------------

    @staticmethod
    def apply(connection: Connection, batch: list["Changes"]) -> None:
        """Everything in `batch`, one statement per kind, in an order the foreign keys allow.
        States are whole rows' worth of columns, so the last state of a row in the batch wins.
        Core statements, not the ORM's bulk ones, which cost far more CPU on every event's path."""
        tables: tuple[tuple[Table, list[dict[str, Any]]], ...] = (
            (_JOBS, [row for changes in batch for row in changes.jobs]),
            (_IMAGES, [row for changes in batch for row in changes.images]),
            (_EVENTS, [row for changes in batch for row in changes.events]),
        )
        for table, rows in tables:
            if rows:
                connection.execute(insert(table), rows)
        for table, states in (
            (_IMAGES, _last_per_key(batch, "image_states", ("job_id", "index"))),
            (_JOBS, _last_per_key(batch, "job_states", ("id",))),
        ):
            if states:
                connection.execute(_UPDATE_BY_KEY[table], [_keyed(table, state) for state in states])
        usage: dict[tuple[str, date], int] = {}
        for changes in batch:
            for change in changes.usage:
                key = (change["user_email"], change["day"])
                usage[key] = usage.get(key, 0) + change["images"]
        if usage:
            rows = [{"user_email": email, "day": day, "images": images} for (email, day), images in usage.items()]
            connection.execute(_add_usage(connection.dialect.name), rows)
        deleted = [job_id for changes in batch for job_id in changes.deleted_jobs]
        if deleted:
            # Children first, as the foreign keys require.
            for table, column in ((_EVENTS, _EVENTS.c.job_id), (_IMAGES, _IMAGES.c.job_id), (_JOBS, _JOBS.c.id)):
                connection.execute(delete(table).where(column.in_(deleted)))


async def _database_now(session: AsyncSession) -> datetime | None:
    """The database's clock; None on SQLite (one process, whose clock is the only one)."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    return await session.scalar(select(func.clock_timestamp()))


def _events_so_far(found: Row[Any]) -> EventsSoFar:
    """From a row of `_with_events_so_far` or `_images_and_events_so_far`."""
    return EventsSoFar(last_id=found.last_event_id, ttfi_ms=found.events_ttfi_ms)


async def _apply(connection: AsyncConnection, changes: "Changes") -> None:
    await connection.run_sync(lambda sync_connection: Repository.apply(sync_connection, [changes]))


def _with_images(jobs: list[JobRow], images: dict[str, list[ImageRow]]) -> list[StoredJob]:
    # A job without images was deleted between the two reads.
    return [StoredJob(job, images[job.id]) for job in jobs if images[job.id]]


@dataclass
class Changes:
    """Rows to insert and row states to set, written together by the journal."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    image_states: list[dict[str, Any]] = field(default_factory=list)  # primary key + every state column
    job_states: list[dict[str, Any]] = field(default_factory=list)  # likewise
    deleted_jobs: list[str] = field(default_factory=list)  # removed with their images and events, last
    # (user_email, day, images): added to the user's images of that day.
    usage: list[dict[str, Any]] = field(default_factory=list)


# The primary key's values go in as `key_<column>`, so that they find the row and are not set.
_KEY_PREFIX = "key_"
_JOBS = cast(Table, JobRow.__table__)
_IMAGES = cast(Table, ImageRow.__table__)
_EVENTS = cast(Table, EventRow.__table__)
_USAGE = cast(Table, DailyUsageRow.__table__)
_UPDATE_BY_KEY = {
    table: update(table).where(and_(*(column == bindparam(_KEY_PREFIX + column.name) for column in table.primary_key)))
    for table in (_IMAGES, _JOBS)
}


def _events_so_far_of(job_id: Any, dialect: str) -> tuple[Any, Any]:
    """The last id and the TTFI of the stored events of the job `job_id` names (a column or a
    parameter), worked out by the database."""
    # PostgreSQL reads a text column as JSON through a cast; SQLite's JSON functions read the
    # text as it is (there, a cast to JSON makes a number of it).
    data = sql_cast(_EVENTS.c.data, JSON) if dialect == "postgresql" else type_coerce(_EVENTS.c.data, JSON)
    return (
        select(func.coalesce(func.max(_EVENTS.c.id), 0))
        .where(_EVENTS.c.job_id == job_id)
        .scalar_subquery()
        .label("last_event_id"),
        select(func.min(data["elapsed_ms"].as_float()))
        .where(
            _EVENTS.c.job_id == job_id,
            _EVENTS.c.name == "progress",
            data["status"].as_string() == "succeeded",
        )
        .scalar_subquery()
        .label("events_ttfi_ms"),
    )


@functools.cache
def _with_events_so_far(dialect: str) -> Select[Any]:
    return select(JobRow, *_events_so_far_of(JobRow.id, dialect))


_LOCKED_JOB = (
    select(_JOBS, func.clock_timestamp().label("database_now"))
    .where(_JOBS.c.id == bindparam("job_id"))
    .with_for_update()
)


@functools.cache
def _images_and_events_so_far(dialect: str) -> Select[Any]:
    """Read after the lock, in a statement of its own: a statement that waited for the lock
    sees the locked row as its holder committed it, but everything else as it was when it
    began."""
    return (
        select(_IMAGES, *_events_so_far_of(bindparam("job_id"), dialect))
        .where(_IMAGES.c.job_id == bindparam("job_id"))
        .order_by(_IMAGES.c.index)
    )


@functools.cache  # built once per dialect: it is on every admission's path
def _add_usage(dialect: str) -> Any:
    """INSERT … ON CONFLICT DO UPDATE adding to the day's count: one statement, atomic."""
    insert_of = postgresql_insert if dialect == "postgresql" else sqlite_insert
    statement = insert_of(_USAGE)
    return statement.on_conflict_do_update(
        index_elements=[_USAGE.c.user_email, _USAGE.c.day],
        set_={"images": _USAGE.c.images + statement.excluded.images},
    )


def _keyed(table: Table, state: dict[str, Any]) -> dict[str, Any]:
    keys = table.primary_key.columns
    return {(_KEY_PREFIX + name if name in keys else name): value for name, value in state.items()}


def _last_per_key(batch: list[Changes], kind: str, key: tuple[str, ...]) -> list[dict[str, Any]]:
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for changes in batch:
        for state in getattr(changes, kind):
            latest[tuple(state[k] for k in key)] = state
    return list(latest.values())
