"""Jobs shared by API replicas and workers: PostgreSQL is the truth, and a transition is
applied to the job as stored, under its row lock, in one transaction with what it writes.
Writers of one job take turns, each numbering its events after the others'. A transaction
that fails for a passing cause is tried again (app/db/faults.py); no lock is held across
anything but the database."""

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import date, datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import probe_writes
from app.db.faults import WriteHealth, write_retrying
from app.db.repository import Changes, ConflictingWriteError, Repository, StoredJob
from app.services.jobs.domain import Job, JobEvent, Update
from app.services.jobs.interfaces import ActiveJobLimitError, Applied, DailyQuotaError, OwnerLimits, Transition
from app.services.jobs.rows import changes_of, job_from_rows, stored_events

logger = logging.getLogger("myflix.jobs")


class JobWithdrawnError(Exception):
    """The new job's creator gave up on it before it was stored."""


@dataclass
class _Pending:
    transition: Transition
    done: "asyncio.Future[Applied | None]" = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Create:
    withdrawn: bool = False
    stored: "asyncio.Future[bool]" = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ScaledJobStore:
    def __init__(self, repository: Repository, engine: AsyncEngine) -> None:
        self._repository = repository
        self._waiting: dict[str, list[_Pending]] = {}  # job id -> transitions for its next transaction
        self._creates: dict[str, _Create] = {}
        self._batches: dict[str, asyncio.Future[None]] = {}
        self.write_health = WriteHealth(probe=lambda: probe_writes(engine))

    async def start(self) -> None:
        pass

    async def close(self, timeout: float) -> None:
        pass

    def create(self, job: Job, update: Update, limits: OwnerLimits) -> Awaitable[None]:
        create = self._creates[job.id] = _Create()
        creating = asyncio.ensure_future(self._create(job, update, limits, create))
        # A creator that gave up (withdrew the job) no longer looks at how it ended.
        creating.add_done_callback(lambda done: done.cancelled() or done.exception())
        return creating

    async def _create(self, job: Job, update: Update, limits: OwnerLimits, create: _Create) -> None:
        changes = changes_of(job, update)
        try:
            async for attempt in write_retrying(self._failed):
                with attempt:
                    if create.withdrawn:
                        raise JobWithdrawnError(job.id)
                    refused = await self._repository.write_new_job(
                        changes, job.owner, limits.max_unfinished, limits.daily_images
                    )
            if refused is not None:
                if refused.images_left is None:
                    raise ActiveJobLimitError(job.owner)
                raise DailyQuotaError(refused.images_left)
        except IntegrityError as exc:
            create.stored.set_result(False)
            raise ConflictingWriteError(str(exc)) from exc
        except BaseException:
            create.stored.set_result(False)
            raise
        finally:
            self._creates.pop(job.id, None)
        self.write_health.recovered()
        create.stored.set_result(True)

    def withdraw(self, job_id: str) -> Awaitable[bool]:
        create = self._creates.get(job_id)
        if create is None:
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            done.set_result(False)
            return done
        create.withdrawn = True
        return create.stored

    async def apply(self, job_id: str, transition: Transition) -> Applied | None:
        """Transitions of one job that come while its transaction runs here (sixteen images
        finishing together) share the next transaction, in the order they came."""
        pending = _Pending(transition)
        waiting = self._waiting.get(job_id)
        if waiting is not None:
            waiting.append(pending)
        else:
            self._waiting[job_id] = [pending]
            # Whoever starts a job's batch runs it to the end, for every transition that joins.
            self._batches[job_id] = asyncio.ensure_future(self._apply_all(job_id))
        return await pending.done

    async def _apply_all(self, job_id: str) -> None:
        waiting = self._waiting[job_id]
        try:
            while waiting:
                batch = waiting[:]
                del waiting[:]
                await self._apply(job_id, batch)
        finally:
            del self._waiting[job_id]
            self._batches.pop(job_id, None)

    async def _apply(self, job_id: str, batch: list[_Pending]) -> None:
        failures: dict[int, Exception] = {}
        outcome: tuple[Job, list[Update]] | None = None

        def change(stored: StoredJob) -> tuple[tuple[Job, list[Update]], Changes]:
            failures.clear()
            job = job_from_rows(stored)
            updates = []
            for n, pending in enumerate(batch):
                try:
                    updates.append(pending.transition(job) or Update())
                except Exception as exc:  # that caller's error (say, a cancel too late); not the others'
                    failures[n] = exc
                    updates.append(Update())
            whole = Update()
            for update in updates:
                whole.add(update)
            return (job, updates), changes_of(job, whole)

        try:
            async for attempt in write_retrying(self._failed):
                with attempt:
                    outcome = await self._repository.update_job(job_id, change)
        except Exception as exc:
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(exc)
            return
        self.write_health.recovered()
        for n, pending in enumerate(batch):
            if pending.done.done():
                continue
            if n in failures:
                pending.done.set_exception(failures[n])
            else:
                pending.done.set_result(None if outcome is None else Applied(outcome[0], outcome[1][n]))

    async def images_used(self, owner: str, day: date) -> int:
        return await self._repository.images_used(owner, day)

    async def get(self, job_id: str) -> Job | None:
        stored = await self._repository.get_job(job_id, database_time=True)
        return None if stored is None else job_from_rows(stored)

    async def page(self, owner: str, limit: int, before: tuple[datetime, str] | None) -> list[Job]:
        return [job_from_rows(s) for s in await self._repository.list_jobs(owner, limit, before)]

    async def unfinished(self) -> list[Job]:
        return [job_from_rows(s) for s in await self._repository.unfinished_jobs(database_time=True)]

    async def find_idempotent(self, owner: str, key: str) -> Job | None:
        row = await self._repository.find_by_idempotency_key(owner, key)
        return None if row is None else await self.get(row.id)

    async def events(self, job_id: str, after_id: int = 0) -> list[JobEvent]:
        return stored_events(await self._repository.events(job_id, after_id))

    async def expired(self, finished_before: datetime, limit: int) -> list[Job]:
        return [job_from_rows(stored) for stored in await self._repository.expired_jobs(finished_before, limit)]

    async def delete(self, job_ids: list[str]) -> None:
        async for attempt in write_retrying(self._failed):
            with attempt:
                await self._repository.write(Changes(deleted_jobs=job_ids))
        self.write_health.recovered()

    def _failed(self, exc: BaseException) -> None:
        self.write_health.failed(exc)
