"""The image runner: takes image work from the queue and makes the images on a pool of
threads, `max_workers` at a time, recording each state change. The same runner works in the
API process (in-process, or scaled out with RUN_WORK_IN_API) and in `python -m app.worker`."""

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from app.core.metrics import Metrics
from app.providers.base import ImageRequest, StopSignal
from app.services.image_store import ImageStoreError
from app.services.jobs import domain
from app.services.jobs.create_budget import CreateBudget
from app.services.jobs.domain import Job, Update
from app.services.jobs.image_maker import ImageMaker, ImageOutcome
from app.services.jobs.interfaces import JobStore, Transition, WorkItem, WorkQueue
from app.services.jobs.recorder import JobRecorder

logger = logging.getLogger("myflix.jobs")


# At a stop, how long the outcomes of finished images may take to be stored (what is left is
# redone from what was stored at the next start, or by another worker).
RECORDING_AT_STOP_SECONDS = 1.0
# Worker threads per slot. A slot whose image timed out or was canceled takes its next image at
# once, while the abandoned call winds down on its thread (cut short within a moment: see
# app/providers/http_abort.py); the spare threads are what the next image starts on meanwhile.
THREADS_PER_SLOT = 2


def timeout_message(seconds: float) -> str:
    return f"The provider did not finish the image within {seconds:g} s."


@dataclass(frozen=True)
class _Dispatched:
    request: ImageRequest
    made: "asyncio.Future[ImageOutcome | None]"
    stopped: "asyncio.Future[None]"  # resolved once the request is stopped (canceled, interrupted)


class ImageRunner:
    def __init__(
        self,
        store: JobStore,
        queue: WorkQueue,
        recorder: JobRecorder,
        maker: ImageMaker,
        metrics: Metrics,
        max_workers: int,
        image_timeout_seconds: float,
        max_attempts: int,
        shutdown_grace_seconds: float,
        create_budget: CreateBudget | None = None,
    ) -> None:
        self._store = store
        self._queue = queue
        self._recorder = recorder
        self._maker = maker
        self._metrics = metrics
        self._workers = max_workers
        self._image_timeout = image_timeout_seconds
        self._max_attempts = max_attempts
        self._grace = shutdown_grace_seconds
        self._budget = create_budget  # told of the provider's 429s, which slow it down
        self._executor = maker.new_executor(max_workers * THREADS_PER_SLOT)
        self._running: dict[WorkItem, ImageRequest] = {}
        # The attempt each running image holds (domain.claimed): what it records is fenced by it.
        self._attempts: dict[WorkItem, int] = {}
        # Started as they were handed over, not yet followed by their slot.
        self._started: dict[WorkItem, _Dispatched] = {}
        self._slots: list[asyncio.Task[None]] = []
        self._taking: set[asyncio.Task[None]] = set()  # slots waiting for work, not making an image
        # Outcomes being stored, and what worker threads reported: recorded off the slots.
        self._background: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        queue.on_cancel(self._stop_job)

    @property
    def busy(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        """Start a worker thread for each slot (the pool makes them on demand, and a first burst
        of images would pay for that), then take work."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._start_threads)
        self._slots = [asyncio.create_task(self._slot(), name=f"image-slot-{n}") for n in range(self._workers)]

    def _start_threads(self) -> None:
        everyone_started = threading.Barrier(self._workers + 1)
        for _ in range(self._workers):  # the spares start when an abandoned call holds a thread
            self._executor.submit(everyone_started.wait)
        everyone_started.wait()

    async def stop(self) -> None:
        """Take no more work; give running images the grace period, then leave them for the
        next start or another worker (a Replicate prediction is re-attached there)."""
        self._stopping = True
        for slot in self._taking:
            slot.cancel()
        try:
            await asyncio.wait_for(self._idle.wait(), self._grace)
        except TimeoutError:
            logger.warning("shutdown grace period over; %d images left for later", len(self._running))
        for request in self._running.values():
            request.stop.interrupt()
        if self._background:
            # Outcomes being stored: a database that takes no writes cannot hold the stop.
            _, unfinished = await asyncio.wait(self._background, timeout=RECORDING_AT_STOP_SECONDS)
            for task in unfinished:
                task.cancel()
        for slot in self._slots:
            slot.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._maker.close()

    async def _slot(self) -> None:
        current = asyncio.current_task()
        assert current is not None
        on_taken = functools.partial(self._start_at_hand_over, current)
        while not self._stopping:
            self._taking.add(current)
            try:
                item = await self._queue.take(on_taken)
            finally:
                self._taking.discard(current)
            try:
                await self._run(item)
            except Exception:  # the store could not be read or written, or a bug: keep the slot
                logger.exception("image work failed", extra={"job_id": item.job_id, "index": item.index})
                self._queue.give_up(item)

    def _start_at_hand_over(self, slot: "asyncio.Task[None]", item: WorkItem) -> None:
        """Where the queue hands the job over with its item, the image starts at once: in a
        burst of requests, the slot's own turn of the loop comes only after all of them."""
        self._taking.discard(slot)  # it has work now: a stop lets it finish
        if item.job is not None and _wanted(item.job, item):
            self._started[item] = self._dispatch(item.job, item)

    def _stop_job(self, job_id: str) -> None:
        for item, request in list(self._running.items()):
            if item.job_id == job_id:
                request.stop.cancel()

    def _dispatch(self, job: Job, item: WorkItem) -> _Dispatched:
        request = self._request(job, item)
        self._running[item] = request
        self._idle.clear()
        loop = asyncio.get_running_loop()
        made = loop.run_in_executor(self._executor, self._maker.make, request, item.hold, item.admission)
        made.add_done_callback(_retrieve)  # an abandoned call's end is awaited by no one
        stopped: asyncio.Future[None] = loop.create_future()
        request.stop.on_stop(functools.partial(self._resolve_soon, stopped))
        return _Dispatched(request, made, stopped)

    def _resolve_soon(self, stopped: "asyncio.Future[None]") -> None:
        """From whichever thread stopped the request."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(_resolve, stopped)

    async def _run(self, item: WorkItem) -> None:
        attempt: int | None = None
        job = item.job
        if job is None:
            # The queue carries no job (scaled out): its claim reads it, then the image starts.
            claimed = await self._claim(item, time.monotonic(), None)
            if claimed is None:
                return
            job, attempt = claimed
        elif item not in self._started and not _wanted(job, item):
            await self._queue.done(item)  # recorded already (delivered twice), or canceled
            return
        # Where the job is at hand, the image first and its claim after: its time is running.
        started = self._started.pop(item, None)
        dispatched = started if started is not None else self._dispatch(job, item)
        request = dispatched.request
        try:
            if attempt is None:
                claimed = await self._claim(item, request.dispatched_at, request.stop)
                if claimed is None:
                    return
                attempt = claimed[1]
            self._attempts[item] = attempt
            outcome = await self._outcome(item, attempt, dispatched)
            if outcome is None:
                if request.stop.cancels_at_provider:
                    await self._queue.done(item)  # canceled: the cancel recorded it
                return  # interrupted: stays unfinished, for the next start or another worker
            # This slot takes its next image while the outcome is stored.
            self._in_background(self._conclude(job.id, item, attempt, request.dispatched_at, outcome))
        except BaseException:
            # Given up (or this process stops): the provider's work is left to be re-attached.
            request.stop.interrupt()
            raise
        finally:
            # The slot does not wait for the thread of an image it stopped: that call is cut
            # short on its thread, and the slot takes its next image meanwhile.
            self._running.pop(item, None)
            self._attempts.pop(item, None)
            if not self._running:
                self._idle.set()

    async def _claim(self, item: WorkItem, at: float, stop: StopSignal | None) -> tuple[Job, int] | None:
        """Record that this worker took the image: the job and the attempt it holds, or None
        when the image is not to be made (the job is gone, the image ended meanwhile, or it
        has had all its attempts). `stop`: the image's, where it has started already."""
        applied = await self._recorder.record(
            item.job_id, lambda j: domain.claimed(j, item.index, at, self._max_attempts)
        )
        if applied is None:  # deleted
            if stop is not None:
                stop.interrupt()
            await self._queue.done(item)
            return None
        image = applied.job.images[item.index]
        if image.finished or applied.job.cancel_requested:
            exhausted = image.status == "failed" and item.index in applied.update.images
            if exhausted:
                self._metrics.attempts_exhausted.inc()
            if stop is not None and exhausted:
                stop.cancel()  # the image failed: its prediction is of no use any more
            elif stop is not None:
                stop.interrupt()
            await self._queue.done(item)
            return None
        if image.attempts > 1:
            self._metrics.takeovers.inc()
            logger.info(
                "took over an image from a worker that went quiet or stopped",
                extra={"job_id": item.job_id, "index": item.index, "attempt": image.attempts},
            )
        return applied.job, image.attempts

    async def _outcome(self, item: WorkItem, attempt: int, dispatched: _Dispatched) -> ImageOutcome | None:
        """What the thread made; None once the request was stopped; a failure at the deadline
        (which runs from the dispatch, whatever recording it took)."""
        request = dispatched.request
        assert request.deadline is not None
        await asyncio.wait(
            (dispatched.made, dispatched.stopped),
            timeout=max(0.0, request.deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if dispatched.made.done():
            return dispatched.made.result()
        if dispatched.stopped.done():
            return None
        if not await self._still_holds(item, attempt):
            # Taken over while this worker was away (paused, say): the prediction is the
            # successor's now, and not this worker's to cancel.
            request.stop.interrupt()
            return None
        request.stop.cancel()
        return ImageOutcome("failed", time.monotonic(), error=timeout_message(self._image_timeout))

    async def _still_holds(self, item: WorkItem, attempt: int) -> bool:
        job = await self._store.get(item.job_id)
        return job is not None and job.images[item.index].attempts == attempt

    async def _conclude(
        self, job_id: str, item: WorkItem, attempt: int, started_at: float, outcome: ImageOutcome
    ) -> None:
        try:
            applied = await self._recorder.record(
                job_id, domain.by_attempt(item.index, attempt, _finish(item.index, started_at, outcome))
            )
        except Exception:
            self._queue.give_up(item)  # another attempt records it (a Replicate image re-attaches)
            raise
        finally:
            if item.hold is not None:
                item.hold.published()  # the job's other images need not wait for this one
        if applied is not None and applied.job.images[item.index].attempts != attempt:
            # Taken over meanwhile: the item is the successor's to finish.
            logger.warning("an image's result came after it was taken over; dropped", extra={"job_id": job_id})
            self._queue.give_up(item)
        else:
            await self._queue.done(item)
        if outcome.key is not None and (applied is None or applied.job.images[item.index].image_key != outcome.key):
            # Saved, but the job was deleted, had ended or was taken over meanwhile: no link
            # will ever name it.
            try:
                await self._maker.image_store.delete([outcome.key])
            except ImageStoreError:
                logger.warning("an image no job names was left in the store", extra={"key": outcome.key})

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: "asyncio.Task[Any]") -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("recording an image failed", exc_info=task.exception())

    def _request(self, job: Job, item: WorkItem) -> ImageRequest:
        index = item.index
        dispatched_at = time.monotonic()
        stop = StopSignal()
        return ImageRequest(
            job_id=job.id,
            index=index,
            prompt=job.prompt,
            seed=job.seed_of(index),
            stop=stop,
            dispatched_at=dispatched_at,
            deadline=dispatched_at + self._image_timeout,
            resume_prediction_id=job.images[index].prediction_id,
            on_prediction=lambda prediction_id: self._report(
                self._recorder.record(
                    job.id, self._as_holder(item, lambda j: domain.prediction_created(j, index, prediction_id))
                )
            ),
            on_throttled=self._throttled,
            wait_create_turn=lambda: self._wait_create_turn(stop),
            on_retry=lambda attempt, delay, reason: self._report(
                self._recorder.record(
                    job.id,
                    self._as_holder(
                        item, lambda j: domain.retrying(j, index, attempt, delay, reason, time.monotonic())
                    ),
                )
            ),
        )

    def _throttled(self, seconds: float) -> None:
        """From a worker thread: the provider refused a create for its rate limit."""
        if self._budget is not None:
            logger.warning("the provider refused a create (429): creates wait %.1f s", seconds)
            self._report(self._budget.slow_down(seconds))

    def _wait_create_turn(self, stop: StopSignal) -> None:
        """On a worker thread: until the create budget grants this image a create again (or
        the image is stopped)."""
        if self._budget is None or self._loop is None:
            return
        turn = asyncio.run_coroutine_threadsafe(_create_turn(self._budget), self._loop)

        def give_up_the_turn() -> None:
            turn.cancel()

        forget = stop.on_stop(give_up_the_turn)
        try:
            turn.result()
        except (concurrent.futures.CancelledError, RuntimeError):  # stopped, or the loop is closing
            pass
        finally:
            forget()

    def _as_holder(self, item: WorkItem, transition: Transition) -> Transition:
        """`transition`, applied only while this worker still holds the image (once its claim
        is recorded; a report before that is the holder's by definition)."""

        def apply(job: Job) -> Update | None:
            attempt = self._attempts.get(item)
            return transition(job) if attempt is None else domain.by_attempt(item.index, attempt, transition)(job)

        return apply

    def _report(self, record: Coroutine[Any, Any, Any]) -> None:
        """From a worker thread: record on the event loop, without waiting for it."""
        loop = self._loop
        assert loop is not None, "ImageRunner.start() was not awaited"

        try:
            loop.call_soon_threadsafe(self._in_background, record)
        except RuntimeError:  # the loop is closed: this process is gone, the next start resumes
            record.close()


async def _create_turn(budget: CreateBudget) -> None:
    # The budget refills with time, and says when: there is no event to wake on.
    while not (grant := await budget.grant(1)).granted:  # noqa: ASYNC110
        await asyncio.sleep(grant.retry_in)


def _resolve(stopped: "asyncio.Future[None]") -> None:
    if not stopped.done():
        stopped.set_result(None)


def _retrieve(made: "asyncio.Future[ImageOutcome | None]") -> None:
    if not made.cancelled():
        made.exception()  # ImageMaker.make logs its own failures


def _wanted(job: Job, item: WorkItem) -> bool:
    return not (job.images[item.index].finished or job.cancel_requested)


def _finish(index: int, started_at: float, outcome: ImageOutcome) -> Callable[[Job], Update | None]:
    def finish(job: Job) -> Update | None:
        job.images[index].started_at = started_at
        return domain.image_changed(job, index, outcome.status, outcome.at, key=outcome.key, error=outcome.error)

    return finish
