"""Jobs kept by this process alone: unfinished jobs live in memory, where a transition is
applied at once, and every change is written through the journal, which commits them in
batches and never drops one. Finished jobs are read from the database."""

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, date, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import probe_writes
from app.db.faults import WriteHealth
from app.db.journal import Journal
from app.db.repository import Changes, Repository
from app.services.jobs.domain import Job, JobEvent, Update
from app.services.jobs.interfaces import ActiveJobLimitError, Applied, DailyQuotaError, OwnerLimits, Transition
from app.services.jobs.rows import changes_of, job_from_rows, stored_events, usage_day

logger = logging.getLogger("myflix.jobs")


class InProcessJobStore:
    def __init__(self, repository: Repository, engine: AsyncEngine) -> None:
        self._repository = repository
        self.write_health = WriteHealth(probe=lambda: probe_writes(engine))
        self._journal = Journal(engine, self.write_health)
        self._live: dict[str, Job] = {}  # unfinished jobs, and finished ones until stored
        self._keys: dict[tuple[str, str], Job] = {}  # live jobs by (owner, Idempotency-Key)
        # Kept with _live, so that a new job's limit check does not walk every live job.
        self._unfinished_per_owner: Counter[str] = Counter()
        # Images per (owner, UTC day), kept with every write: this process is the database's
        # only writer, so a day it has not loaded or written starts at none.
        self._usage: Counter[tuple[str, date]] = Counter()

    async def start(self) -> None:
        self._journal.start()
        today = usage_day(datetime.now(UTC))
        for owner, images in (await self._repository.usage_on(today)).items():
            self._usage[(owner, today)] = images
        for stored in await self._repository.unfinished_jobs():
            self._hold(job_from_rows(stored))

    async def close(self, timeout: float) -> None:
        await self._journal.close(timeout)

    def create(self, job: Job, update: Update, limits: OwnerLimits) -> Awaitable[None]:
        used = self._usage[(job.owner, usage_day(job.created_at))]
        refusal: Exception | None = None
        if self._unfinished_per_owner[job.owner] >= limits.max_unfinished:
            refusal = ActiveJobLimitError(job.owner)
        elif limits.daily_images is not None and used + job.num_images > limits.daily_images:
            refusal = DailyQuotaError(max(0, limits.daily_images - used))
        if refusal is not None:
            refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            refused.set_exception(refusal)
            return refused
        # Counted at once: the next request's check, on this event loop, sees this job.
        self._hold(job)
        self._count_usage(job, job.num_images)
        committed = self._journal.write(changes_of(job, update), job.id)
        committed.add_done_callback(
            lambda future: self._release(job) if future.cancelled() or future.exception() else None
        )
        return committed

    def withdraw(self, job_id: str) -> Awaitable[bool]:
        committed = self._journal.withdraw(job_id)
        job = self._live.get(job_id)
        if job is not None:
            self._release(job)
        return committed

    async def apply(self, job_id: str, transition: Transition) -> Applied | None:
        job = self._live.get(job_id)
        if job is None:  # finished, withdrawn, or none: as stored, numbering after its events
            stored = await self._repository.get_job(job_id, so_far=True)
            if stored is None:
                return None
            job = job_from_rows(stored)
        was_finished = job.finished
        update = transition(job) or Update()
        if not (update.events or update.images or update.job_changed):
            return Applied(job, update)
        if job_id in self._live:  # else not counted (a withdrawn job, committed after all)
            if update.closes and not was_finished:
                self._unfinished_per_owner[job.owner] -= 1  # its slot is free at once
            self._count_usage(job, -update.given_back)
        committed = self._journal.write(changes_of(job, update), job_id)
        if update.closes:
            committed.add_done_callback(lambda _: self._forget(job))
        await committed
        return Applied(job, update)

    async def images_used(self, owner: str, day: date) -> int:
        return self._usage[(owner, day)]

    async def get(self, job_id: str) -> Job | None:
        job = self._live.get(job_id)
        if job is not None:
            return job
        stored = await self._repository.get_job(job_id)
        return None if stored is None else job_from_rows(stored)

    async def page(self, owner: str, limit: int, before: tuple[datetime, str] | None) -> list[Job]:
        return [
            self._live.get(s.job.id) or job_from_rows(s) for s in await self._repository.list_jobs(owner, limit, before)
        ]

    async def unfinished(self) -> list[Job]:
        return [job for job in self._live.values() if not job.finished]

    async def find_idempotent(self, owner: str, key: str) -> Job | None:
        # A job whose insert is on its way is found before it is stored.
        job = self._keys.get((owner, key))
        if job is not None:
            return job
        row = await self._repository.find_by_idempotency_key(owner, key)
        return None if row is None else await self.get(row.id)

    async def events(self, job_id: str, after_id: int = 0) -> list[JobEvent]:
        return stored_events(await self._repository.events(job_id, after_id))

    async def expired(self, finished_before: datetime, limit: int) -> list[Job]:
        return [job_from_rows(stored) for stored in await self._repository.expired_jobs(finished_before, limit)]

    async def delete(self, job_ids: list[str]) -> None:
        await self._journal.write(Changes(deleted_jobs=job_ids))
        for job_id in job_ids:
            job = self._live.get(job_id)
            if job is not None:
                self._forget(job)

    def _hold(self, job: Job) -> None:
        self._live[job.id] = job
        if job.idempotency_key is not None:
            self._keys[(job.owner, job.idempotency_key)] = job
        if not job.finished:
            self._unfinished_per_owner[job.owner] += 1

    def _release(self, job: Job) -> None:
        """The job was never stored: forget it, and free its slot and its images."""
        if self._live.pop(job.id, None) is not None and not job.finished:
            self._unfinished_per_owner[job.owner] -= 1
            self._count_usage(job, -job.num_images)
        self._forget_key(job)

    def _count_usage(self, job: Job, images: int) -> None:
        if images:
            self._usage[(job.owner, usage_day(job.created_at))] += images

    def _forget(self, job: Job) -> None:
        """The job has ended and is stored: from now on it is read from the database."""
        self._live.pop(job.id, None)
        self._forget_key(job)

    def _forget_key(self, job: Job) -> None:
        if job.idempotency_key is not None:
            self._keys.pop((job.owner, job.idempotency_key), None)
