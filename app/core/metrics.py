"""Prometheus metrics, in a registry of their own per app (so tests can build many apps)."""

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# From a fast first image to a slow batch of slow images.
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60, 120)
_LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)
LOOP_LAG_PROBE_SECONDS = 0.05


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("provider", "outcome")
        self.ttfi = Histogram(
            "myflix_ttfi_seconds",
            "Time from job accepted to its first image succeeded.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "myflix_batch_seconds",
            "Time from job accepted to its last image finished.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.image_latency = Histogram(
            "myflix_image_latency_seconds",
            "Provider time of one image, from leaving the queue to finishing.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Counter("myflix_jobs", "Jobs finished.", labels, registry=self.registry)
        self.images = Counter("myflix_images", "Images finished.", labels, registry=self.registry)
        self.provider_retries = Counter(
            "myflix_provider_retries",
            "Provider calls retried after a transient failure.",
            ("provider",),
            registry=self.registry,
        )
        self.provider_errors = Counter(
            "myflix_provider_errors",
            "Images the provider failed to make.",
            ("provider",),
            registry=self.registry,
        )
        self.takeovers = Counter(
            "myflix_image_takeovers",
            "Images taken by a worker after another one had taken them and gone quiet (or stopped).",
            registry=self.registry,
        )
        self.attempts_exhausted = Counter(
            "myflix_image_attempts_exhausted",
            "Images failed because IMAGE_MAX_ATTEMPTS workers had taken them without a result.",
            registry=self.registry,
        )
        self.open_streams = Gauge("myflix_open_streams", "SSE streams open now.", registry=self.registry)
        self.busy_workers = Gauge("myflix_busy_workers", "Worker threads making an image now.", registry=self.registry)
        self.queued_images = Gauge(
            "myflix_queued_images", "Images this process holds that wait for a worker.", registry=self.registry
        )
        self.queue_depth = Gauge(
            "myflix_queue_depth", "Images waiting for a worker, in the whole deployment.", registry=self.registry
        )
        self.loop_lag = Histogram(
            "myflix_event_loop_lag_seconds",
            "How late the event loop runs a timer: time it spends blocked.",
            buckets=_LOOP_LAG_BUCKETS,
            registry=self.registry,
        )

    def watch_workers(self, busy: Callable[[], float], queued: Callable[[], float]) -> None:
        """Read at scrape time, from the scheduler itself: no counts to keep in step."""
        self.busy_workers.set_function(busy)
        self.queued_images.set_function(queued)

    async def probe_loop_lag(self) -> None:
        """Runs for the app's life: a timer's lateness is how long the loop was blocked."""
        while True:
            expected = time.perf_counter() + LOOP_LAG_PROBE_SECONDS
            await asyncio.sleep(LOOP_LAG_PROBE_SECONDS)
            self.loop_lag.observe(max(0.0, time.perf_counter() - expected))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
