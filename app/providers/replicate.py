"""Replicate through its official client: one prediction per image.

The client raises the same `ReplicateError` for every status, and wraps the transport it is
given in a `RetryTransport` of its own that retries GETs on 429/503/504 up to 10 times,
sleeping any `Retry-After` unbounded and deaf to a cancel. This module adds what a service
needs on top: one retry policy (tenacity) for transient failures, bounded, with backoff that
honours `Retry-After` and a cancel cuts short; a create that holds a worker for a second at
most and a poll that a stop cuts short, even mid-request (so that a timed-out or canceled
image frees its worker at once); and one readable message for everything that is not an
image, but for the account's own problems, which are for the operator.
"""

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic.v1 import ValidationError as ClientValidationError
from replicate.client import Client as ReplicateClient
from replicate.exceptions import ModelError, ReplicateError
from replicate.prediction import Prediction
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from app.core.config import Settings
from app.core.per_thread import THREAD_CLIENT_LIMITS, PerThread, shared_ssl_context
from app.providers.base import GeneratedImage, ImageRequest, ImageStopped, ProviderError, StopSignal
from app.providers.http_abort import ThreadConnections

logger = logging.getLogger("myflix.provider.replicate")  # for what the service never sees

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# How long a create may wait for its image (`Prefer: wait=N`; Replicate holds up to 60 s). A
# held create cannot be cut short without losing the prediction's id (and the means to cancel
# it), so it is kept short: a stopped image's worker is free within it. Longer predictions
# are polled, and a poll can be cut short.
CREATE_WAIT_SECONDS = 1
# Answers about the service's own account (invalid token, no credit): the operator's to fix.
_ACCOUNT_STATUSES = frozenset({401, 402})
SERVICE_UNAVAILABLE = "The image service is unavailable; try again later."
# Failures before the request left this machine: retrying them cannot duplicate anything.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
_BACKOFF = wait_exponential_jitter(
    multiplier=BACKOFF_BASE_SECONDS, max=BACKOFF_CAP_SECONDS, jitter=BACKOFF_BASE_SECONDS
)

T = TypeVar("T")


class TransientReplicateError(Exception):
    """A failure worth retrying: throttling, a server error or a broken connection."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), BACKOFF_CAP_SECONDS)
    except ValueError:
        return None


def _problem_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or "")
    return ""


class TransientFailureTransport(httpx.BaseTransport):
    """Raises TransientReplicateError for 429 and 5xx answers, with their Retry-After (which
    ReplicateError would drop). It raises from inside the transport the client wraps: its
    RetryTransport retries only the responses it gets back, so it makes one attempt and this
    module does all the retrying."""

    def __init__(self, wrapped: httpx.BaseTransport, connections: ThreadConnections | None = None) -> None:
        self._wrapped = wrapped
        self._connections = connections

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._connections is not None:
            self._connections.watch(request)
        response = self._wrapped.handle_request(request)
        if response.status_code == 429 or response.status_code >= 500:
            response.read()
            response.close()
            detail = _problem_detail(response) or response.reason_phrase
            raise TransientReplicateError(
                f"Replicate answered {response.status_code}: {detail}",
                _retry_after_seconds(response),
                response.status_code,
            )
        return response

    def close(self) -> None:
        self._wrapped.close()


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (TransientReplicateError, httpx.TransportError))


def _may_have_created(exc: BaseException) -> bool:
    """Whether a create that failed so may have made the prediction all the same: its answer
    was lost after the request left."""
    return isinstance(exc, httpx.TransportError) and not isinstance(exc, _NOT_SENT)


def _failure(retry_state: RetryCallState) -> BaseException | None:
    return retry_state.outcome.exception() if retry_state.outcome is not None else None


def _retry_delay(retry_state: RetryCallState) -> float:
    """Replicate's Retry-After when it sent one, else exponential backoff with jitter."""
    failure = _failure(retry_state)
    if isinstance(failure, TransientReplicateError) and failure.retry_after is not None:
        return failure.retry_after
    return _BACKOFF(retry_state)


def _sleep_unless_stopped(stop: StopSignal, seconds: float) -> None:
    if stop.wait(seconds):
        raise ImageStopped


def _sleep_then_wait_create_turn(request: ImageRequest, seconds: float) -> None:
    """Before a create is sent again: its backoff, then its turn in the create budget, so that
    creates refused together do not all come back at once."""
    _sleep_unless_stopped(request.stop, seconds)
    request.wait_create_turn()
    if request.stop.is_set():
        raise ImageStopped


def _report_retry(request: ImageRequest, creating: bool, retry_state: RetryCallState) -> None:
    failure = _failure(retry_state)
    if creating and isinstance(failure, TransientReplicateError) and failure.status == 429:
        request.on_throttled(retry_state.upcoming_sleep)
    request.on_retry(retry_state.attempt_number, retry_state.upcoming_sleep, str(failure))


def _client_error_message(exc: ReplicateError) -> str:
    if exc.status in _ACCOUNT_STATUSES:
        # Whole, for the operator; the user is told nothing of the account's token or billing.
        logger.error("Replicate refused the service's account: %s %s: %s", exc.status, exc.title, exc.detail)
        return SERVICE_UNAVAILABLE
    reason = exc.detail or exc.title or "request rejected"
    return f"Replicate rejected the request ({exc.status}): {reason}"


def _output_url(output: Any) -> str:
    items = output if isinstance(output, list) else [output] if output else []
    if not items:
        raise ProviderError("The model returned no image (it may have been filtered as unsafe).")
    first = items[0]
    # The client wraps https/data URLs in FileOutput and leaves any other URL a plain str.
    return getattr(first, "url", None) or str(first)


@dataclass(frozen=True)
class _ThreadClient:
    """A worker thread's Replicate client, and the transport under it that holds its
    connections (the client has no close of its own)."""

    client: ReplicateClient
    transport: httpx.BaseTransport
    connections: ThreadConnections


class ReplicateProvider:
    name = "replicate"
    limits_creates = True

    def __init__(
        self,
        api_token: str,
        model: str,
        base_url: str | None,
        extra_input: dict[str, Any],
        max_retries: int,
        poll_interval: float,
    ) -> None:
        self.model = model
        # Seeds are the service's: image i gets seed + i, or none for a random one each.
        self._extra_input = {k: v for k, v in extra_input.items() if k != "seed"}
        self._max_retries = max_retries
        self._poll_interval = poll_interval
        self._api_token = api_token
        self._base_url = base_url
        self._clients = PerThread(self._new_client, lambda client: client.transport.close())

    def _new_client(self) -> _ThreadClient:
        connections = ThreadConnections()
        transport = TransientFailureTransport(
            httpx.HTTPTransport(verify=shared_ssl_context(), limits=THREAD_CLIENT_LIMITS), connections
        )
        client = ReplicateClient(api_token=self._api_token, base_url=self._base_url, transport=transport)
        return _ThreadClient(client, transport, connections)

    @property
    def _client(self) -> ReplicateClient:
        return self._clients.get().client

    def generate(self, request: ImageRequest) -> GeneratedImage:
        if resume_id := request.resume_prediction_id:
            prediction = self._cut_short_by_stop(request, lambda: self._client.predictions.get(resume_id), resume_id)
        else:
            model_input = {**self._extra_input, "prompt": request.prompt, "num_outputs": 1}
            if request.seed is not None:
                model_input["seed"] = request.seed
            prediction = self._with_retries(request, lambda: self._create(model_input), creating=True)
            if not self._is_finished(prediction):
                request.on_prediction(prediction.id)
        prediction = self._follow(request, prediction)
        if prediction.status == "failed":
            raise ProviderError(prediction.error or "The prediction failed.")
        if prediction.status == "canceled":
            raise ProviderError("The prediction was canceled at Replicate.")
        return GeneratedImage(url=_output_url(prediction.output))

    def prepare_thread(self) -> None:
        self._clients.get()

    def close(self) -> None:
        self._clients.close()

    def _create(self, model_input: dict[str, Any]) -> Prediction:
        owner_name, _, version = self.model.partition(":")
        # `Prefer: wait` makes Replicate answer as soon as the image exists, so no poll
        # stands between the model and the user for predictions within the wait.
        if version:
            return self._client.predictions.create(version=version, input=model_input, wait=CREATE_WAIT_SECONDS)
        return self._client.models.predictions.create(model=owner_name, input=model_input, wait=CREATE_WAIT_SECONDS)

    def _follow(self, request: ImageRequest, prediction: Prediction) -> Prediction:
        """Poll until the prediction ends. A cancel also cancels it at Replicate; an
        interrupt leaves it running there, to be re-attached after a restart."""
        while True:
            if request.stop.is_set():
                if request.stop.cancels_at_provider and not self._is_finished(prediction):
                    self._cancel(prediction.id)
                raise ImageStopped
            if self._is_finished(prediction):
                return prediction
            if not request.stop.wait(self._poll_interval):
                with contextlib.suppress(ImageStopped):  # canceled at the provider above, if it is to be
                    self._cut_short_by_stop(request, prediction.reload)

    def _cut_short_by_stop(self, request: ImageRequest, call: Callable[[], T], prediction_id: str | None = None) -> T:
        """`call` with retries, cut short, even mid-request, by a stop; a cancel cancels
        `prediction_id` at Replicate."""
        try:
            with self._clients.get().connections.cut_by(request.stop):
                return self._with_retries(request, call)
        except ImageStopped:
            if prediction_id is not None and request.stop.cancels_at_provider:
                self._cancel(prediction_id)
            raise

    def _cancel(self, prediction_id: str) -> None:
        try:
            self._client.predictions.cancel(prediction_id)
        except (ReplicateError, TransientReplicateError, httpx.TransportError) as exc:
            logger.warning("could not cancel prediction %s: %s", prediction_id, exc)

    @staticmethod
    def _is_finished(prediction: Prediction) -> bool:
        # Replicate's sync mode may answer `processing` once every file output exists.
        return prediction.status in TERMINAL_STATUSES or (prediction.status == "processing" and bool(prediction.output))

    def _with_retries(self, request: ImageRequest, call: Callable[[], T], creating: bool = False) -> T:
        """Retry transient failures. A create is retried only when Replicate cannot have made
        the prediction (an error answer, or no connection at all): never pay twice."""
        retrying = Retrying(
            retry=retry_if_exception(lambda exc: _is_transient(exc) and not (creating and _may_have_created(exc))),
            stop=stop_after_attempt(self._max_retries + 1),
            wait=_retry_delay,
            sleep=(
                functools.partial(_sleep_then_wait_create_turn, request)
                if creating
                else functools.partial(_sleep_unless_stopped, request.stop)
            ),
            before_sleep=functools.partial(_report_retry, request, creating),
            reraise=True,
        )
        try:
            return retrying(call)
        except (TransientReplicateError, httpx.TransportError) as exc:
            if creating and _may_have_created(exc):
                raise ProviderError(f"Lost the connection to Replicate while creating the prediction: {exc!r}") from exc
            raise ProviderError(f"Replicate is unavailable: {exc}") from exc
        except ModelError as exc:
            raise ProviderError(str(exc) or "The prediction failed.") from exc
        except ReplicateError as exc:
            raise ProviderError(_client_error_message(exc)) from exc
        except ClientValidationError as exc:  # e.g. the newer "aborted" status
            raise ProviderError(
                "Replicate answered with a prediction this client cannot read "
                "(a status such as 'aborted'): the image was not made."
            ) from exc
        except ValueError as exc:  # a body that is not JSON, e.g. a proxy's error page
            raise ProviderError("Replicate sent a response that is not JSON.") from exc


def create_provider(settings: Settings) -> ReplicateProvider:
    if settings.REPLICATE_API_TOKEN is None:
        raise ValueError("IMAGE_PROVIDER=replicate needs REPLICATE_API_TOKEN")
    return ReplicateProvider(
        api_token=settings.REPLICATE_API_TOKEN.get_secret_value(),
        model=settings.REPLICATE_MODEL,
        base_url=settings.REPLICATE_BASE_URL,
        extra_input=settings.REPLICATE_INPUT,
        max_retries=settings.REPLICATE_MAX_RETRIES,
        poll_interval=settings.REPLICATE_POLL_INTERVAL,
    )
