"""One image, made: the provider's call, the download of its output and the save into the
image store. Blocking; runs on a worker thread, in an API process or a worker process."""

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app.providers.base import ImageProvider, ImageRequest, ImageStopped, ProviderError
from app.providers.downloads import REPLICATE_OUTPUT_HOSTS, ImageFetcher, ImageFetchError, require_image
from app.services.image_store import ImageStore, ImageStoreError, image_key
from app.services.jobs.interfaces import Admission, FirstImageHold

logger = logging.getLogger("myflix.jobs")


@dataclass(frozen=True)
class ImageOutcome:
    status: str  # "succeeded" or "failed"
    at: float  # time.monotonic() when it finished
    key: str | None = None
    error: str | None = None


class ImageMaker:
    def __init__(self, provider: ImageProvider, image_store: ImageStore, fetcher: ImageFetcher | None = None) -> None:
        self.provider = provider
        self.image_store = image_store
        self._fetcher = fetcher if fetcher is not None else ImageFetcher(REPLICATE_OUTPUT_HOSTS)

    def make(
        self, request: ImageRequest, hold: FirstImageHold | None = None, admission: Admission | None = None
    ) -> ImageOutcome | None:
        """The outcome; None when the request was stopped (a cancel is recorded by whoever
        canceled, an interrupted image is taken up again later). `hold`: the job's, shared by
        its images, where the queue gives one. `admission`: the job's insert, where the image
        was handed over while it commits: the provider is called only once it has."""
        try:
            if admission is not None and not admission.wait(request.stop):
                request.stop.cancel()  # the job was withdrawn: nothing of it is to be made
                return None
            if request.stop.is_set():
                return None
            generated = self.provider.generate(request)
            if hold is not None:
                hold.wait_turn()
            if generated.content is not None:
                content, media_type = generated.content, require_image(generated.content)
            elif generated.url:
                content, media_type = self._fetcher.fetch(generated.url, request.stop)
            else:
                raise ProviderError("The provider returned no image.")
            if request.stop.is_set():
                return None  # timed out or canceled meanwhile: its outcome is recorded already
            key = image_key(f"{request.job_id}-{request.index}", media_type)
            self.image_store.save(key, content)
            return ImageOutcome("succeeded", time.monotonic(), key)
        except ImageStopped:
            return None
        except (ProviderError, ImageFetchError, ImageStoreError) as exc:
            return ImageOutcome("failed", time.monotonic(), error=str(exc))
        except Exception as exc:  # a bug or an unexpected library error: fail the image, not the pool
            logger.exception("image crashed", extra={"job_id": request.job_id, "index": request.index})
            return ImageOutcome("failed", time.monotonic(), error=f"Internal error: {type(exc).__name__}")

    def new_executor(self, max_workers: int) -> ThreadPoolExecutor:
        """The worker threads that make images; each prepares its clients when it starts."""
        return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="image", initializer=self._prepare_thread)

    def _prepare_thread(self) -> None:
        self._fetcher.prepare_thread()
        self.provider.prepare_thread()

    def close(self) -> None:
        self._fetcher.close()
        self.provider.close()
