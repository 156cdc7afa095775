"""Every change of a job takes one way: applied and stored by the store, then published by
the event bus, then counted. The service and the image runner both record through it."""

from app.core.metrics import Metrics
from app.services.jobs.domain import Job, Update
from app.services.jobs.interfaces import Applied, EventBus, JobStore, Transition


class JobRecorder:
    def __init__(self, store: JobStore, events: EventBus, metrics: Metrics) -> None:
        self._store = store
        self._events = events
        self._metrics = metrics

    async def record(self, job_id: str, transition: Transition) -> Applied | None:
        """Apply and store `transition`, then send its events; None when there is no such job."""
        applied = await self._store.apply(job_id, transition)
        if applied is not None:
            await self.publish(applied.job, applied.update)
        return applied

    async def publish(self, job: Job, update: Update) -> None:
        """Send the events of a stored update, and count what it finished."""
        await self._events.publish(job.id, update.events)
        self._count(job, update)

    def _count(self, job: Job, update: Update) -> None:
        for index in update.images:
            image = job.images[index]
            if not image.finished:
                continue
            self._metrics.images.labels(job.provider, image.status).inc()
            if image.status == "failed":
                self._metrics.provider_errors.labels(job.provider).inc()
            if image.latency_ms is not None:
                self._metrics.image_latency.labels(job.provider, image.status).observe(image.latency_ms / 1000)
        if update.retries:
            self._metrics.provider_retries.labels(job.provider).inc(update.retries)
        if update.closes:
            self._metrics.jobs.labels(job.provider, job.status).inc()
            if job.ttfi_ms is not None:
                self._metrics.ttfi.labels(job.provider, job.status).observe(job.ttfi_ms / 1000)
            if job.total_ms is not None:
                self._metrics.batch.labels(job.provider, job.status).observe(job.total_ms / 1000)
