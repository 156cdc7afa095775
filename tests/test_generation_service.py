"""The generation service on its own: no HTTP, a scripted provider."""

import asyncio
import threading

import pytest

from app.providers.base import GeneratedImage, ImageRequest, ProviderError
from app.services.generation_service import GenerationService, JobNotFoundError, TooManyImagesError
from app.services.image_store import LocalImageStore
from app.providers.local import render_image


class ScriptedProvider:
    """Fails the images whose index is in `failing`; `crashing` raises a non-provider error."""

    name = "scripted"
    model = "scripted-1"

    def __init__(self, failing=(), crashing=()):
        self.failing, self.crashing = set(failing), set(crashing)
        self.threads: set[str] = set()

    def generate(self, request: ImageRequest) -> GeneratedImage:
        self.threads.add(threading.current_thread().name)
        if request.index in self.failing:
            raise ProviderError(f"image {request.index} was refused")
        if request.index in self.crashing:
            raise KeyError("bug")
        return GeneratedImage(content=render_image(request.prompt, request.seed, request.index), content_type="image/png")

    def close(self):
        pass


async def _run_job(service, **kwargs):
    job = service.create_job(owner="alice@myflix.dev", image_base_url="http://test", **kwargs)
    events = [event async for event in service.follow(job, 0, keepalive_seconds=5)]
    return job, events


def _service(tmp_path, provider, max_images=8):
    return GenerationService(provider, LocalImageStore(tmp_path), max_workers=4, max_images_per_job=max_images)


def _run_one_job(tmp_path, provider, **job):
    """Start a service, run one job to its end, stop the service; returns (job, events)."""

    async def scenario():
        service = _service(tmp_path, provider)
        await service.start()
        try:
            return await _run_job(service, **job)
        finally:
            await service.shutdown()

    return asyncio.run(scenario())


def test_one_image_failing_does_not_stop_the_others(tmp_path):
    job, events = _run_one_job(
        tmp_path, ScriptedProvider(failing={1}, crashing={2}), prompt="p", num_images=4, seed=None
    )
    done = events[-1]
    assert done.name == "done"
    assert job.status == "partial"
    statuses = {image.index: (image.status, image.error) for image in job.images}
    assert statuses[0][0] == statuses[3][0] == "succeeded"
    assert statuses[1] == ("failed", "image 1 was refused")
    assert statuses[2] == ("failed", "Internal error: KeyError")
    assert '"status":"partial"' in done.data


def test_every_image_failing_makes_a_failed_job(tmp_path):
    job, _ = _run_one_job(tmp_path, ScriptedProvider(failing={0, 1}), prompt="p", num_images=2, seed=None)
    assert job.status == "failed"
    assert job.ttfi_ms is None and job.total_ms is not None


def test_images_run_on_the_worker_pool_with_seed_plus_index(tmp_path):
    seen = []

    class Recording(ScriptedProvider):
        def generate(self, request):
            seen.append((request.index, request.seed))
            return super().generate(request)

    provider = Recording()
    _run_one_job(tmp_path, provider, prompt="p", num_images=3, seed=100)
    assert sorted(seen) == [(0, 100), (1, 101), (2, 102)]
    assert all(name.startswith("image") for name in provider.threads)


def test_limits_and_ownership_are_domain_errors(tmp_path):
    async def scenario():
        service = _service(tmp_path, ScriptedProvider(), max_images=2)
        await service.start()
        try:
            with pytest.raises(TooManyImagesError):
                service.create_job(owner="a", prompt="p", num_images=3, seed=None, image_base_url="http://t")
            job, _ = await _run_job(service, prompt="p", num_images=1, seed=None)
            with pytest.raises(JobNotFoundError):
                service.get_job(job.id, owner="someone-else")
            assert service.get_job(job.id, owner="alice@myflix.dev") is job
        finally:
            await service.shutdown()

    asyncio.run(scenario())
